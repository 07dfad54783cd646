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

import flax.struct
import jax
import jax.numpy as jnp

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
  """Raises ValueError for settings outside their domain."""
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 disables), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _truncate(scaled_NV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks logits outside top-k, then outside the top-p nucleus (ties kept)."""
  vocab = scaled_NV.shape[-1]
  sorted_NV = -jnp.sort(-scaled_NV, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth_N1 = jnp.take(sorted_NV, k - 1, axis=-1)[..., None]
  sorted_NV = jnp.where(sorted_NV >= kth_N1, sorted_NV, -jnp.inf)
  sorted_probs = jax.nn.softmax(sorted_NV, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p: token i is kept when
  # the mass strictly before it is still below top_p.
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = (mass_before < top_p) & (sorted_NV > -jnp.inf)
  num_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
  threshold_N1 = jnp.take_along_axis(sorted_NV, (num_keep - 1)[..., None], axis=-1)
  return jnp.where(scaled_NV >= threshold_N1, scaled_NV, -jnp.inf)


def warp(logits_V: jax.Array, params: SamplingParams) -> jax.Array:
  """Float32 probabilities [..., V] from logits [..., V].

  Temperature 0 gives a one-hot on the argmax. The sort needed by top-k/top-p
  runs only when one of them is active (a scalar ``lax.cond``).
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


def sample(probs_V: jax.Array, keys_2: jax.Array) -> jax.Array:
  """Gumbel-max samples: argmax(log p + g). probs [..., V], keys [..., 2] -> [...]."""
  vocab = probs_V.shape[-1]
  flat_probs = probs_V.reshape(-1, vocab)
  flat_keys = keys_2.reshape(-1, 2)
  gumbel_NV = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(flat_keys)
  log_probs = jnp.log(jnp.maximum(flat_probs, 0.0))
  tokens = jnp.argmax(jnp.where(flat_probs > 0, log_probs + gumbel_NV, -jnp.inf), axis=-1)
  return tokens.astype(jnp.int32).reshape(probs_V.shape[:-1])


def uniform(keys_2: jax.Array) -> jax.Array:
  """One float32 uniform in [0, 1) per key: keys [..., 2] -> [...]."""
  flat = keys_2.reshape(-1, 2)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(flat)
  return u.reshape(keys_2.shape[:-1])
