"""A chain of K drafts from a draft model, one slot per ``lax.scan`` step.

Both model-based drafters (``ModelDrafter``, ``FeatureDrafter``) first run a
resync block that yields the draft's logits for slot 0, then share this
loop: step i picks slot i's token from the current logits (argmax, or a
sample from the warped distribution q, which is kept for the acceptance
rule), and while some row still proposes runs the draft one token further
for slot i + 1. Once every row has stopped (its k_b reached, or its
confidence below the threshold policy's tau) the remaining steps skip the
forward pass (``lax.cond``). The pick is one piece of code in the scan body,
so it is compiled once, whatever K.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.drafters.base import DraftContext, Proposal


def _confidence(logits_BV, temperature):
  """Top probability at max(temperature, 1): meaningful in greedy mode too."""
  t = jnp.maximum(temperature, 1.0)
  return jnp.max(jax.nn.softmax(logits_BV / t, axis=-1), axis=-1)


def pick_draft(logits_BV, ctx: DraftContext, i, *, greedy: bool, purpose: int):
  """Draft slot i (position length + i) from a model's next-token logits.

  Returns (token_B, q_BV or None in greedy mode, proposing_B): q is the
  warped distribution the token was sampled from; a row proposes while
  i < its k_b and the confidence clears ``ctx.min_confidence``.
  """
  if greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    q_BV = None
  else:
    q_BV = sampling.warp(logits_BV, ctx.sampling, sampled=True)
    keys = sampling.position_keys(ctx.keys_B2, ctx.length_B + i, purpose)
    token_B = sampling.sample(q_BV, keys)
  confident_B = jax.lax.cond(
      ctx.min_confidence > 0,
      lambda: _confidence(logits_BV, ctx.sampling.temperature) >= ctx.min_confidence,
      lambda: jnp.ones(token_B.shape, bool))
  return token_B, q_BV, (i < ctx.max_k_B) & confident_B


Advance = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def draft_chain(ctx: DraftContext, k: int, logits_BV: jax.Array, state: Any,
                advance: Advance, *, greedy: bool, purpose: int) -> tuple[Proposal, Any]:
  """Slots 0..k-1 under one scan; returns (Proposal, the draft's state).

  Args:
    logits_BV: the draft's float32 logits for slot 0.
    state: the draft's state (its cache, ...), threaded through ``advance``.
    advance: ``(state, token_B, i) -> (logits_BV, state)``: feeds slot i's
      token (position length + i) and returns the logits for slot i + 1.
  """
  batch = logits_BV.shape[0]

  def step(carry, i):
    logits_BV, state, proposing_B = carry
    token_B, q_BV, now_B = pick_draft(logits_BV, ctx, i, greedy=greedy, purpose=purpose)
    proposing_B = proposing_B & now_B
    logits_BV, state = jax.lax.cond(
        jnp.any(proposing_B) & (i + 1 < k),
        lambda s: advance(s, token_B, i),
        lambda s: (jnp.zeros_like(logits_BV), s), state)
    return (logits_BV, state, proposing_B), (token_B, q_BV, proposing_B)

  (_, state, _), (tokens_KB, q_KBV, proposing_KB) = jax.lax.scan(
      step, (logits_BV.astype(jnp.float32), state, jnp.ones((batch,), bool)), jnp.arange(k))
  draft_BK = jnp.moveaxis(tokens_KB, 0, 1)
  q_BKV = None if q_KBV is None else jnp.moveaxis(q_KBV, 0, 1)
  num_proposed_B = jnp.sum(proposing_KB, axis=0).astype(jnp.int32)
  return Proposal(draft_BK=draft_BK, q_BKV=q_BKV, num_proposed_B=num_proposed_B), state
