"""Warping logits to probabilities, and sampling with per-request keys.

One warp function serves the target and every drafter, so the draft
distribution ``q`` and the target distribution ``p`` are always transformed
identically (temperature, then top-k, then top-p), in float32.

Randomness: each request has one key. The noise for absolute position ``t``
and purpose ``u`` is drawn from ``fold_in(fold_in(key, t), u)``, so a row's
output never depends on the batch it ran in, and the target's token at a
position is the same whether it was produced by plain or speculative decoding
(the ``coupled`` rule relies on this).
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Purposes of random draws at one position.
TARGET = 0    # the target's own token (plain decoding, bonus, coupled noise)
DRAFT = 1     # an independent draft proposal (rejection sampling)
ACCEPT = 2    # the uniform of the accept test
RESIDUAL = 3  # the correction token after a rejection


@flax.struct.dataclass
class SamplingParams:
  """Warp settings as traced scalars: changing them never recompiles.

  temperature: float32; 0 means greedy (one-hot on the argmax).
  top_k: int32; 0 disables.
  top_p: float32 in (0, 1]; 1 disables.
  """

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array

  @classmethod
  def create(cls, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
    validate(temperature, top_k, top_p)
    return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def validate(temperature, top_k, top_p) -> None:
  """Raises ValueError for settings outside their domain (naming the field)."""
  if isinstance(temperature, bool) or not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k!r}")
  if isinstance(top_p, bool) or not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


TRUNCATE_CANDIDATES = 1024   # largest logits top-k/top-p look at before the fallback


def _sortable_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 in the same order (negative floats get their bits flipped)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_sortable_bits(u: jax.Array) -> jax.Array:
  bits = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_threshold(values_NV: jax.Array, weights_NV: jax.Array,
                       target_N1: jax.Array) -> jax.Array:
  """The largest value t of each row with sum(weights[values >= t]) >= target.

  A bisection over the 2^32 float32 bit patterns (32 masked sums over the
  vocabulary) instead of a sort. Rows where no value qualifies get their
  smallest value. Returns [N, 1] float32.
  """
  keys_NV = _sortable_bits(values_NV)
  lo_N1 = jnp.min(keys_NV, axis=-1, keepdims=True)       # qualifies (everything kept)
  hi_N1 = jnp.max(keys_NV, axis=-1, keepdims=True) + 1   # does not (nothing kept)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(jnp.where(keys_NV >= mid, weights_NV, 0.0), axis=-1, keepdims=True) >= target_N1
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo_N1, _ = jax.lax.fori_loop(0, 32, halve, (lo_N1, hi_N1))
  return _from_sortable_bits(lo_N1)


def _truncate(scaled_NV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks logits outside top-k, then outside the top-p nucleus (ties kept).

  The nucleus is the smallest set of most probable tokens whose mass reaches
  top_p: its cut is the largest logit t with mass(logits >= t) >= top_p, so
  equal logits are never split. The thresholds come from the
  ``TRUNCATE_CANDIDATES`` largest logits (``lax.top_k``) whenever those hold
  the whole top-k set or the nucleus; only otherwise (a flat distribution at
  a high temperature, or top_k above the cap) from a bisection over the whole
  vocabulary (``_largest_threshold``), for that row alone. Both give the same
  cut up to the float rounding of the mass at the boundary; a full sort of a
  49k vocabulary would cost more than a decode step on CPU.
  """
  vocab = scaled_NV.shape[-1]
  cap = min(TRUNCATE_CANDIDATES, vocab)

  def from_candidates(sorted_NC):
    """(threshold [N, 1], whether it is final [N]) from the C largest logits, sorted."""
    count = sorted_NC.shape[-1]
    kth_N1 = jnp.take(sorted_NC, jnp.clip(top_k, 1, count) - 1, axis=-1)[..., None]
    kth_N1 = jnp.where(top_k > 0, kth_N1, -jnp.inf)   # top-k off: no lower bound
    kept_NV = scaled_NV >= kth_N1                     # top-k, ties kept
    max_N1 = sorted_NC[:, :1]
    norm_N1 = jnp.sum(jnp.where(kept_NV, jnp.exp(scaled_NV - max_N1), 0.0), axis=-1,
                      keepdims=True)
    probs_NC = jnp.where(sorted_NC >= kth_N1, jnp.exp(sorted_NC - max_N1), 0.0) / norm_N1
    # Keep the smallest prefix whose mass reaches top_p: token i is kept when
    # the mass strictly before it is still below top_p (all of them at top_p
    # = 1, whatever the rounding of that sum).
    mass_before_NC = jnp.cumsum(probs_NC, axis=-1) - probs_NC
    keep_NC = ((mass_before_NC < top_p) | (top_p >= 1.0)) & (sorted_NC >= kth_N1)
    num_keep_N = jnp.maximum(jnp.sum(keep_NC, axis=-1), 1)
    threshold_N1 = jnp.take_along_axis(sorted_NC, (num_keep_N - 1)[..., None], axis=-1)
    final_N = ((jnp.sum(kept_NV, axis=-1) <= sorted_NC.shape[-1])
               | ((jnp.sum(probs_NC, axis=-1) >= top_p) & (top_p < 1.0)))
    return threshold_N1, (top_k <= count) & final_N

  def from_whole_vocabulary():
    ones_NV = jnp.ones_like(scaled_NV)
    kth_N1 = _largest_threshold(scaled_NV, ones_NV, jnp.full_like(scaled_NV[:, :1], top_k))
    kth_N1 = jnp.where(top_k > 0, kth_N1, -jnp.inf)
    kept_NV = scaled_NV >= kth_N1
    weights_NV = jnp.where(kept_NV, jnp.exp(scaled_NV - jnp.max(scaled_NV, -1, keepdims=True)),
                           0.0)
    probs_NV = weights_NV / jnp.sum(weights_NV, axis=-1, keepdims=True)
    nucleus_N1 = _largest_threshold(scaled_NV, probs_NV, jnp.full_like(kth_N1, top_p))
    return jnp.where(top_p < 1.0, jnp.maximum(nucleus_N1, kth_N1), kth_N1)

  # The barrier keeps XLA (CPU) from turning TopK into a full sort when its
  # values feed a fusion, which would cost as much as the sort it replaces.
  top_NC = jax.lax.optimization_barrier(jax.lax.top_k(scaled_NV, cap)[0])
  threshold_N1, final_N = from_candidates(top_NC)
  if cap == vocab:   # the candidates are the whole vocabulary: always final
    return jnp.where(scaled_NV >= threshold_N1, scaled_NV, -jnp.inf)
  # Per row, so that a row's cut never depends on the other rows of its batch.
  threshold_N1 = jax.lax.cond(
      jnp.all(final_N), lambda: threshold_N1,
      lambda: jnp.where(final_N[:, None], threshold_N1, from_whole_vocabulary()))
  return jnp.where(scaled_NV >= threshold_N1, scaled_NV, -jnp.inf)


