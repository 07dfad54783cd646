"""Why a verify pass of T tokens costs more than a plain step on this CPU.

Times the decoder's weight matmuls alone, ``x[T, d] @ W`` over one SmolLM2
step's worth of block weights (``--layers`` layers of fused q/k/v, o,
gate/up and down kernels: random float32 values of the real shapes, 425 MB
for 30 layers; the tied head is left out), for T = 1 (a plain step) up to a
verify block, compiled by XLA and, for comparison, with numpy's BLAS. One
process, the widths alternated round by round, medians; prints each width's
time, the bandwidth it streams the weights at and its ratio to T = 1:

  python benchmarks/matmul_width.py --widths=1,2,3,5,8 --rounds=7

A memory-bound matmul would cost the same at T = 5 as at T = 1 (the weights
are read once either way); the ratio says how far each library is from it.
"""

import time

from absl import app
from absl import flags
import numpy as np

_WIDTHS = flags.DEFINE_list("widths", ["1", "2", "3", "5", "8"], "Block widths T.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating rounds (median over them).")
_ITERS = flags.DEFINE_integer("iters", 5, "Calls per round and width.")
_LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (SmolLM2: 30).")

D_MODEL, QKV, FFN = 576, 960, 1536   # SmolLM2-135M: d, q + k + v width, ffn


def _weights(rng, layers):
  shapes = [(D_MODEL, QKV), (D_MODEL, D_MODEL), (D_MODEL, 2 * FFN), (FFN, D_MODEL)]
  return [(rng.standard_normal(s) * 0.02).astype(np.float32) for _ in range(layers)
          for s in shapes]


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from specdec_jax import main as main_lib  # pylint: disable=g-import-not-at-top

  main_lib.quiet_libraries()

  rng = np.random.default_rng(0)
  weights = _weights(rng, _LAYERS.value)
  mbytes = sum(w.nbytes for w in weights) / 1e6
  device_weights = [jnp.asarray(w) for w in weights]

  @jax.jit
  def xla_matmuls(x_TF, ws):
    return sum(jnp.sum(x_TF[:, :w.shape[0]] @ w) for w in ws)

  def numpy_matmuls(x_TF):
    return sum(float(np.sum(x_TF[:, :w.shape[0]] @ w)) for w in weights)

  widths = [int(t) for t in _WIDTHS.value]
  xs = {t: rng.standard_normal((t, FFN)).astype(np.float32) for t in widths}
  device_xs = {t: jnp.asarray(x) for t, x in xs.items()}
  for t in widths:
    xla_matmuls(device_xs[t], device_weights).block_until_ready()   # compile
  times = {(lib, t): [] for lib in ("XLA", "numpy") for t in widths}
  for _ in range(_ROUNDS.value):
    for t in widths:
      start = time.perf_counter()
      for _ in range(_ITERS.value):
        xla_matmuls(device_xs[t], device_weights).block_until_ready()
      times[("XLA", t)].append((time.perf_counter() - start) / _ITERS.value)
      start = time.perf_counter()
      for _ in range(_ITERS.value):
        numpy_matmuls(xs[t])
      times[("numpy", t)].append((time.perf_counter() - start) / _ITERS.value)
  print(f"{mbytes:.0f} MB of weights per pass, {_ROUNDS.value} rounds x {_ITERS.value} calls")
  print("| library | T | time | weights streamed at | / T=1 |\n|---|---|---|---|---|")
  for lib in ("XLA", "numpy"):
    base = np.median(times[(lib, widths[0])])
    for t in widths:
      m = np.median(times[(lib, t)])
      print(f"| {lib} | {t} | {m * 1e3:.1f} ms | {mbytes / 1e3 / m:.1f} GB/s | {m / base:.2f} |")


if __name__ == "__main__":
  app.run(main)
