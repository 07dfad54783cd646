"""A small transformer as the drafter, run K single-token steps under scan."""

import dataclasses

import jax.numpy as jnp

from specdec_jax.drafters import tree_expansion
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
  slot under ``lax.scan``. ``propose_tree`` grows a draft tree instead
  (``tree_expansion``); its nodes live in scratch slots, so it re-feeds the
  last k + 1 committed tokens, whatever was accepted.
  """

  model: Transformer
  name: str = "model"
  resync_all_drafts: bool = False
  builds_trees = True   # a class constant, not a field: ``propose_tree``
  samples_trees = True

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

  def _resync(self, params, cache, ctx: DraftContext, width: int):
    """Feeds positions length-width .. length-1 (clamped at 0: a repeated
    position 0 rewrites the same entry with the same token); returns the
    logits for position length and the cache."""
    pos_BR = jnp.maximum(ctx.length_B[:, None] - width + jnp.arange(width), 0)
    tok_BR = jnp.take_along_axis(ctx.tokens_BS, pos_BR, axis=1)
    logits_BRV, cache = self.model.apply(params, tok_BR, pos_BR, cache)
    return logits_BRV[:, -1], cache

  def tree_scratch_slots(self, k: int, num_nodes: int, topk: int) -> int:
    del num_nodes
    return tree_expansion.scratch_slots(k, topk)

  def propose_tree(self, params, state, ctx: DraftContext, k: int, num_nodes: int,
                   topk: int, *, greedy: bool, purpose: int, sampled: bool = False):
    del purpose   # sampled candidates use the DRAFT purpose (tree_expansion)
    root_logits_BV, cache = self._resync(params, state, ctx, k + 1)

    def advance(cache, tokens_BT, positions_BT, slots_BT, visible_BTS, parent_slot_BT):
      del parent_slot_BT   # the cache holds all a node's context
      return self.model.apply(params, tokens_BT, positions_BT, cache, slots_BT=slots_BT,
                              visible_BTS=visible_BTS)

    return tree_expansion.expand_tree(ctx, k, num_nodes, topk, root_logits_BV, cache, advance,
                                      num_slots=cache.num_slots, greedy=greedy,
                                      sampled=sampled)

  def propose(self, params, state, ctx: DraftContext, k: int, *, greedy: bool,
              purpose: int):
    length_B = ctx.length_B
    logits_BV, cache = self._resync(params, state, ctx, k + 1 if self.resync_all_drafts else 2)

    def advance(cache, token_B, i):
      logits_B1V, cache = self.model.apply(params, token_B[:, None],
                                           (length_B + i)[:, None], cache)
      return logits_B1V[:, 0], cache

    return draft_chain(ctx, k, logits_BV, cache, advance, greedy=greedy, purpose=purpose)
