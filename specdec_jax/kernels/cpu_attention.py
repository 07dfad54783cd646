"""Causal attention of a decode step's few queries over the KV cache, on the CPU.

XLA's form of a decode step's attention (``transformer.attend``) slices a
window of every layer's cache and copies it into the layout its dots want,
with the block's not-yet-written entries selected in: on the 2-core CI
machine that was ~20% of a SmolLM2 step (a step with attention stubbed out
ran 24 against 28-34 ms). ``specdec_decode_attention`` (``cpu_kernels.cc``)
reads each query's visible slots where they lie, the block's entries
(``transformer.PendingBlock``) from the block, one kv group at a time.

It covers what a decode step needs: causal attention (a query at position t
sees slots <= t), at most ``MAX_QUERIES`` queries per row, float32. A draft
tree's pass (its own mask) and prefill stay on XLA (``applies``).

Numerics: a query's output depends only on its own q, position and the
slots it sees, summed in an order independent of the other queries, so a
verify pass's attention for a row equals a plain step's bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax.kernels import build

MAX_QUERIES = 8
TARGET_NAME = "specdec_decode_attention"


def applies(q_BTNH: jax.Array, keys_BSGH: jax.Array, visible_BTS) -> bool:
  """Whether ``decode_attention`` takes this pass (else XLA's attention)."""
  return (visible_BTS is None and q_BTNH.shape[1] <= MAX_QUERIES
          and q_BTNH.dtype == jnp.float32 and keys_BSGH.dtype == jnp.float32
          and build.available())


def reference(q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS, positions_BT):
  """The kernel's maths in XLA (its backward pass, and a check for tests):
  slot s holds block entry ``entry_BS[b, s]`` where that is >= 0, else the
  cache's; a query at position t attends slots <= t. Returns [B, T, N * H]."""
  batch, seq, n, h = q_BTNH.shape
  g = k_BSGH.shape[2]
  rows_B1 = jnp.arange(batch)[:, None]
  taken_BS11 = (entry_BS >= 0)[:, :, None, None]
  index_BS = jnp.maximum(entry_BS, 0)
  keys_BSGH = jnp.where(taken_BS11, new_k_BXGH[rows_B1, index_BS], k_BSGH)
  values_BSGH = jnp.where(taken_BS11, new_v_BXGH[rows_B1, index_BS], v_BSGH)
  q_BTGMH = q_BTNH.reshape(batch, seq, g, n // g, h)
  scores = jnp.einsum("btgmh,bsgh->bgmts", q_BTGMH, keys_BSGH) * (h ** -0.5)
  visible_BTS = jnp.arange(k_BSGH.shape[1])[None, None, :] <= positions_BT[:, :, None]
  scores = jnp.where(visible_BTS[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bgmts,bsgh->btgmh", probs, values_BSGH).reshape(batch, seq, n * h)


@jax.custom_vjp
def decode_attention(q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS, positions_BT):
  """Causal attention of q over the cache with the block overlaid
  (``reference``'s maths), by the kernel. Call it where ``applies``.

  q_BTNH: rotated queries. k_BSGH / v_BSGH: one layer's whole cache.
  new_k_BXGH / new_v_BXGH: the block's keys and values. entry_BS: int32, the
  block entry each slot takes, -1 for the cache's own. positions_BT: int32.
  Returns float32 [B, T, N * H].
  """
  batch, seq, n, h = q_BTNH.shape
  out = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((batch, seq, n, h), jnp.float32))(
      q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS.astype(jnp.int32),
      positions_BT.astype(jnp.int32), scale=np.float32(h ** -0.5))
  return out.reshape(batch, seq, n * h)


def _fwd(*args):
  return decode_attention(*args), args


def _bwd(args, d_out):
  _, vjp = jax.vjp(reference, *args)
  return vjp(d_out)


decode_attention.defvjp(_fwd, _bwd)
