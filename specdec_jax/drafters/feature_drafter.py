"""Drafts with a feature-conditioned draft (EAGLE-style, models/feature_draft.py).

The drafter keeps the target's features f_j (``features_BSD``, slot j holds
the feature of position j) next to its own KV cache. The decode loop records
them after every target pass (prefill and verify: ``record_features``); they
follow the cache invariant: written for a whole block, valid below the
committed length minus one (the last committed token, the target's
correction or bonus, has not been through the target yet), stale above and
never read there.

Each propose:
1. Resync: one block over the last K+1 committed positions
   (length-K-1 .. length-1), with the target's true features. Since the last
   propose at most K+1 tokens were committed, and the cache there holds
   entries computed from the draft's own estimates; the block rewrites them
   (and harmlessly rewrites older ones). Its last output drafts slot 0.
2. ``chain.draft_chain``: one single-token step per further slot under
   ``lax.scan``, each feeding back the draft's own estimate g in place of the
   target's unknown feature; once every row has stopped proposing, the steps
   skip the forward pass (``lax.cond``).

``propose_tree`` grows a draft tree instead (``tree_expansion``, as the draft
model does): after the same resync, each frontier node is fed with its
parent's estimate g (the root's children with the resync's last output),
and the nodes' own estimates are kept per scratch slot for their children.
The target's features of the accepted path come back from the tree's verify
pass like a chain's (``decode._verify_tree``).
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from specdec_jax.drafters import tree_expansion
from specdec_jax.drafters.base import DraftContext, Drafter
from specdec_jax.drafters.chain import draft_chain
from specdec_jax.models.feature_draft import FeatureDraft
from specdec_jax.models.kv_cache import KVCache


@flax.struct.dataclass
class FeatureDrafterState:
  """The draft's KV cache and the target's features per position."""

  cache: KVCache
  features_BSD: jax.Array


def _prev_features(features_BSD, positions_BT):
  """f_{t-1} for each position t (zeros at t = 0): [B, T, D]."""
  prev_BT = jnp.maximum(positions_BT - 1, 0)
  feats_BTD = jnp.take_along_axis(features_BSD, prev_BT[..., None], axis=1)
  return jnp.where((positions_BT > 0)[..., None], feats_BTD, 0.0).astype(features_BSD.dtype)


@dataclasses.dataclass(frozen=True)
class FeatureDrafter(Drafter):
  """A Drafter over a FeatureDraft; it reads the target's hidden states.
  Every propose re-feeds the last K+1 committed tokens, so it is its own
  ``refeeding_all_drafts``."""

  model: FeatureDraft
  name: str = "feature"
  reads_target_features = True   # class constants, not fields
  builds_trees = True
  samples_trees = True

  @property
  def draft_model(self) -> FeatureDraft:
    return self.model

  def with_draft_model(self, model) -> "FeatureDrafter":
    return dataclasses.replace(self, model=model)

  def init_state(self, batch_size, num_slots):
    cfg = self.model.cfg
    return FeatureDrafterState(
        cache=self.model.init_cache(batch_size, num_slots),
        features_BSD=jnp.zeros((batch_size, num_slots, cfg.d_model), cfg.jnp_dtype))

  def record_features(self, state: FeatureDrafterState, hidden_BTD, positions_BT):
    """Writes the target's hidden states of a block at its positions."""
    rows_B1 = jnp.arange(hidden_BTD.shape[0])[:, None]
    features_BSD = state.features_BSD.at[rows_B1, positions_BT].set(
        hidden_BTD.astype(state.features_BSD.dtype), mode="drop")
    return state.replace(features_BSD=features_BSD)

  def prefill(self, params, state, prompt_BT, positions_BT):
    """Runs the prompts; their features must have been recorded first."""
    prev_BTD = _prev_features(state.features_BSD, positions_BT)
    _, cache = self.model.hidden(params, prompt_BT, prev_BTD, positions_BT, state.cache)
    return state.replace(cache=cache)

  def _resync(self, params, state: FeatureDrafterState, ctx: DraftContext, k: int):
    """Feeds positions length-k-1 .. length-1 (clamped at 0) with the target's
    features; returns g_B1D at position length - 1 and the draft cache."""
    offsets_K1 = jnp.arange(k + 1) - k           # -k .. 0
    pos_BK1 = jnp.maximum(ctx.length_B[:, None] - 1 + offsets_K1[None, :], 0)
    tok_BK1 = jnp.take_along_axis(ctx.tokens_BS, pos_BK1, axis=1)
    g_BK1D, cache = self.model.hidden(params, tok_BK1, _prev_features(state.features_BSD, pos_BK1),
                                      pos_BK1, state.cache)
    return g_BK1D[:, -1:], cache

  def tree_scratch_slots(self, k: int, num_nodes: int, topk: int) -> int:
    del num_nodes
    return tree_expansion.scratch_slots(k, topk)

  def propose_tree(self, params, state: FeatureDrafterState, ctx: DraftContext, k: int,
                   num_nodes: int, topk: int, *, greedy: bool, purpose: int,
                   sampled: bool = False):
    del purpose   # sampled candidates use the DRAFT purpose (tree_expansion)
    g_B1D, cache = self._resync(params, state, ctx, k)
    num_slots = cache.num_slots
    scratch = tree_expansion.scratch_slots(k, topk)
    start = num_slots - scratch
    rows_B1 = jnp.arange(g_B1D.shape[0])[:, None]

    def advance(carry, tokens_BT, positions_BT, slots_BT, visible_BTS, parent_slot_BT):
      cache, g_BXD = carry      # g of the node fed into scratch slot start + x
      parent_g_BTD = jnp.where((parent_slot_BT >= 0)[..., None],
                               g_BXD[rows_B1, jnp.clip(parent_slot_BT - start, 0, scratch - 1)],
                               g_B1D)
      g_BTD, cache = self.model.hidden(params, tokens_BT, parent_g_BTD, positions_BT, cache,
                                       slots_BT=slots_BT, visible_BTS=visible_BTS)
      g_BXD = g_BXD.at[rows_B1, slots_BT - start].set(g_BTD, mode="drop")
      return self.model.logits(params, g_BTD), (cache, g_BXD)

    g_BXD = jnp.zeros((g_B1D.shape[0], max(scratch, 1), g_B1D.shape[-1]), g_B1D.dtype)
    proposal, (cache, _) = tree_expansion.expand_tree(
        ctx, k, num_nodes, topk, self.model.logits(params, g_B1D)[:, 0], (cache, g_BXD),
        advance, num_slots=num_slots, greedy=greedy, sampled=sampled)
    return proposal, state.replace(cache=cache)

  def propose(self, params, state: FeatureDrafterState, ctx: DraftContext, k: int, *,
              greedy: bool, purpose: int):
    length_B = ctx.length_B
    g_B1D, cache = self._resync(params, state, ctx, k)

    def advance(carry, token_B, i):
      cache, g_B1D = carry
      g_B1D, cache = self.model.hidden(params, token_B[:, None], g_B1D,
                                       (length_B + i)[:, None], cache)
      return self.model.logits(params, g_B1D)[:, 0], (cache, g_B1D)

    proposal, (cache, _) = draft_chain(ctx, k, self.model.logits(params, g_B1D)[:, 0],
                                       (cache, g_B1D), advance, greedy=greedy, purpose=purpose)
    return proposal, state.replace(cache=cache)
