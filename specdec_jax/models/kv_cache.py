"""Static-shape KV caches, one per params layout of ``transformer.py``.

Invariant (docs/design.md, "The cache invariant"): slot j holds the key and
value of the token at absolute position j; a query at position t attends
slots <= t, a block's own entries in place of the slots it stands for
(written before the attention reads the cache, or by ``write_block`` after a
pass that only read it). Slots at or beyond a row's committed length may be
stale and are never attended (masked, or replaced by the block's entries),
so rejecting drafts costs nothing.

The same two containers hold a block's new entries (T slots instead of S).

``KVCache``: stacked [L, B, S, G, H] arrays (the ``scan`` layout; sharded
per the rules by their dimension suffix). ``LayerCaches``: one [B, S, G, H]
array per layer (the ``unrolled`` layout; each layer's attention reads its
own buffer, with no slice of a stacked one to copy).
"""

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, stacked: ``k_LBSGH``, ``v_LBSGH``."""

  k_LBSGH: jax.Array
  v_LBSGH: jax.Array

  @property
  def num_slots(self) -> int:
    return self.k_LBSGH.shape[2]

  def stacked(self) -> "KVCache":
    return self


@flax.struct.dataclass
class LayerCaches:
  """Keys and values per layer: tuples of L arrays [B, S, G, H]."""

  k: tuple
  v: tuple

  @property
  def num_slots(self) -> int:
    return self.k[0].shape[1]

  def stacked(self) -> KVCache:
    """The same entries as a stacked KVCache (for inspection and tests)."""
    return KVCache(jnp.stack(self.k), jnp.stack(self.v))


def init_cache(cfg, batch_size: int, num_slots: int) -> KVCache:
  """Zero stacked cache [L, B, S, G, H] in the model dtype."""
  shape = (cfg.num_layers, batch_size, num_slots, cfg.num_kv_heads, cfg.head_dim)
  # Two distinct buffers, so the cache can be donated.
  return KVCache(k_LBSGH=jnp.zeros(shape, cfg.jnp_dtype), v_LBSGH=jnp.zeros(shape, cfg.jnp_dtype))


def init_layer_caches(cfg, batch_size: int, num_slots: int) -> LayerCaches:
  """Zero per-layer caches, L arrays [B, S, G, H] each for keys and values."""
  shape = (batch_size, num_slots, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
  return LayerCaches(k=zeros(), v=zeros())


def _safe_positions(positions_BT, num_slots):
  # Positions outside [0, S) are dropped (never clamped and never wrapped),
  # so a block that runs past the buffer end cannot overwrite earlier slots.
  return jnp.where(positions_BT < 0, num_slots, positions_BT)


def write(kv_BSGH: jax.Array, kv_BTGH: jax.Array, positions_BT: jax.Array) -> jax.Array:
  """Scatters a block's keys (or values) into their per-row slots of one
  layer's buffer (in place inside a loop that carries it)."""
  rows_B1 = jnp.arange(kv_BTGH.shape[0])[:, None]
  return kv_BSGH.at[rows_B1, _safe_positions(positions_BT, kv_BSGH.shape[1])].set(
      kv_BTGH.astype(kv_BSGH.dtype), mode="drop")


def write_layer(kv_LBSGH: jax.Array, layer: jax.Array, kv_BTGH: jax.Array,
                positions_BT: jax.Array) -> jax.Array:
  """``write`` into layer ``layer`` of a stacked buffer.

  One scatter into the loop-carried buffer, updated in place. (A per-row
  vmap of the scatter made XLA copy the whole cache every layer: ~10x slower
  decode at B=8, S=640 on CPU.)
  """
  rows_B1 = jnp.arange(kv_BTGH.shape[0])[:, None]
  return kv_LBSGH.at[layer, rows_B1, _safe_positions(positions_BT, kv_LBSGH.shape[2])].set(
      kv_BTGH.astype(kv_LBSGH.dtype), mode="drop")


def write_block(cache, block, slots_BT: jax.Array):
  """Writes a block's keys and values (``transformer.run_blocks``'s
  ``block``: the cache's layout with T slots) into every layer at their
  per-row slots; slots outside [0, S) are dropped. Outside a conditional the
  scatter updates the (donated or loop-carried) buffers in place."""
  if isinstance(cache, LayerCaches):
    put = lambda buf, new: write(buf, new, slots_BT)
    return LayerCaches(tuple(map(put, cache.k, block.k)), tuple(map(put, cache.v, block.v)))
  rows_B1 = jnp.arange(slots_BT.shape[0])[:, None]
  safe_BT = _safe_positions(slots_BT, cache.num_slots)
  put = lambda buf, new: buf.at[:, rows_B1, safe_BT].set(new.astype(buf.dtype), mode="drop")
  return KVCache(put(cache.k_LBSGH, block.k_LBSGH), put(cache.v_LBSGH, block.v_LBSGH))


def pad_block(block, width: int):
  """A block's entries padded with zeros to ``width`` slots (the widest
  verify width: every branch of the width switch returns one shape)."""
  axis = 1 if isinstance(block, LayerCaches) else 2
  pad = lambda x: jnp.pad(x, [(0, 0)] * axis + [(0, width - x.shape[axis])]
                          + [(0, 0)] * (x.ndim - axis - 1))
  return jax.tree.map(pad, block)
