"""Draft-length policies: a per-row draft length k_b <= K_max every step.

Shapes never change: the drafter always fills K_max slots and a row's slots
beyond its k_b are treated as not proposed (never accepted), so every policy
runs the same compiled code and every exact rule stays exact.

- fixed: k_b = k.
- threshold: k_b = k, and the drafter stops at the first slot whose
  confidence (top draft probability) is below tau.
- adaptive: k_b grows by one after a full acceptance and shrinks by one after
  a rejection, within [1, k]; per-row state on device.
- budget: at most ``budget`` draft tokens per step for the whole batch, given
  to the (row, slot) pairs with the largest predicted acceptance a_b^(j+1),
  where a_b is a running estimate of row b's acceptance rate.
- auto: never speculate at a loss. From the costs measured on this machine
  (``Costs``: a verify pass at each static width and one draft token, in
  plain decode steps) and row b's running acceptance a_b, k_b is the k in
  0..k that maximises the predicted tokens per unit of time,
  (1 + a_b + .. + a_b^k) / (verify(k + 1) + k c), with k_b = 0 (plain
  decoding for that row) unless that beats a plain step by ``AUTO_MARGIN``.
  A row that stopped drafting has its estimate pulled back towards the
  prior (``AUTO_RECOVERY`` per step), so it tries again after a while and
  its estimate follows the text.
"""

import flax.struct
import jax
import jax.numpy as jnp

POLICIES = ("fixed", "threshold", "adaptive", "budget", "auto")
_EMA = 0.7  # weight of the past in the per-row acceptance estimate
_PRIOR = 0.5  # the acceptance estimate a row starts from
AUTO_MARGIN = 1.02   # predicted gain a draft must bring over a plain step
AUTO_RECOVERY = 0.05  # per idle step, a non-drafting row's estimate moves this far to the prior


@flax.struct.dataclass
class Costs:
  """Measured costs, in plain decode steps (traced: new figures never recompile).

  verify_W: float32 [num widths], a verify pass at each of the loop's static
    widths (``DecodeSpec.verify_widths``; 1.0 at width 1).
  draft: float32 scalar, one draft token (c).
  """

  verify_W: jax.Array
  draft: jax.Array

  @classmethod
  def free(cls, num_widths: int) -> "Costs":
    """Costs of an ideal accelerator: every width costs a step, drafts are free
    (the auto policy then drafts whenever a_b > 0)."""
    return cls(verify_W=jnp.ones((num_widths,), jnp.float32), draft=jnp.float32(0.0))


@flax.struct.dataclass
class PolicyState:
  """k_B: adaptive per-row draft length; accept_rate_B: running acceptance."""

  k_B: jax.Array
  accept_rate_B: jax.Array


def validate(policy: str, tau: float, budget: int) -> None:
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
  if not 0.0 <= tau <= 1.0:
    raise ValueError(f"tau must be in [0, 1], got {tau}")
  if policy == "budget" and (int(budget) != budget or budget < 1):
    raise ValueError(f"budget must be an int >= 1 draft tokens per step, got {budget}")


def init_state(batch_size: int, k: jax.Array) -> PolicyState:
  return PolicyState(k_B=jnp.full((batch_size,), k, jnp.int32),
                     accept_rate_B=jnp.full((batch_size,), _PRIOR, jnp.float32))


def tokens_per_call(a_B: jax.Array, k_K: jax.Array) -> jax.Array:
  """Expected tokens committed by one call that verifies k drafts at
  acceptance a: 1 + a + .. + a^k, [B, K]."""
  i_K = jnp.arange(int(k_K.shape[-1]))
  powers_BK = a_B[:, None] ** (i_K[None, :] + 1).astype(jnp.float32)
  return 1.0 + jnp.cumsum(powers_BK, axis=1) * (k_K[None, :] >= 1)


