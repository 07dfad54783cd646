"""A small transformer as the drafter, run K single-token steps under scan."""

import dataclasses

import jax.numpy as jnp

from specdec_jax.drafters.base import DraftContext, Drafter
from specdec_jax.drafters.chain import draft_chain
from specdec_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ModelDrafter(Drafter):
  """Drafts with a second decoder from the same model code.

  Its cache follows the same invariant as the target's. Each propose starts
  with a block over the last committed tokens: two of them (positions
  length-2, length-1) when only this drafter's own drafts get committed,
  which resyncs the cache after a full acceptance (the last draft and the
  bonus token were never fed) and is a harmless rewrite otherwise; K+1 of
  them with ``resync_all_drafts``, for a wrapper (HybridDrafter) whose steps
  can commit up to K drafts this model never saw. Its last logits draft
  slot 0; then ``chain.draft_chain`` runs one single-token step per further
  slot under ``lax.scan``.
  """

  model: Transformer
  name: str = "model"
  resync_all_drafts: bool = False

  @property
  def draft_model(self) -> Transformer:
    return self.model

  def with_draft_model(self, model) -> "ModelDrafter":
    return dataclasses.replace(self, model=model)

  def refeeding_all_drafts(self) -> "ModelDrafter":
    return dataclasses.replace(self, resync_all_drafts=True)

  def init_state(self, batch_size, num_slots):
    return self.model.init_cache(batch_size, num_slots)

  def prefill(self, params, state, prompt_BT, positions_BT):
    _, cache = self.model.apply(params, prompt_BT, positions_BT, state)
    return cache

  def propose(self, params, state, ctx: DraftContext, k: int, *, greedy: bool,
              purpose: int):
    length_B = ctx.length_B
    width = k + 1 if self.resync_all_drafts else 2
    # Positions length-width .. length-1 (clamped at 0: a repeated position 0
    # rewrites the same entry with the same token).
    pos_BR = jnp.maximum(length_B[:, None] - width + jnp.arange(width), 0)
    tok_BR = jnp.take_along_axis(ctx.tokens_BS, pos_BR, axis=1)
    logits_BRV, cache = self.model.apply(params, tok_BR, pos_BR, state)

    def advance(cache, token_B, i):
      logits_B1V, cache = self.model.apply(params, token_B[:, None],
                                           (length_B + i)[:, None], cache)
      return logits_B1V[:, 0], cache

    return draft_chain(ctx, k, logits_BRV[:, -1], cache, advance, greedy=greedy,
                       purpose=purpose)