def warp(logits_V: jax.Array, params: SamplingParams, sampled: bool = False) -> jax.Array:
  """Float32 probabilities [..., V] from logits [..., V].

  Temperature 0 gives a one-hot on the argmax. The top-k/top-p truncation runs
  only when one of them is active (a scalar ``lax.cond``). ``sampled=True``:
  the caller is a compiled sampling path, where temperature > 0 always (the
  greedy flag that picks the compiled path is temperature == 0), so the
  argmax one-hot over the vocabulary is not built.
  """
  logits = logits_V.astype(jnp.float32)
  shape = logits.shape
  flat_NV = logits.reshape(-1, shape[-1])
  safe_temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
  scaled_NV = flat_NV / safe_temperature
  needs_sort = (params.top_k > 0) | (params.top_p < 1.0)
  scaled_NV = jax.lax.cond(needs_sort, _truncate, lambda s, k, p: s,
                           scaled_NV, params.top_k, params.top_p)
  probs_NV = jax.nn.softmax(scaled_NV, axis=-1)
  if sampled:
    return probs_NV.reshape(shape)
  onehot_NV = jax.nn.one_hot(jnp.argmax(flat_NV, axis=-1), shape[-1], dtype=jnp.float32)
  probs_NV = jnp.where(params.temperature > 0, probs_NV, onehot_NV)
  return probs_NV.reshape(shape)


