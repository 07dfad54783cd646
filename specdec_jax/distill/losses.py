"""Distillation losses against the target's stored top-k distributions.

The teacher is the target's top-k (ids, log-probs) per position; its mass
outside the top-k (``tail``) is known but not where it lies. The draft's
distribution q is over its head (all V tokens, or a restricted head of N).

- Forward KL(p || q) over the teacher's top-k tokens that the head covers:
  sum_k p_k (log p_k - log q_k). (Teacher tokens outside a restricted head
  have q = 0 by construction; no training can change that, so they are left
  out instead of making the loss infinite.)
- Total variation TV(p, q) = sum_v |p_v - q_v| / 2. With greedy or rejection
  sampling the chance that a draft token is accepted is 1 - TV, so TV tracks
  acceptance directly. Outside the top-k, sum |p - q| is taken as
  |tail - q_rest| (exact when the draft's leftover mass and the tail sit on
  the same tokens; a lower bound otherwise; small for a good k).
"""

import jax
import jax.numpy as jnp

LOSSES = ("kl", "tv", "kl+tv")


def distill_metrics(logits_BTN: jax.Array, teacher_head_BTk: jax.Array,
                    teacher_logp_BTk: jax.Array, mask_BT: jax.Array) -> dict:
  """Masked means of kl, tv and top1 (greedy agreement) over trained positions.

  Args:
    logits_BTN: the draft's float32 logits over its head (N = V for a full head).
    teacher_head_BTk: int32 head index of each teacher token, -1 if the head
      does not cover it (or padding).
    teacher_logp_BTk: float32 teacher log-probs, sorted descending.
    mask_BT: float32, 1 where position t is trained.
  """
  log_q_BTN = jax.nn.log_softmax(logits_BTN.astype(jnp.float32), axis=-1)
  covered_BTk = teacher_head_BTk >= 0
  logp_BTk = jnp.where(jnp.isfinite(teacher_logp_BTk), teacher_logp_BTk, -jnp.inf)
  p_BTk = jnp.exp(logp_BTk)
  log_q_BTk = jnp.take_along_axis(log_q_BTN, jnp.maximum(teacher_head_BTk, 0), axis=-1)
  q_BTk = jnp.where(covered_BTk, jnp.exp(log_q_BTk), 0.0)

  safe_logp_BTk = jnp.where(covered_BTk, logp_BTk, 0.0)
  kl_BT = jnp.sum(jnp.where(covered_BTk, p_BTk * (safe_logp_BTk - log_q_BTk), 0.0), axis=-1)
  tail_BT = jnp.maximum(1.0 - jnp.sum(p_BTk, axis=-1), 0.0)
  q_rest_BT = jnp.maximum(1.0 - jnp.sum(q_BTk, axis=-1), 0.0)
  tv_BT = 0.5 * (jnp.sum(jnp.abs(p_BTk - q_BTk), axis=-1) + jnp.abs(tail_BT - q_rest_BT))
  top1_BT = (jnp.argmax(log_q_BTN, axis=-1) == teacher_head_BTk[..., 0]).astype(jnp.float32)

  count = jnp.maximum(jnp.sum(mask_BT), 1.0)
  mean = lambda x_BT: jnp.sum(x_BT * mask_BT) / count
  return {"kl": mean(kl_BT), "tv": mean(tv_BT), "top1": mean(top1_BT)}


def total_loss(kind: str, metrics: dict) -> jax.Array:
  """The scalar optimised for ``config.distill.loss``."""
  if kind == "kl":
    return metrics["kl"]
  if kind == "tv":
    return metrics["tv"]
  if kind == "kl+tv":
    return metrics["kl"] + metrics["tv"]
  raise ValueError(f"config.distill.loss={kind!r}; expected one of {LOSSES}")
