"""One device check: what a first look at a GPU or TPU needs, in one run.

Random weights of real shapes (``configs/shapes.py``; no checkpoint, no
network), greedy decoding, everything timed in this process after a warm-up:

  1. plain vs speculative (n-gram, model draft) tokens/s at batch 1, 8, 64;
  2. the verify pass's cost at widths 1..16 and one draft token's cost c, in
     plain decode steps (the phases the compiled loop runs);
  3. compiles after warm-up (must be 0);
  4. speedup under the synthetic rule at acceptance a in {0.5, 0.7, 0.9}
     (drafts accepted with probability a: the systems speedup apart from
     draft quality; NOT exact);
  5. the greedy mismatch rate of speculative vs plain decoding in the
     target's dtype (bf16 on the accelerator shapes: the verify pass and a
     plain step multiply matrices of different shapes, so near-ties can
     break differently), per 1,000 compared tokens, with the target's top-2
     logit gap at each mismatch; and the same in the numerics-matched mode
     (``decode.matched_verify_widths``: must be 0), with its cost.

Prints one table and writes one JSON (after every section, so an interrupted
run keeps what it measured). ``--dry-run`` runs the same code on CPU with
tiny shapes (tested in CI). On an accelerator host install nothing: JAX with
its plugin must be there; launch/device_check.sh puts this checkout and any
wheels shipped alongside (ml-collections) on the path.

  bash launch/device_check.sh                 # Llama-3.2-1B shape + 2-layer draft, bf16
  bash launch/device_check.sh --shapes=llama3_8b_1b
  bash launch/device_check.sh --dry-run       # CPU, tiny shapes, < 2 minutes
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specdec_jax import compile_count  # noqa: E402
from specdec_jax import config_defaults  # noqa: E402
from specdec_jax import decode  # noqa: E402
from specdec_jax import fidelity  # noqa: E402
from specdec_jax import phase_timing  # noqa: E402
from specdec_jax.jobs import io  # noqa: E402
from specdec_jax import runtime  # noqa: E402
from specdec_jax.drafters import ModelDrafter, NgramDrafter  # noqa: E402
from specdec_jax.generation import Generator  # noqa: E402
from specdec_jax.models.transformer import Transformer  # noqa: E402

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "CPU, tiny shapes: the same code path, fast.")
_SHAPES = flags.DEFINE_string("shapes", "llama3_1b", "A variant of configs/shapes.py.")
_OUT = flags.DEFINE_string("out", "runs/device_check.json", "Output JSON.")
_LAYER_LOOP = flags.DEFINE_string("layer_loop", "scan",
                                  "scan compiles one block (minutes saved on 16-32 layers); "
                                  "unrolled is the single-device decode layout.")

BATCHES = (1, 8, 64)
WIDTHS = (1, 2, 3, 4, 5, 8, 12, 16)
DRY_RUN_BATCHES, DRY_RUN_WIDTHS = (1,), (1, 2, 5)   # the same code, fewer compiles
ACCEPTANCES = (0.5, 0.7, 0.9)
K = 4
TINY = (dict(vocab_size=259, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
             head_dim=16, ffn_dim=128, tie_embeddings=True),
        dict(vocab_size=259, num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
             head_dim=16, ffn_dim=64, tie_embeddings=True), "bfloat16")


def _log(message):
  print(message, file=sys.stderr, flush=True)


def _models(dry_run: bool, shapes: str, layer_loop: str):
  """(target, target params, draft, draft params) with random weights."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs"))
  import shapes as shape_configs  # pylint: disable=g-import-not-at-top
  target_shape, draft_shape, dtype = TINY if dry_run else shape_configs.VARIANTS[shapes]
  out = []
  for shape, seed in ((target_shape, 0), (draft_shape, 1)):
    entry = config_defaults.random_model(init_seed=seed, init_scale=0.05, **shape)
    entry.dtype = dtype
    cfg, params, _ = runtime._random_model(entry)  # pylint: disable=protected-access
    model = Transformer(cfg, layer_loop)
    out += [model, model.prepare_params(params)]
  return tuple(out)


