"""Draft-model trees against chains at the same verify width, on SmolLM2.

The draft is the target cut short: its first ``--draft_layers`` blocks, its
final norm and its tied head (an early-exit draft: real weights, no
training, cost ~ draft_layers / 30 of a target step). For each verify width
W, in one process: plain greedy decoding, a chain of K = W - 1 drafts, and a
tree of N = W - 1 nodes (depth ``W // 2``, ``--topk`` branches), all greedy
with policy fixed on the same prompts. Prints tokens per target call (the
tree's gain) and the wall-clock speedup over plain decoding, and checks that
every output equals plain greedy:

  python benchmarks/trees_vs_chains.py --prompts=held_out --widths=4,8
"""

import os
import time

from absl import app
from absl import flags

_PROMPTS = flags.DEFINE_string("prompts", "held_out", "Prompt-suite selection.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "0 = all selected prompts.")
_WIDTHS = flags.DEFINE_list("widths", ["4", "8"], "Verify widths W (chain K = W-1, tree N = W-1).")
_TOPK = flags.DEFINE_list("topk", ["2", "3"], "Tree branches per width (one per width).")
_LAYERS = flags.DEFINE_integer("draft_layers", 6, "Target blocks the draft keeps.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "New tokens per prompt.")
_CACHE = flags.DEFINE_string("cache_dir", "", "Converted-weights cache.")


def early_exit_draft(cfg, stacked_params, num_layers: int):
  """(Transformer, stacked params) of the target's first ``num_layers`` blocks."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from specdec_jax import runtime  # pylint: disable=g-import-not-at-top
  draft_cfg = dataclasses.replace(cfg, num_layers=num_layers)
  params = dict(stacked_params, layers=jax.tree.map(lambda x: x[:num_layers],
                                                    stacked_params["layers"]))
  return runtime.default_decoder(draft_cfg), params


def main(argv):
  del argv
  from specdec_jax import main as main_lib
  from specdec_jax import prompts as prompts_lib
  from specdec_jax.drafters import ModelDrafter
  from specdec_jax.generation import Generator
  from specdec_jax.models import checkpoint
  from specdec_jax import runtime

  main_lib.quiet_libraries()
  widths = [int(w) for w in _WIDTHS.value]
  topks = [int(t) for t in _TOPK.value]
  if len(topks) != len(widths):
    raise app.UsageError(f"--topk needs one value per width ({len(widths)}), got {topks}")
  cache = os.path.abspath(_CACHE.value or os.path.expanduser("~/.cache/specdec_jax"))
  cfg, stacked, tokenizer = checkpoint.load_smollm2(cache)
  target = runtime.default_decoder(cfg)
  target_params = target.prepare_params(stacked)
  draft, draft_params = early_exit_draft(cfg, stacked, _LAYERS.value)
  draft_params = draft.prepare_params(draft_params)
  selected = prompts_lib.load_prompts(_PROMPTS.value, None)
  if _MAX_PROMPTS.value:
    selected = selected[:_MAX_PROMPTS.value]
  prompts = [tokenizer.encode(tokenizer.apply_chat_template(list(p.messages),
                                                            add_generation_prompt=True))
             for p in selected]
  max_prompt = max(len(p) for p in prompts)
  common = dict(max_prompt_len=max_prompt, max_new_tokens=_MAX_NEW.value,
                eos_ids=tokenizer.eos_ids)
  setups = {"plain": Generator(target, None, **common)}
  for width, topk in zip(widths, topks):
    setups[f"W={width} chain K={width - 1}"] = Generator(
        target, ModelDrafter(draft), k_max=width - 1, policy="fixed", **common)
    setups[f"W={width} tree N={width - 1} depth {width // 2} top-{topk}"] = Generator(
        target, ModelDrafter(draft), k_max=width // 2, policy="fixed", tree_nodes=width - 1,
        tree_topk=topk, **common)
  print(f"{len(prompts)} prompts ({_PROMPTS.value}), {_MAX_NEW.value} new tokens, greedy; "
        f"draft: the target's first {_LAYERS.value} of {cfg.num_layers} blocks", flush=True)
  results = {}
  for name, gen in setups.items():
    dp = None if gen.drafter is None else draft_params
    gen.generate(target_params, dp, prompts[:1])   # compile
    start = time.perf_counter()
    result = gen.generate(target_params, dp, prompts)
    results[name] = (result, time.perf_counter() - start)
    tokens = sum(len(r.output_ids) for r in result.rows)
    calls = sum(r.target_calls for r in result.rows)
    print(f"  {name}: {tokens / calls:.2f} tokens per call, {results[name][1]:.1f} s",
          flush=True)
  plain_rows, plain_s = results["plain"]
  print("\n| setup | tokens per call | speedup | outputs == plain |\n|---|---|---|---|")
  for name, (result, seconds) in results.items():
    tokens = sum(len(r.output_ids) for r in result.rows)
    calls = sum(r.target_calls for r in result.rows)
    same = all(a.output_ids == b.output_ids for a, b in zip(result.rows, plain_rows.rows))
    print(f"| {name} | {tokens / calls:.2f} | {plain_s / seconds:.2f}x | {same} |")


if __name__ == "__main__":
  app.run(main)
