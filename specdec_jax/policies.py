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
"""

import flax.struct
import jax
import jax.numpy as jnp

POLICIES = ("fixed", "threshold", "adaptive", "budget")
_EMA = 0.7  # weight of the past in the per-row acceptance estimate


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
                     accept_rate_B=jnp.full((batch_size,), 0.5, jnp.float32))


def draft_limit(policy: str, state: PolicyState, k: jax.Array, budget: jax.Array,
                active_B: jax.Array, k_max: int) -> jax.Array:
  """k_b per row (int32 [B]); 0 for inactive rows."""
  batch = active_B.shape[0]
  if policy in ("fixed", "threshold"):
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


def update(policy: str, state: PolicyState, n_B, num_proposed_B, active_B, k) -> PolicyState:
  """Moves the per-row state after a step with n_B accepted of num_proposed_B."""
  proposed_B = num_proposed_B > 0
  rate_B = n_B.astype(jnp.float32) / jnp.maximum(num_proposed_B, 1)
  new_rate_B = _EMA * state.accept_rate_B + (1 - _EMA) * rate_B
  accept_rate_B = jnp.where(active_B & proposed_B, new_rate_B, state.accept_rate_B)
  k_B = state.k_B
  if policy == "adaptive":
    full_B = n_B >= num_proposed_B
    grown_B = jnp.where(full_B, k_B + 1, k_B - 1)
    grown_B = jnp.where(proposed_B, grown_B, k_B)  # nothing proposed: no news
    k_B = jnp.where(active_B, jnp.clip(grown_B, 1, k), k_B)
  return PolicyState(k_B=k_B.astype(jnp.int32), accept_rate_B=accept_rate_B)
