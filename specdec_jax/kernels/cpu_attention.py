"""Attention of a decode step's few queries over the KV cache, on the CPU.

XLA's form of a decode step's attention (``transformer.attend``) slices a
window of every layer's cache and copies it into the layout its dots want,
with the block's not-yet-written entries selected in: on the 2-core CI
machine that was ~20% of a SmolLM2 step (a step with attention stubbed out
ran 24 against 28-34 ms). ``specdec_decode_attention`` (``cpu_kernels.cc``)
reads each query's visible slots where they lie, the block's entries
(``transformer.PendingBlock``) from the block, one kv group at a time.

What a query sees (``KernelInputs``): the cache's slots 0..limit, each read
from the block where a block entry takes that slot (``entry_BS``), then a
list of block entries (``extra_BTX``, -1 padded). A chain's pass is causal:
limit = the query's position, no list (``causal_inputs``). A draft tree's
pass: limit = the end of the leading run of slots its mask shows (the text,
and the first nodes of its path where they sit next to it), and the list
holds the rest of its path, shallowest first (``masked_inputs``, from the
tree's mask). At most ``MAX_QUERIES`` queries per row, float32; prefill
stays on XLA (``applies``).

Numerics: a query's output depends only on its own q and the keys it sees,
summed in the order it sees them, whatever the other queries are. A plain
step at position p sees slots 0..p; a tree node at depth d sees the same
keys in the same order (the text, then its path), so a row's attention in
a chain's or a tree's verify pass equals a plain step's bit for bit.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax.kernels import build

MAX_QUERIES = 8
TARGET_NAME = "specdec_decode_attention"


class KernelInputs(NamedTuple):
  """What each query sees. entry_BS: int32, the block entry each cache slot
  takes (-1: the cache's own). limit_BT: int32, the last cache slot the
  query sees (it sees 0..limit). extra_BTX: int32, block entries the query
  sees after those, in order, -1 padded."""
  entry_BS: jax.Array
  limit_BT: jax.Array
  extra_BTX: jax.Array


def applies(q_BTNH: jax.Array, keys_BSGH: jax.Array) -> bool:
  """Whether ``decode_attention`` takes this pass (else XLA's attention)."""
  return (q_BTNH.shape[1] <= MAX_QUERIES and q_BTNH.dtype == jnp.float32
          and keys_BSGH.dtype == jnp.float32 and build.available())


def causal_inputs(entry_BS: jax.Array, positions_BT: jax.Array) -> KernelInputs:
  """A chain's (or plain step's) pass: a query at position t sees slots <= t."""
  batch, seq = positions_BT.shape
  return KernelInputs(entry_BS.astype(jnp.int32), positions_BT.astype(jnp.int32),
                      jnp.full((batch, seq, 1), -1, jnp.int32))


def masked_inputs(entry_BS: jax.Array, positions_BT: jax.Array, slots_BT: jax.Array,
                  visible_BTS: jax.Array) -> KernelInputs:
  """A pass under a mask (a draft tree's): a query sees the leading run of
  slots its mask shows (limit = the run's last slot: the text, through the
  root's slot, and any first nodes of its path that sit next to it), then
  the block's entries whose slots its mask shows past that run, by
  position (the rest of its path, shallowest first). Every slot the mask
  shows past the run must be one a block entry names (``tree.verify_block``'s
  mask is: node slots only). A node's parent has a smaller index, so a
  path's nodes in the run come before the listed ones in depth too: a
  node sees its path's keys in the order a plain step along it would.

  positions_BT / slots_BT: int32, the block entries' positions and named
  slots (>= num_slots: none). visible_BTS: bool, the mask."""
  batch, seq, num_slots = visible_BTS.shape
  limit_BT = jnp.cumprod(visible_BTS.astype(jnp.int32), axis=-1).sum(-1) - 1
  in_range_BX = slots_BT < num_slots
  index_BTX = jnp.broadcast_to(jnp.clip(slots_BT, 0, num_slots - 1)[:, None, :],
                               (batch, seq, slots_BT.shape[1]))
  sees_BTX = (jnp.take_along_axis(visible_BTS, index_BTX, axis=2) & in_range_BX[:, None, :]
              & (slots_BT[:, None, :] > limit_BT[:, :, None]))
  order_key_BTX = jnp.where(sees_BTX, positions_BT[:, None, :], jnp.iinfo(jnp.int32).max)
  order_BTX = jnp.argsort(order_key_BTX, axis=-1, stable=True)
  listed_BTX = jnp.take_along_axis(sees_BTX, order_BTX, axis=-1)
  extra_BTX = jnp.where(listed_BTX, order_BTX, -1)
  return KernelInputs(entry_BS.astype(jnp.int32), limit_BT.astype(jnp.int32),
                      extra_BTX.astype(jnp.int32))


def reference(q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS, limit_BT, extra_BTX):
  """The kernel's maths in XLA (its backward pass, and a check for tests):
  slot s holds block entry ``entry_BS[b, s]`` where that is >= 0, else the
  cache's; a query sees slots <= its limit, then the block entries its
  ``extra_BTX`` lists. Returns [B, T, N * H]."""
  batch, seq, n, h = q_BTNH.shape
  g = k_BSGH.shape[2]
  rows_B1 = jnp.arange(batch)[:, None]
  taken_BS11 = (entry_BS >= 0)[:, :, None, None]
  index_BS = jnp.maximum(entry_BS, 0)
  keys_BSGH = jnp.where(taken_BS11, new_k_BXGH[rows_B1, index_BS], k_BSGH)
  values_BSGH = jnp.where(taken_BS11, new_v_BXGH[rows_B1, index_BS], v_BSGH)
  q_BTGMH = q_BTNH.reshape(batch, seq, g, n // g, h)
  scale = h ** -0.5
  cache_scores = jnp.einsum("btgmh,bsgh->bgmts", q_BTGMH, keys_BSGH) * scale
  sees_cache_BTS = jnp.arange(k_BSGH.shape[1])[None, None, :] <= limit_BT[:, :, None]
  cache_scores = jnp.where(sees_cache_BTS[:, None, None], cache_scores, -jnp.inf)
  # Each query's listed entries (a listed entry seen twice counts twice, as
  # in the kernel); -1 entries are masked.
  listed_BTX = extra_BTX >= 0
  index_BTX = jnp.maximum(extra_BTX, 0)
  extra_k_BTXGH = new_k_BXGH[rows_B1[:, :, None], index_BTX]
  extra_v_BTXGH = new_v_BXGH[rows_B1[:, :, None], index_BTX]
  extra_scores = jnp.einsum("btgmh,btxgh->bgmtx", q_BTGMH, extra_k_BTXGH) * scale
  extra_scores = jnp.where(listed_BTX[:, None, None], extra_scores, -jnp.inf)
  probs = jax.nn.softmax(jnp.concatenate([cache_scores, extra_scores], axis=-1), axis=-1)
  cache_probs, extra_probs = probs[..., :k_BSGH.shape[1]], probs[..., k_BSGH.shape[1]:]
  out_BTGMH = (jnp.einsum("bgmts,bsgh->btgmh", cache_probs, values_BSGH)
               + jnp.einsum("bgmtx,btxgh->btgmh", extra_probs, extra_v_BTXGH))
  return out_BTGMH.reshape(batch, seq, n * h)


@jax.custom_vjp
def decode_attention(q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS, limit_BT,
                     extra_BTX):
  """Attention of q over the cache with the block overlaid (``reference``'s
  maths), by the kernel. Call it where ``applies``.

  q_BTNH: rotated queries. k_BSGH / v_BSGH: one layer's whole cache.
  new_k_BXGH / new_v_BXGH: the block's keys and values. entry_BS, limit_BT,
  extra_BTX: ``KernelInputs`` (``causal_inputs`` / ``masked_inputs``).
  Returns float32 [B, T, N * H]. Where the kernel is missing (``applies``
  says so), the reference's XLA.
  """
  if not build.available():   # builds and registers the kernel on first use
    return reference(q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS, limit_BT,
                     extra_BTX)
  batch, seq, n, h = q_BTNH.shape
  out = jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((batch, seq, n, h), jnp.float32))(
      q_BTNH, k_BSGH, v_BSGH, new_k_BXGH, new_v_BXGH, entry_BS.astype(jnp.int32),
      limit_BT.astype(jnp.int32), extra_BTX.astype(jnp.int32), scale=np.float32(h ** -0.5))
  return out.reshape(batch, seq, n * h)


def _fwd(*args):
  return decode_attention(*args), args


def _bwd(args, d_out):
  _, vjp = jax.vjp(reference, *args)
  return vjp(d_out)


decode_attention.defvjp(_fwd, _bwd)