def _prompts(batch: int, length: int, vocab: int, seed: int):
  """Random prompts with a repeated half, so the n-gram lookup finds matches."""
  rng = np.random.default_rng(seed)
  prompts = []
  for _ in range(batch):
    half = rng.integers(0, min(vocab, 30000), size=length // 2).tolist()
    prompts.append(half + half)
  return prompts


def _timed(gen, tp, dp, prompts, **kwargs):
  """(tokens/s, outputs, compiles during the timed call) after one warm-up call."""
  gen.generate(tp, dp, prompts, **kwargs)
  before = compile_count.loop_compiles()
  result = gen.generate(tp, dp, prompts, **kwargs)
  compiles = compile_count.loop_compiles() - before
  tokens = sum(len(r.output_ids) for r in result.rows)
  return tokens / result.wall_time_s, [r.output_ids for r in result.rows], compiles


class _Mismatches:
  """Greedy speculative vs plain: rows that diverge, tokens compared up to
  each row's first divergence, and the target's top-2 logit gap there."""

  def __init__(self, dtype: str):
    self.dtype, self.rows, self.tokens, self.found = dtype, 0, 0, []

  def add(self, target, params, prompts, plain, spec):
    rows, tokens = fidelity.divergence_counts(plain, spec)
    self.rows, self.tokens = self.rows + rows, self.tokens + tokens
    self.found += fidelity.greedy_divergences(target, params, prompts, plain, spec)

  def summary(self) -> dict:
    return {"dtype": self.dtype, "rows_diverged": self.rows, "tokens_compared": self.tokens,
            "per_1000_tokens": 1000.0 * self.rows / max(self.tokens, 1),
            "near_ties": sum(d["near_tie"] for d in self.found),
            "gaps": [round(d["gap"], 4) for d in self.found[:20]]}


def check(dry_run: bool, shapes: str, layer_loop: str, out_path: str) -> dict:
  t_start = time.perf_counter()
  report = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "jax": jax.__version__, "shapes": "tiny" if dry_run else shapes,
            "layer_loop": layer_loop, "k": K, "dry_run": dry_run}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    io.write_json(out_path, report)

  compile_count.install()
  target, tp, draft, dp = _models(dry_run, shapes, layer_loop)
  report["target_dtype"] = target.cfg.dtype
  vocab = target.cfg.vocab_size
  max_new, prompt_len = (8, 8) if dry_run else (64, 64)
  batches = DRY_RUN_BATCHES if dry_run else BATCHES
  widths = DRY_RUN_WIDTHS if dry_run else WIDTHS
  sizes = dict(max_prompt_len=prompt_len, max_new_tokens=max_new)

  _log(f"[{time.perf_counter() - t_start:.0f}s] 1. plain vs speculative at batch {batches}")
  report["throughput"], report["compiles_after_warmup"] = {}, {}
  mismatches = _Mismatches(target.cfg.dtype)
  for batch in batches:
    prompts = _prompts(batch, prompt_len, vocab, seed=batch)
    row = {}
    for name, drafter, params in (("plain", None, None), ("ngram", NgramDrafter(), {}),
                                  ("model", ModelDrafter(draft), dp)):
      gen = Generator(target, drafter, k_max=0 if drafter is None else K, policy="fixed",
                      batch_size=batch, **sizes)
      tok_s, outputs, compiles = _timed(gen, tp, params, prompts)
      row[name] = {"tokens_per_s": tok_s}
      report["compiles_after_warmup"][f"{name}@{batch}"] = compiles
      if name == "plain":
        plain_outputs = outputs
      else:
        row[name]["speedup"] = tok_s / row["plain"]["tokens_per_s"]
        mismatches.add(target, tp, prompts, plain_outputs, outputs)
    report["throughput"][str(batch)] = row
    _log(f"  batch {batch}: " + ", ".join(f"{n} {v['tokens_per_s']:.1f} tok/s"
                                          for n, v in row.items()))
    save()
  report["greedy_mismatch"] = mismatches.summary()

  batch = batches[min(1, len(batches) - 1)]
  _log(f"[{time.perf_counter() - t_start:.0f}s] 1b. numerics-matched mode at batch {batch}")
  prompts, matched = _prompts(batch, prompt_len, vocab, seed=batch), _Mismatches(target.cfg.dtype)
  widths_matched = decode.matched_verify_widths(K)
  row = {}
  for name, drafter, params, k_max in (("plain", None, None, 0),
                                       ("model", ModelDrafter(draft), dp, K)):
    gen = Generator(target, drafter, k_max=k_max, policy="fixed", batch_size=batch,
                    verify_widths=widths_matched, **sizes)
    row[name], outputs, compiles = _timed(gen, tp, params, prompts)
    report["compiles_after_warmup"][f"matched {name}@{batch}"] = compiles
    if name == "plain":
      plain_outputs = outputs
  matched.add(target, tp, prompts, plain_outputs, outputs)
  report["matched_numerics"] = dict(
      matched.summary(), batch=batch, plain_tokens_per_s=row["plain"],
      model_tokens_per_s=row["model"],
      plain_cost_vs_default=(report["throughput"][str(batch)]["plain"]["tokens_per_s"]
                             / row["plain"]))
  save()

  _log(f"[{time.perf_counter() - t_start:.0f}s] 2. verify cost at widths {widths}, draft cost")
  gen = Generator(target, ModelDrafter(draft), k_max=widths[-1] - 1, policy="fixed",
                  batch_size=1, verify_widths=widths, max_prompt_len=prompt_len,
                  max_new_tokens=max_new + 64)
  phases = phase_timing.measure(gen, tp, dp, _prompts(1, prompt_len, vocab, seed=0),
                                iters=3 if dry_run else 10, k=K)
  step = phases.verify_s_by_width[1]
  report["verify_cost_by_width"] = {str(w): s / step for w, s in
                                    phases.verify_s_by_width.items()}
  report["plain_step_ms"] = 1e3 * step
  report["draft_cost_c"] = phases.draft_s / K / step
  save()

  _log(f"[{time.perf_counter() - t_start:.0f}s] 3. synthetic acceptance {ACCEPTANCES}")
  report["synthetic_speedup"] = {}
  for batch in batches[:2]:
    prompts = _prompts(batch, prompt_len, vocab, seed=batch)
    gen = Generator(target, ModelDrafter(draft), k_max=K, rule="synthetic", policy="fixed",
                    batch_size=batch, **sizes)
    plain_tok_s = report["throughput"][str(batch)]["plain"]["tokens_per_s"]
    for a in ACCEPTANCES:
      tok_s, _, compiles = _timed(gen, tp, dp, prompts, synthetic_acceptance=a)
      report["synthetic_speedup"][f"a={a}@{batch}"] = tok_s / plain_tok_s
      report["compiles_after_warmup"][f"synthetic a={a}@{batch}"] = compiles
    save()
  report["total_s"] = time.perf_counter() - t_start
  save()
  return report