def position_keys(keys_B2: jax.Array, positions_B: jax.Array, purpose) -> jax.Array:
  """Keys for (request, absolute position, purpose).

  Args:
    keys_B2: uint32 raw request keys [B, 2] (``jax.random.PRNGKey`` layout).
    positions_B: int32 positions [B] or [B, K].
    purpose: int or int array broadcastable to positions_B.

  Returns:
    uint32 keys [*positions_B.shape, 2].
  """
  positions_B = jnp.asarray(positions_B, jnp.int32)
  purpose = jnp.broadcast_to(jnp.asarray(purpose, jnp.int32), positions_B.shape)
  fold = lambda key, pos, use: jax.random.fold_in(jax.random.fold_in(key, pos), use)
  if positions_B.ndim == 1:
    return jax.vmap(fold)(keys_B2, positions_B, purpose)
  return jax.vmap(jax.vmap(fold, in_axes=(None, 0, 0)))(keys_B2, positions_B, purpose)


SAMPLE_BLOCK = 256   # tokens per block of the two-level draw in ``sample``


def sample(probs_V: jax.Array, keys_2: jax.Array, block: int = SAMPLE_BLOCK) -> jax.Array:
  """Exact samples, two-level Gumbel-max. probs [..., V], keys [..., 2] -> [...].

  The vocabulary is cut into blocks of ``block`` consecutive ids. A block is
  drawn with probability its mass (Gumbel-max over the block masses, noise
  from ``fold_in(key, 0)``), then a token inside it in proportion to its
  probability (Gumbel-max over the block, noise from ``fold_in(key, 1 +
  block index)``): P(token) = mass(block) * p / mass(block) = p. That needs
  V/block + block random numbers per draw instead of V (~110x fewer at
  V=49152; generating V Gumbels was a quarter of a batch-64 CPU decode step).

  The noise is a function of the key alone (the block-level Gumbels and each
  block's within-block Gumbels), so two distributions sampled with one key
  share it: the same distribution always gives the same token, and close
  ones usually do (the ``coupled`` rule relies on this).
  """
  vocab = probs_V.shape[-1]
  flat_NV = probs_V.reshape(-1, vocab).astype(jnp.float32)
  flat_keys = keys_2.reshape(-1, 2)
  block = min(block, vocab)
  num_blocks = -(-vocab // block)
  padded_NV = jnp.pad(flat_NV, ((0, 0), (0, num_blocks * block - vocab)))
  blocks_NCb = padded_NV.reshape(-1, num_blocks, block)

  def gumbel_max(probs, noise):
    log_probs = jnp.log(jnp.maximum(probs, 0.0))
    return jnp.argmax(jnp.where(probs > 0, log_probs + noise, -jnp.inf), axis=-1)

  def one(key, blocks_Cb):
    mass_C = jnp.sum(blocks_Cb, axis=-1)
    chosen = gumbel_max(mass_C, jax.random.gumbel(jax.random.fold_in(key, 0), (num_blocks,)))
    noise_b = jax.random.gumbel(jax.random.fold_in(key, 1 + chosen), (block,))
    return chosen * block + gumbel_max(blocks_Cb[chosen], noise_b)

  tokens = jax.vmap(one)(flat_keys, blocks_NCb)
  return tokens.astype(jnp.int32).reshape(probs_V.shape[:-1])


def uniform(keys_2: jax.Array) -> jax.Array:
  """One float32 uniform in [0, 1) per key: keys [..., 2] -> [...]."""
  flat = keys_2.reshape(-1, 2)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(flat)
  return u.reshape(keys_2.shape[:-1])
