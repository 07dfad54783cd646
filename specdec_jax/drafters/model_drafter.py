"""A small transformer as the drafter, run K single-token steps under scan."""

import dataclasses

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.drafters.base import DraftContext, Proposal
from specdec_jax.models.transformer import Transformer


def _confidence(logits_BV, temperature):
  """Top probability at max(temperature, 1): meaningful in greedy mode too."""
  t = jnp.maximum(temperature, 1.0)
  return jnp.max(jax.nn.softmax(logits_BV / t, axis=-1), axis=-1)


def pick_draft(logits_BV, ctx: DraftContext, i, *, greedy: bool, purpose: int):
  """Draft slot i (position length + i) from a model's next-token logits.

  Returns (token_B, q_BV or None in greedy mode, confidence_B, proposing_B):
  q is the warped distribution the token was sampled from; a row proposes
  while i < its k_b and the confidence clears ``ctx.min_confidence``.
  """
  confidence_B = _confidence(logits_BV, ctx.sampling.temperature)
  if greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    q_BV = None
  else:
    q_BV = sampling.warp(logits_BV, ctx.sampling)
    keys = sampling.position_keys(ctx.keys_B2, ctx.length_B + i, purpose)
    token_B = sampling.sample(q_BV, keys)
  proposing_B = (i < ctx.max_k_B) & (confidence_B >= ctx.min_confidence)
  return token_B, q_BV, confidence_B, proposing_B


def stack_drafts(first, rest):
  """Slot 0's (token, q, confidence, proposing) and the scan's stacked rest
  -> [B, K, ...] arrays (None stays None)."""
  stack = lambda a, b: None if a is None else jnp.concatenate(
      [a[:, None], jnp.moveaxis(b, 0, 1)], axis=1)
  return tuple(stack(a, b) for a, b in zip(first, rest))


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
  """Drafts with a second decoder from the same model code.

  Its cache follows the same invariant as the target's. Each propose starts
  with a block over the last committed tokens: two of them (positions
  length-2, length-1) when only this drafter's own drafts get committed,
  which resyncs the cache after a full acceptance (the last draft and the
  bonus token were never fed) and is a harmless rewrite otherwise; K+1 of
  them with ``resync_all_drafts``, for a wrapper (HybridDrafter) whose steps
  can commit up to K drafts this model never saw. Then K-1 single-token
  steps run under ``lax.scan``; once every row has stopped proposing (its k_b
  reached, or confidence below the threshold) the remaining steps skip the
  forward pass with ``lax.cond``.
  """

  model: Transformer
  name: str = "model"
  resync_all_drafts: bool = False

  def init_state(self, batch_size, num_slots):
    return self.model.init_cache(batch_size, num_slots)

  def prefill(self, params, state, prompt_BT, positions_BT):
    _, cache = self.model.apply(params, prompt_BT, positions_BT, state)
    return cache

  def propose(self, params, state, ctx: DraftContext, k: int, *, greedy: bool,
              purpose: int):
    length_B = ctx.length_B
    batch = length_B.shape[0]
    vocab = self.model.cfg.vocab_size
    width = k + 1 if self.resync_all_drafts else 2
    # Positions length-width .. length-1 (clamped at 0: a repeated position 0
    # rewrites the same entry with the same token).
    pos_BR = jnp.maximum(length_B[:, None] - width + jnp.arange(width), 0)
    tok_BR = jnp.take_along_axis(ctx.tokens_BS, pos_BR, axis=1)
    logits_BRV, cache = self.model.apply(params, tok_BR, pos_BR, state)

    pick = lambda logits_BV, i: pick_draft(logits_BV, ctx, i, greedy=greedy, purpose=purpose)
    first = pick(logits_BRV[:, -1], 0)

    def step(carry, i):
      cache, prev_B, proposing_B = carry

      def run(cache):
        logits_B1V, cache = self.model.apply(
            params, prev_B[:, None], (length_B + i - 1)[:, None], cache)
        return logits_B1V[:, 0], cache

      def skip(cache):
        return jnp.zeros((batch, vocab), jnp.float32), cache

      logits_BV, cache = jax.lax.cond(jnp.any(proposing_B), run, skip, cache)
      token_B, q_BV, confidence_B, now_B = pick(logits_BV, i)
      proposing_B = proposing_B & now_B
      return (cache, token_B, proposing_B), (token_B, q_BV, confidence_B, proposing_B)

    (cache, _, _), rest = jax.lax.scan(
        step, (cache, first[0], first[3]), jnp.arange(1, k))
    draft_BK, q_BKV, confidence_BK, proposing_BK = stack_drafts(first, rest)
    num_proposed_B = jnp.sum(proposing_BK, axis=1).astype(jnp.int32)
    return Proposal(draft_BK, q_BKV, num_proposed_B, confidence_BK), cache