def format_table(r: dict) -> str:
  lines = [f"device check: {r['device']} ({r['platform']}, jax {r['jax']}), shapes "
           f"{r['shapes']} in {r['target_dtype']}, layer loop {r['layer_loop']}, K={r['k']}, "
           f"greedy, random weights",
           f"{'batch':>6} {'plain tok/s':>12} {'ngram tok/s':>12} {'x':>6} "
           f"{'model tok/s':>12} {'x':>6}"]
  for batch, row in r["throughput"].items():
    lines.append(f"{batch:>6} {row['plain']['tokens_per_s']:12.1f} "
                 f"{row['ngram']['tokens_per_s']:12.1f} {row['ngram']['speedup']:5.2f}x "
                 f"{row['model']['tokens_per_s']:12.1f} {row['model']['speedup']:5.2f}x")
  widths = " ".join(f"{w}:{c:.2f}" for w, c in r["verify_cost_by_width"].items())
  lines.append(f"verify cost by width (plain steps; step {r['plain_step_ms']:.2f} ms): {widths}")
  lines.append(f"draft cost c = {r['draft_cost_c']:.3f} steps per draft token")
  synth = ", ".join(f"{k} {v:.2f}x" for k, v in r["synthetic_speedup"].items())
  lines.append(f"synthetic acceptance speedup (NOT exact): {synth}")
  compiles = sum(r["compiles_after_warmup"].values())
  lines.append(f"compiles after warm-up: {compiles} over {len(r['compiles_after_warmup'])} runs")
  m = r["greedy_mismatch"]
  lines.append(f"greedy speculative vs plain in {m['dtype']}: {m['rows_diverged']} rows diverged "
               f"over {m['tokens_compared']} tokens ({m['per_1000_tokens']:.2f} per 1,000; "
               f"{m['near_ties']} at a near-tie, top-2 gaps {m['gaps']})")
  m = r["matched_numerics"]
  lines.append(f"numerics-matched mode (batch {m['batch']}): {m['rows_diverged']} rows diverged "
               f"over {m['tokens_compared']} tokens; its plain baseline runs "
               f"{m['plain_cost_vs_default']:.2f}x the default's time per token, its model "
               f"draft {m['model_tokens_per_s'] / m['plain_tokens_per_s']:.2f}x its plain")
  lines.append(f"total {r['total_s']:.0f} s")
  return "\n".join(lines)


def main(argv):
  del argv
  if _DRY_RUN.value:
    jax.config.update("jax_platforms", "cpu")
  report = check(_DRY_RUN.value, _SHAPES.value, _LAYER_LOOP.value, _OUT.value)
  print(format_table(report))
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
