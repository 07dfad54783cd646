"""Acceptance rules: pure maths on drafts, draft and target distributions.

Shapes: B rows, K draft slots, V vocab. ``p_BK1V[:, i]`` is the target
distribution for the token at position ``length + i``; draft ``i`` stands at
that position. ``num_proposed_B`` (<= K) says how many drafts a row really
proposed; slots beyond it are never accepted. Every rule returns
``(n_B, x_B)``: the number of accepted drafts and the one extra token (a
correction after a rejection, or the bonus token after n == num_proposed).

``q_BKV=None`` means a deterministic drafter (one-hot q on each draft).
"""

import jax
import jax.numpy as jnp

from specdec_jax import sampling

# The acceptance rule at temperature > 0. Temperature 0 is greedy decoding
# under every rule but synthetic (which accepts by coin flip at any temperature).
RULES = ("rejection", "coupled", "typical", "synthetic")


def check_rule(rule: str) -> None:
  """ValueError naming the choices unless ``rule`` is one of ``RULES``."""
  if rule == "greedy":
    raise ValueError("rule='greedy' is not a rule: temperature=0 decodes greedily under "
                     f"any of {RULES[:3]}; set temperature=0")
  if rule not in RULES:
    raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")


def is_exact(rule: str, greedy: bool) -> bool:
  """Whether the output is the target's, token for token (greedy) or in
  distribution: rejection and coupled when sampling, every rule but
  synthetic when greedy (typical is lossy only when sampling)."""
  return rule != "synthetic" and (greedy or rule in ("rejection", "coupled"))


def _num_leading(ok_BK: jax.Array) -> jax.Array:
  return jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _proposed_mask(num_proposed_B, k):
  return jnp.arange(k)[None, :] < num_proposed_B[:, None]


def _take_row(x_BK_, index_B):
  """x[b, index[b]] for x [B, K, ...]."""
  return jnp.take_along_axis(
      x_BK_, index_B.reshape((-1, 1) + (1,) * (x_BK_.ndim - 2)), axis=1)[:, 0]


def token_identical(rule: str, greedy: bool) -> bool:
  """Whether speculative output equals plain decoding's token for token:
  greedy under any rule but synthetic (temperature 0 accepts by argmax),
  and the coupled rule when sampling."""
  return rule != "synthetic" and (greedy or rule == "coupled")


def target_argmax(logits_BK1V) -> jax.Array:
  """The target's greedy token per slot [B, K+1] int32."""
  return jnp.argmax(logits_BK1V, axis=-1).astype(jnp.int32)


def target_samples(p_BK1V, keys_B2, length_B) -> jax.Array:
  """The target's own sample per slot [B, K+1]: slot j is position
  length + j, drawn with that position's TARGET key, as plain sampling
  draws it."""
  positions_BK1 = length_B[:, None] + jnp.arange(p_BK1V.shape[1])[None, :]
  return sampling.sample(p_BK1V, sampling.position_keys(keys_B2, positions_BK1, sampling.TARGET))


def greedy_accept(draft_BK, target_logits_BK1V, num_proposed_B):
  """Temperature 0: accept while draft == argmax p; x = argmax at the stop.
  Returns (n_B, x_B, the target's argmax per slot target_BK1)."""
  k = draft_BK.shape[1]
  target_BK1 = target_argmax(target_logits_BK1V)
  ok_BK = (draft_BK == target_BK1[:, :k]) & _proposed_mask(num_proposed_B, k)
  n_B = _num_leading(ok_BK)
  return n_B, _take_row(target_BK1, n_B), target_BK1


def rejection_accept(draft_BK, q_BKV, p_BK1V, num_proposed_B, keys_B2, length_B):
  """Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

  Accept draft i with probability min(1, p_i(d_i) / q_i(d_i)); at the first
  rejection sample from norm(max(0, p_i - q_i)); after full acceptance sample
  the bonus from p at index num_proposed. ``q`` must be exactly the
  distribution each draft was sampled from.
  """
  k = draft_BK.shape[1]
  p_draft_BK = jnp.take_along_axis(p_BK1V[:, :k], draft_BK[..., None], axis=-1)[..., 0]
  if q_BKV is None:
    q_draft_BK = jnp.ones_like(p_draft_BK)
  else:
    q_draft_BK = jnp.take_along_axis(q_BKV, draft_BK[..., None], axis=-1)[..., 0]
  positions_BK = length_B[:, None] + jnp.arange(k)[None, :]
  u_BK = sampling.uniform(sampling.position_keys(keys_B2, positions_BK, sampling.ACCEPT))
  ok_BK = accept_test(u_BK, p_draft_BK, q_draft_BK) & _proposed_mask(num_proposed_B, k)
  n_B = _num_leading(ok_BK)
  rejected_B = n_B < num_proposed_B
  next_BV = next_token_distribution(p_BK1V, q_BKV, draft_BK, n_B, rejected_B)
  purpose_B = jnp.where(rejected_B, sampling.RESIDUAL, sampling.TARGET)
  keys = sampling.position_keys(keys_B2, length_B + n_B, purpose_B)
  return n_B, sampling.sample(next_BV, keys)