def auto_k(accept_rate_B: jax.Array, k: jax.Array, costs: Costs, widths: tuple[int, ...],
           k_max: int) -> jax.Array:
  """The auto policy's k_b: the most tokens per unit of time, or 0."""
  k_K = jnp.arange(1, k_max + 1)
  width_index_K = jnp.sum(jnp.asarray(widths)[None, :] < (k_K[:, None] + 1), axis=1)
  cost_K = costs.verify_W[width_index_K] + k_K.astype(jnp.float32) * costs.draft
  rate_BK = tokens_per_call(accept_rate_B, k_K) / cost_K[None, :]
  rate_BK = jnp.where(k_K[None, :] <= k, rate_BK, -1.0)
  best_B = jnp.argmax(rate_BK, axis=1)
  plain_rate = 1.0 / costs.verify_W[0] if widths[0] == 1 else 0.0
  worth_B = jnp.max(rate_BK, axis=1) > AUTO_MARGIN * plain_rate
  return jnp.where(worth_B, best_B + 1, 0).astype(jnp.int32)


def draft_limit(policy: str, state: PolicyState, k: jax.Array, budget: jax.Array,
                active_B: jax.Array, k_max: int, costs: Costs | None = None,
                widths: tuple[int, ...] = ()) -> jax.Array:
  """k_b per row (int32 [B]); 0 for inactive rows."""
  batch = active_B.shape[0]
  if policy == "auto":
    k_B = auto_k(state.accept_rate_B, k, costs, widths, k_max)
  elif policy in ("fixed", "threshold"):
    k_B = jnp.full((batch,), k, jnp.int32)
  elif policy == "adaptive":
    k_B = state.k_B
  elif policy == "budget":
    slots_K = jnp.arange(k_max)
    gain_BK = state.accept_rate_B[:, None] ** (slots_K[None, :] + 1).astype(jnp.float32)
    eligible_BK = active_B[:, None] & (slots_K[None, :] < k)
    gain_BK = jnp.where(eligible_BK, gain_BK, -1.0)
    # Rank all (row, slot) pairs; a row's gains fall with the slot, so the
    # top `budget` pairs form a prefix of slots in every row.
    order = jnp.argsort(-gain_BK.reshape(-1), stable=True)
    rank_BK = jnp.zeros(batch * k_max, jnp.int32).at[order].set(
        jnp.arange(batch * k_max, dtype=jnp.int32)).reshape(batch, k_max)
    chosen_BK = eligible_BK & (rank_BK < budget)
    k_B = jnp.sum(chosen_BK, axis=1).astype(jnp.int32)
  else:
    raise ValueError(f"unknown policy {policy!r}")
  return jnp.where(active_B, jnp.minimum(k_B, k_max), 0)


def update(policy: str, state: PolicyState, n_B, num_proposed_B, active_B, k,
           shadow_B=None) -> PolicyState:
  """Moves the per-row state after a step with n_B accepted of num_proposed_B.

  ``shadow_B`` (int32 [B] or None): for rows that proposed nothing, whether a
  deterministic source's first candidate matched the committed token (1), did
  not (0), or there was none (-1); the auto policy learns from it.
  """
  proposed_B = num_proposed_B > 0
  rate_B = n_B.astype(jnp.float32) / jnp.maximum(num_proposed_B, 1)
  new_rate_B = _EMA * state.accept_rate_B + (1 - _EMA) * rate_B
  accept_rate_B = jnp.where(active_B & proposed_B, new_rate_B, state.accept_rate_B)
  if policy == "auto":
    idle_B = active_B & ~proposed_B
    if shadow_B is not None:
      observed_B = idle_B & (shadow_B >= 0)
      shadow_rate_B = _EMA * accept_rate_B + (1 - _EMA) * shadow_B.astype(jnp.float32)
      accept_rate_B = jnp.where(observed_B, shadow_rate_B, accept_rate_B)
      idle_B &= ~observed_B
    # An idle row without news drifts back to the prior and tries again.
    recovered_B = accept_rate_B + AUTO_RECOVERY * (_PRIOR - accept_rate_B)
    accept_rate_B = jnp.where(idle_B, recovered_B, accept_rate_B)
  k_B = state.k_B
  if policy == "adaptive":
    full_B = n_B >= num_proposed_B
    grown_B = jnp.where(full_B, k_B + 1, k_B - 1)
    grown_B = jnp.where(proposed_B, grown_B, k_B)  # nothing proposed: no news
    k_B = jnp.where(active_B, jnp.clip(grown_B, 1, k), k_B)
  return PolicyState(k_B=k_B.astype(jnp.int32), accept_rate_B=accept_rate_B)
