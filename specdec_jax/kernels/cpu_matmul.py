"""A CPU matmul for the few rows a decode step multiplies: ``x @ w.T``.

A decode step multiplies 1..8 rows (a plain step: the batch; a verify pass:
K + 1 tokens per row) by every weight of the model, so its cost is reading
the weights. XLA:CPU streams them at the memory's speed for one row and at
about two thirds of it from two rows on (its matrix-matrix path), which is
what made a verify pass of 5 tokens cost ~1.6 plain steps on the CPU this
project is measured on. ``specdec_rows_matmul`` (``cpu_kernels.cc``) streams
each weight row once for up to ``MAX_ROWS`` rows of x;
``benchmarks/matmul_width.py --forms=dot,kernel`` measures both.

Use: ``Transformer(cfg, "unrolled", matmul="kernel")`` stores its kernels
[out, in] (``prepare_params``; checkpoints keep [in, out]) and calls
``dense_t``, which takes the kernel for up to ``MAX_ROWS`` float32 rows on the
CPU and ``x @ w.T`` otherwise (prefill, large batches, other platforms, other
dtypes, no compiler: ``build.available``).

Numerics: the kernel sums each output in the same order whatever the number
of rows (see the .cc), so a verify pass's products for a row equal a plain
step's bit for bit; against XLA's dot it differs by float32 reassociation.
"""

import jax
import jax.numpy as jnp

from specdec_jax.kernels import build

MAX_ROWS = 8          # the kernel's M range (1..MAX_ROWS)
TARGET_NAME = "specdec_rows_matmul"


def _kernel_call(x_MD: jax.Array, w_ND: jax.Array) -> jax.Array:
  if not build.available():   # (traced for every platform: lax.platform_dependent)
    return x_MD @ w_ND.T
  return jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((x_MD.shape[0], w_ND.shape[0]),
                                                            jnp.float32))(x_MD, w_ND)


@jax.custom_vjp
def rows_matmul(x_MD: jax.Array, w_ND: jax.Array) -> jax.Array:
  """``x_MD @ w_ND.T`` (float32, 1 <= M <= MAX_ROWS) by the kernel on the
  CPU (where it builds) and by XLA elsewhere; differentiable (the backward
  pass is XLA's)."""
  return jax.lax.platform_dependent(x_MD, w_ND, cpu=_kernel_call,
                                    default=lambda x, w: x @ w.T)


def _rows_matmul_fwd(x_MD, w_ND):
  return rows_matmul(x_MD, w_ND), (x_MD, w_ND)


def _rows_matmul_bwd(residuals, dy_MN):
  x_MD, w_ND = residuals
  return dy_MN @ w_ND, dy_MN.T @ x_MD


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def dense_t(x: jax.Array, w_ND: jax.Array, preferred_element_type=None) -> jax.Array:
  """``x @ w_ND.T`` over x's last axis: the kernel where it applies (float32,
  at most MAX_ROWS rows in all, the kernel loaded), XLA's dot otherwise,
  accumulating in ``preferred_element_type`` as ``jnp.einsum`` does."""
  rows = x.size // x.shape[-1] if x.shape[-1] else 0
  if (x.dtype != jnp.float32 or w_ND.dtype != jnp.float32 or not 1 <= rows <= MAX_ROWS
      or not build.available()):
    return jnp.einsum("...d,nd->...n", x, w_ND.astype(x.dtype),
                      preferred_element_type=preferred_element_type)
  y_MN = rows_matmul(x.reshape(rows, x.shape[-1]), w_ND)
  return y_MN.reshape(x.shape[:-1] + (w_ND.shape[0],))
