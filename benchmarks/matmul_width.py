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

``--forms`` also times other ways of writing the same products in XLA, each
layer's output feeding the next (as in a decoder, so nothing overlaps):

  python benchmarks/matmul_width.py --widths=1,2,5,8 --forms=dot,column_halves,transposed,rows

- ``dot``: ``x @ W``, the decoder's form.
- ``column_halves``: each kernel stored as two column halves (two dots whose
  outputs are concatenated; the split happens once, before timing).
- ``transposed``: each kernel stored as W^T, computed as ``(W^T x^T)^T``.
- ``rows``: one matrix-vector product per row of x.
- ``kernel``: the project's CPU kernel (``kernels/cpu_matmul.py``, what the
  decoder runs on the CPU by default), kernels stored W^T; above 8 rows
  (``cpu_matmul.MAX_ROWS``) it is XLA's dot, as in the decoder.
"""

import time

from absl import app
from absl import flags
import numpy as np

_WIDTHS = flags.DEFINE_list("widths", ["1", "2", "3", "5", "8"], "Block widths T.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Alternating rounds (median over them).")
_ITERS = flags.DEFINE_integer("iters", 5, "Calls per round and width.")
_LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (SmolLM2: 30).")
_FORMS = flags.DEFINE_list("forms", [], "Also time these forms, layers chained (module doc).")
FORMS = ("dot", "column_halves", "transposed", "rows", "kernel")

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
  if _FORMS.value:
    _time_forms(weights, widths, rng)


def _time_forms(weights, widths, rng):
  """The --forms table: each form's chained layers at every width, alternating
  form and width round by round; times relative to ``dot`` at the first width."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from specdec_jax.kernels import build as kernel_build  # pylint: disable=g-import-not-at-top
  from specdec_jax.kernels import cpu_matmul  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(_FORMS.value) - set(FORMS))
  if unknown:
    raise app.UsageError(f"--forms: unknown {unknown}; expected some of {FORMS}")
  if "kernel" in _FORMS.value and not kernel_build.available():
    raise app.UsageError(f"--forms=kernel: {kernel_build.why_unavailable()}")
  forms = ["dot"] + [f for f in _FORMS.value if f != "dot"]
  as_stored = [jnp.asarray(w) for w in weights]
  stored = {
      "dot": as_stored,
      "column_halves": [tuple(jnp.asarray(h) for h in np.array_split(w, 2, axis=1))
                        for w in weights],
      "transposed": [jnp.asarray(np.ascontiguousarray(w.T)) for w in weights],
      "rows": as_stored,
  }
  stored["kernel"] = stored["transposed"]
  products = {
      "dot": lambda x, w: x @ w,
      "column_halves": lambda x, halves: jnp.concatenate([x @ h for h in halves], axis=1),
      "transposed": lambda x, w_t: (w_t @ x.T).T,
      "rows": lambda x, w: jnp.concatenate([x[t:t + 1] @ w for t in range(x.shape[0])], 0),
      "kernel": cpu_matmul.dense_t,
  }

  def chained(product):
    @jax.jit
    def layers(x_TD, ws):
      h_TD = x_TD
      for qkv, o, gate_up, down in zip(ws[0::4], ws[1::4], ws[2::4], ws[3::4]):
        h_TD = h_TD + product(product(h_TD, qkv)[:, :D_MODEL] * 0.1, o)
        gu_TF = product(h_TD, gate_up)
        h_TD = h_TD + product(jax.nn.silu(gu_TF[:, :FFN]) * gu_TF[:, FFN:], down)
        h_TD = h_TD * jax.lax.rsqrt(jnp.mean(h_TD * h_TD, -1, keepdims=True) + 1e-6)
      return jnp.sum(h_TD)
    return layers

  fns = {f: chained(products[f]) for f in forms}
  xs = {t: jnp.asarray(rng.standard_normal((t, D_MODEL)).astype(np.float32)) for t in widths}
  for f in forms:
    for t in widths:
      fns[f](xs[t], stored[f]).block_until_ready()   # compile
  times = {(f, t): [] for f in forms for t in widths}
  for _ in range(_ROUNDS.value):
    for f in forms:
      for t in widths:
        start = time.perf_counter()
        for _ in range(_ITERS.value):
          fns[f](xs[t], stored[f]).block_until_ready()
        times[(f, t)].append((time.perf_counter() - start) / _ITERS.value)
  base = np.median(times[("dot", widths[0])])
  print("\nlayers chained (each layer's output feeds the next), / dot at T=%d" % widths[0])
  print("| form | " + " | ".join(f"T={t}" for t in widths) + " |")
  print("|---|" + "---|" * len(widths))
  for f in forms:
    cells = [f"{np.median(times[(f, t)]) * 1e3:.1f} ms ({np.median(times[(f, t)]) / base:.2f})"
             for t in widths]
    print(f"| {f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