def accept_test(u_BK, p_draft_BK, q_draft_BK):
  """Accepts a draft with probability min(1, p(d) / q(d)) for u ~ U[0, 1):
  u < p/q, without dividing (q(d) > 0 for a draft sampled from q)."""
  return u_BK * q_draft_BK < p_draft_BK


def next_token_distribution(p_BK1V, q_BKV, draft_BK, n_B, rejected_B):
  """The distribution of the one token the target adds after n accepted drafts.

  After a rejection at slot n: the residual norm(max(0, p_n - q_n)), which
  gives the rejected mass back exactly (one-hot q for a deterministic
  drafter, ``q_BKV=None``). After full acceptance: p_n itself, the bonus.
  Returns [B, V] float32.
  """
  k = draft_BK.shape[1]
  p_n_BV = _take_row(p_BK1V, n_B)
  safe_n_B = jnp.minimum(n_B, k - 1)
  vocab = p_BK1V.shape[-1]
  if k == 0:
    q_n_BV = jnp.zeros_like(p_n_BV)
  elif q_BKV is None:
    q_n_BV = jax.nn.one_hot(_take_row(draft_BK, safe_n_B), vocab, dtype=jnp.float32)
  else:
    q_n_BV = _take_row(q_BKV, safe_n_B).astype(jnp.float32)
  q_n_BV = jnp.where(rejected_B[:, None], q_n_BV, 0.0)
  residual_BV = jnp.maximum(p_n_BV - q_n_BV, 0.0)
  mass_B1 = jnp.sum(residual_BV, axis=-1, keepdims=True)
  # Without a rejection the bonus is p_n itself, untouched (the same draw as a
  # plain step's). p == q leaves no residual mass; a rejection is then
  # impossible in exact arithmetic, so fall back to p rather than divide by 0.
  use_residual_B1 = rejected_B[:, None] & (mass_B1 > 1e-12)
  return jnp.where(use_residual_B1, residual_BV / jnp.maximum(mass_B1, 1e-30), p_n_BV)


def coupled_accept(draft_BK, p_BK1V, num_proposed_B, keys_B2, length_B):
  """Reproducible rule: shared Gumbel noise per (request, position).

  The target's token at each position is argmax(log p + g); the draft was
  proposed with the same g; accept iff equal. Output is token-identical to
  plain sampling with the same request key.
  """
  k = draft_BK.shape[1]
  target_BK1 = target_samples(p_BK1V, keys_B2, length_B)
  ok_BK = (draft_BK == target_BK1[:, :k]) & _proposed_mask(num_proposed_B, k)
  n_B = _num_leading(ok_BK)
  return n_B, _take_row(target_BK1, n_B)


def typical_accept(draft_BK, p_BK1V, num_proposed_B, keys_B2, length_B,
                   epsilon: float = 0.09, alpha: float = 0.3):
  """Medusa-style typical acceptance. NOT exact: a lossy rule for ablations.

  Accept draft i when p_i(d_i) > min(epsilon, alpha * exp(-H(p_i))); the
  extra token is sampled from the target's p at the stop position.
  """
  k = draft_BK.shape[1]
  p_BKV = p_BK1V[:, :k]
  p_draft_BK = jnp.take_along_axis(p_BKV, draft_BK[..., None], axis=-1)[..., 0]
  entropy_BK = -jnp.sum(jnp.where(p_BKV > 0, p_BKV * jnp.log(jnp.maximum(p_BKV, 1e-30)), 0.0),
                        axis=-1)
  threshold_BK = jnp.minimum(epsilon, alpha * jnp.exp(-entropy_BK))
  ok_BK = (p_draft_BK > threshold_BK) & _proposed_mask(num_proposed_B, k)
  n_B = _num_leading(ok_BK)
  keys = sampling.position_keys(keys_B2, length_B + n_B, sampling.TARGET)
  return n_B, sampling.sample(_take_row(p_BK1V, n_B), keys)


def synthetic_accept(target_BK1, num_proposed_B, keys_B2, length_B, acceptance):
  """Synthetic acceptance for systems benchmarks. NOT exact: the output is
  not the target's.

  Each proposed draft is accepted with probability ``acceptance`` (a traced
  float32 scalar), independently per position and seeded per (request,
  position), whatever the target says; after the accepted prefix the target's
  own token at that position (``target_BK1``: argmax or sample) is committed.
  Speedup vs acceptance, K and batch can then be measured for any model
  shape with random weights, apart from draft quality (as vLLM's
  ``--speculative-config`` rejection sampler offers for the same reason).
  """
  k = target_BK1.shape[1] - 1
  positions_BK = length_B[:, None] + jnp.arange(k)[None, :]
  u_BK = sampling.uniform(sampling.position_keys(keys_B2, positions_BK, sampling.ACCEPT))
  ok_BK = (u_BK < acceptance) & _proposed_mask(num_proposed_B, k)
  n_B = _num_leading(ok_BK)
  return n_B, _take_row(target_BK1, n_B)


def expected_acceptance(p_BKV, q_BKV, draft_BK):
  """sum_v min(p, q) per draft slot [B, K]; one-hot q (None) gives p(d)."""
  if q_BKV is None:
    return jnp.take_along_axis(p_BKV, draft_BK[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.minimum(p_BKV, q_BKV), axis=-1)
