"""Peer benchmark: our decoding vs transformers on the same SmolLM2 GGUF.

In one process, on the same chat-formatted prompts and the same number of new
tokens (greedy, batch 1, float32, CPU):
  1. transformers greedy ``generate``
  2. transformers ``generate(prompt_lookup_num_tokens=K)`` (prompt lookup)
  3. our plain decoding (K=0)
  4. our n-gram speculative decoding (K, the default auto policy with costs
     measured here)
Each is warmed up. The systems then alternate prompt by prompt (every system
runs prompt 1, then every system prompt 2, ...), --repeats times, so a drift
of the machine's speed hits every system alike; a system's time is the sum
over prompts of its median per prompt. Writes a JSON and prints a table:
tokens/s, the speedups, and whether each output equals plain greedy
(transformers' greedy output is the reference).

Needs the test extras (torch CPU + transformers):
  python benchmarks/peer_transformers.py --prompts=rewrite,code --max_new_tokens=64 \
      --out=runs/peer.json
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

_PROMPTS = flags.DEFINE_string("prompts", "rewrite,code", "Prompt suite selection.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "0 = all selected prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.")
_K = flags.DEFINE_integer("k", 4, "Draft length (ours) / prompt_lookup_num_tokens (theirs).")
_NGRAM = flags.DEFINE_integer("ngram_max_n", 3, "Longest n-gram matched (both sides).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per prompt (median).")
_OUT = flags.DEFINE_string("out", "runs/peer_transformers.json", "Output JSON.")
_CACHE = flags.DEFINE_string("cache_dir", "", "Converted-weights cache.")


def main(argv):
  del argv
  import torch
  from transformers import AutoModelForCausalLM

  from specdec_jax import main as main_lib
  from specdec_jax import phase_timing
  from specdec_jax import runtime
  from specdec_jax.jobs import io
  from specdec_jax import prompts as prompts_lib
  from specdec_jax.drafters import NgramDrafter
  from specdec_jax.generation import Generator
  from specdec_jax.models import checkpoint
  from specdec_jax.models import gguf_import

  main_lib.quiet_libraries()
  torch.set_num_threads(os.cpu_count() or 1)
  cache = os.path.abspath(_CACHE.value or os.path.expanduser("~/.cache/specdec_jax"))
  cfg, params, tokenizer = checkpoint.load_smollm2(cache)
  path = gguf_import.smollm2_gguf_path()
  hf_model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()

  selected = prompts_lib.load_prompts(_PROMPTS.value)
  if _MAX_PROMPTS.value:
    selected = selected[:_MAX_PROMPTS.value]
  prompt_ids = [tokenizer.encode(tokenizer.apply_chat_template(list(p.messages)))
                for p in selected]
  max_new, k = _MAX_NEW.value, _K.value
  eos = list(tokenizer.eos_ids)

  def hf_generate(ids, **extra):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new,
                              eos_token_id=eos, pad_token_id=eos[0], **extra)
    return out[0, len(ids):].tolist()

  # What single-device runs decode with by default (unrolled, the CPU kernel).
  target = runtime.default_decoder(cfg)
  params = target.prepare_params(params)
  max_prompt = max(len(p) for p in prompt_ids)
  base = Generator(target, None, k_max=0, max_prompt_len=max_prompt, max_new_tokens=max_new,
                   eos_ids=tokenizer.eos_ids)
  spec = Generator(target, NgramDrafter(max_n=_NGRAM.value), k_max=k, policy="auto",
                   max_prompt_len=max_prompt, max_new_tokens=max_new, eos_ids=tokenizer.eos_ids)
  print(f"warm-up on {len(prompt_ids)} prompts ({_PROMPTS.value}), {max_new} new tokens")
  hf_model.generate(torch.tensor([prompt_ids[0]]), do_sample=False, max_new_tokens=4,
                    pad_token_id=eos[0])
  base.generate(params, {}, prompt_ids)
  spec.generate(params, {}, prompt_ids)
  costs = phase_timing.measure_policy_costs(spec, params, {}, prompt_ids[:1])

  def ours(generator, ids, **extra):
    return generator.generate(params, {}, [ids], **extra).rows[0].output_ids

  systems = {
      "transformers_greedy": lambda ids: hf_generate(ids),
      "transformers_prompt_lookup": lambda ids: hf_generate(
          ids, prompt_lookup_num_tokens=k, max_matching_ngram_size=_NGRAM.value),
      "ours_plain": lambda ids: ours(base, ids),
      "ours_ngram": lambda ids: ours(spec, ids, costs=costs),
  }
  per_prompt = {name: [[] for _ in prompt_ids] for name in systems}
  outputs = {name: [None] * len(prompt_ids) for name in systems}
  for repeat in range(_REPEATS.value):
    for i, ids in enumerate(prompt_ids):
      for name, fn in systems.items():   # alternate: every system on this prompt
        t0 = time.perf_counter()
        outputs[name][i] = fn(ids)
        per_prompt[name][i].append(time.perf_counter() - t0)
    print(f"repeat {repeat + 1}/{_REPEATS.value} done", flush=True)
  results = {}
  for name in systems:
    seconds = float(sum(np.median(t) for t in per_prompt[name]))
    results[name] = {"seconds": seconds, "outputs": outputs[name],
                     "new_tokens": sum(len(o) for o in outputs[name])}
  reference = results["transformers_greedy"]["outputs"]
  for r in results.values():
    r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
    r["equals_greedy"] = r["outputs"] == reference
  report = {
      "prompts": _PROMPTS.value, "num_prompts": len(prompt_ids), "max_new_tokens": max_new,
      "k": k, "ngram_max_n": _NGRAM.value,
      "systems": {n: {kk: v for kk, v in r.items() if kk != "outputs"}
                  for n, r in results.items()},
      "transformers_prompt_lookup_speedup":
          results["transformers_greedy"]["seconds"] / results["transformers_prompt_lookup"]["seconds"],
      "ours_ngram_speedup": results["ours_plain"]["seconds"] / results["ours_ngram"]["seconds"],
      "ours_plain_vs_transformers_greedy":
          results["transformers_greedy"]["seconds"] / results["ours_plain"]["seconds"],
      "ours_ngram_vs_transformers_prompt_lookup":
          results["transformers_prompt_lookup"]["seconds"] / results["ours_ngram"]["seconds"],
      "repeats": _REPEATS.value,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  io.write_json(_OUT.value, report)
  print(f"\n{'system':<30}{'tok/s':>9}{'== greedy':>11}")
  for name, r in report["systems"].items():
    print(f"{name:<30}{r['tokens_per_s']:>9.1f}{str(r['equals_greedy']):>11}")
  print(f"transformers prompt-lookup speedup: {report['transformers_prompt_lookup_speedup']:.2f}x")
  print(f"ours n-gram speedup:                {report['ours_ngram_speedup']:.2f}x")
  print(f"ours plain vs transformers greedy:  {report['ours_plain_vs_transformers_greedy']:.2f}x")
  print(f"ours n-gram vs transformers lookup: "
        f"{report['ours_ngram_vs_transformers_prompt_lookup']:.2f}x")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
