"""What a plain decode step costs as the cache buffer grows, text held fixed.

A step's cache is max_prompt_len + max_new_tokens + the widest verify width
slots long, whatever the text's length. The CPU attention kernel (the
default decoder where it applies) reads each query's slots up to its
position where they lie. On XLA, with attention windows
(``Transformer.min_window``, default 256) a step reads the smallest window
that holds the text; with ``min_window=0`` it reads every slot. In one
process, on SmolLM2 (float32, batch 1, the same short chat prompt), this
times, for each buffer size and each attention (kernel, XLA windows, XLA
whole cache), a plain step as the phase timing measures it (a warm width-1
verify pass, what the auto policy and the diagnosis are given) and the
plain decoding loop itself (``generate`` of ``--max_new_tokens`` tokens,
end-of-sequence ignored, per token, prefill included), alternating the
setups round by round, and prints the medians and each one's ratio to the
same attention's smallest buffer:

  python benchmarks/buffer_size.py --max_prompt_lens=256,2048 --rounds=5
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

_LENS = flags.DEFINE_list("max_prompt_lens", ["256", "2048"], "Buffer sizes (prompt slots).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New-token slots of the buffer.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (median over them).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps per round (median).")
_CACHE = flags.DEFINE_string("cache_dir", "", "Converted-weights cache.")


def main(argv):
  del argv
  import dataclasses

  from specdec_jax import main as main_lib
  from specdec_jax import phase_timing
  from specdec_jax import runtime
  from specdec_jax.generation import Generator
  from specdec_jax.models import checkpoint
  from specdec_jax.models import transformer as transformer_lib

  main_lib.quiet_libraries()
  cache = os.path.abspath(_CACHE.value or os.path.expanduser("~/.cache/specdec_jax"))
  cfg, params, tokenizer = checkpoint.load_smollm2(cache)
  default = runtime.default_decoder(cfg)
  xla_windows = dataclasses.replace(default, matmul="xla")
  models = {"xla windows": xla_windows,
            "xla whole cache": dataclasses.replace(xla_windows, min_window=0)}
  if default.matmul == "kernel":
    models = {"kernel": default, **models}
  # The kernel reads its weights in another layout (prepare_params).
  params_by_matmul = {m.matmul: m.prepare_params(params) for m in models.values()}
  prompt = tokenizer.encode(tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
      add_generation_prompt=True))
  setups = {}
  for length in (int(x) for x in _LENS.value):
    for name, model in models.items():
      gen = Generator(model, None, max_prompt_len=length, max_new_tokens=_MAX_NEW.value)
      setups[(length, name)] = gen
      phase_timing.measure(gen, params_by_matmul[model.matmul], {}, [prompt],
                           iters=2)   # compile + warm
      gen.generate(params_by_matmul[model.matmul], None, [prompt])
      reads = ("each query's slots in place" if model.matmul == "kernel" else
               f"windows {transformer_lib.attention_windows(gen.num_slots, model.min_window)}")
      print(f"compiled: max_prompt_len={length} {name} ({gen.num_slots} slots, {reads})",
            flush=True)
  steps = {key: [] for key in setups}
  per_token = {key: [] for key in setups}
  for r in range(_ROUNDS.value):
    for key, gen in setups.items():
      params = params_by_matmul[models[key[1]].matmul]
      steps[key].append(phase_timing.measure(gen, params, {}, [prompt],
                                             iters=_ITERS.value).verify_s)
      start = time.perf_counter()
      row = gen.generate(params, None, [prompt]).rows[0]
      per_token[key].append((time.perf_counter() - start) / len(row.output_ids))
    print(f"round {r + 1}/{_ROUNDS.value} done", flush=True)
  smallest = min(int(x) for x in _LENS.value)
  print(f"\nprompt of {len(prompt)} tokens, {_MAX_NEW.value} new, median of {_ROUNDS.value} "
        "rounds; each ratio against the same attention's smallest buffer:")
  print(f"{'max_prompt_len':>14} {'slots':>6} {'attention':>16} {'step ms':>8} {'ratio':>6} "
        f"{'loop ms/token':>14} {'ratio':>6}")
  for (length, name), gen in setups.items():
    step, base = np.median(steps[(length, name)]), np.median(steps[(smallest, name)])
    loop = np.median(per_token[(length, name)])
    loop_base = np.median(per_token[(smallest, name)])
    print(f"{length:>14} {gen.num_slots:>6} {name:>16} {step * 1e3:>8.1f} {step / base:>5.2f}x "
          f"{loop * 1e3:>14.1f} {loop / loop_base:>5.2f}x")


if __name__ == "__main__":
  app.run(main)
