"""Prompt lookup first, a draft model elsewhere (``drafter=ngram+model`` or
``ngram+feature``).

The two draft sources fail in different places. A small model loops and
repeats itself, and copies from its prompt; there the n-gram lookup is
nearly always right while a learned draft (above all a one-block feature
draft, which cannot do induction) often is not. On new text the lookup has
nothing to offer and the draft model does. So each row takes the lookup's
drafts when its text ends in an n-gram of at least ``min_match`` tokens seen
before, and the draft model's otherwise.

The choice depends only on the committed tokens, never on a random draw, so
every rule stays exact: given the text, a row's proposal distribution is the
lookup's one-hot q or the model's q, and ``q_BKV`` carries whichever it was.

The draft model keeps its own state (cache, features) up to date on every
step, whatever was drafted: each propose re-feeds the newest K+1 committed
tokens (a FeatureDrafter always does; a ModelDrafter is switched to
``resync_all_drafts``), which covers up to K accepted lookup drafts the
model never saw. Rows that take the lookup's drafts have k_b = 0 for the
model, so when every row of the batch does (a batch of 1 on a lookup step)
the model's K-1 scan steps skip their forward pass and only the resync block
runs.

Draft trees (``propose_tree``) choose the same way per row: the lookup's
branches (its best matches) or the draft model's tree.
"""

import dataclasses

import jax
import jax.numpy as jnp

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.drafters.ngram import NgramDrafter


def check_min_match(lookup: NgramDrafter, min_match) -> None:
  """ValueError unless ``min_match`` is an int n-gram size the lookup tries."""
  if not (int(min_match) == min_match and lookup.min_n <= min_match <= lookup.max_n):
    raise ValueError(
        f"lookup_min_match={min_match} must be an int in [ngram_min_n={lookup.min_n}, "
        f"ngram_max_n={lookup.max_n}]")


@dataclasses.dataclass(frozen=True)
class HybridDrafter(Drafter):
  """Lookup drafts where an n-gram of >= ``min_match`` tokens matches, the
  ``draft`` drafter's (a ModelDrafter or FeatureDrafter) elsewhere.

  Build it with ``HybridDrafter.wrap``, which makes the draft re-feed every
  token a step commits (``Drafter.refeeding_all_drafts``): lookup steps
  commit drafts the model never fed through its cache.
  """

  lookup: NgramDrafter
  draft: Drafter
  min_match: int = 2

  @classmethod
  def wrap(cls, lookup: NgramDrafter, draft: Drafter, min_match: int = 2) -> "HybridDrafter":
    return cls(lookup, draft.refeeding_all_drafts(), min_match)

  def __post_init__(self):
    check_min_match(self.lookup, self.min_match)
    if self.draft.refeeding_all_drafts() != self.draft:
      raise ValueError("HybridDrafter's draft must re-feed every committed token; "
                       "build it with HybridDrafter.wrap(lookup, draft)")

  @property
  def name(self) -> str:
    return f"ngram+{self.draft.name}"

  @property
  def draft_model(self):
    return self.draft.draft_model

  def with_draft_model(self, model) -> "HybridDrafter":
    return dataclasses.replace(self, draft=self.draft.with_draft_model(model))

  @property
  def reads_target_features(self) -> bool:
    return self.draft.reads_target_features

  @property
  def builds_trees(self) -> bool:
    return self.lookup.builds_trees and self.draft.builds_trees

  def tree_scratch_slots(self, k, num_nodes, topk):
    return self.draft.tree_scratch_slots(k, num_nodes, topk)

  def record_features(self, state, hidden_BTD, positions_BT):
    return self.draft.record_features(state, hidden_BTD, positions_BT)

  def init_state(self, batch_size, num_slots):
    return self.draft.init_state(batch_size, num_slots)

  def prefill(self, params, state, prompt_BT, positions_BT):
    return self.draft.prefill(params, state, prompt_BT, positions_BT)

  def _split(self, ctx: DraftContext, k: int):
    """(the lookup's chain, its draft count, use_lookup_B, the draft model's
    context: k_b = 0 on the rows that take the lookup's drafts)."""
    lookup_BK, lookup_num_B, match_len_B = self.lookup.lookup(ctx, k)
    use_lookup_B = match_len_B >= self.min_match
    model_ctx = ctx.replace(max_k_B=jnp.where(use_lookup_B, 0, ctx.max_k_B))
    return lookup_BK, lookup_num_B, use_lookup_B, model_ctx

  def propose_tree(self, params, state, ctx: DraftContext, k: int, num_nodes: int,
                   topk: int, *, greedy: bool, purpose: int, sampled: bool = False):
    del sampled   # the lookup's rows are deterministic: top-k trees only
    _, _, use_lookup_B, model_ctx = self._split(ctx, k)
    lookup, _ = self.lookup.propose_tree(params, (), ctx, k, num_nodes, topk,
                                         greedy=greedy, purpose=purpose)
    model, state = self.draft.propose_tree(params, state, model_ctx, k, num_nodes, topk,
                                           greedy=greedy, purpose=purpose)
    pick = lambda a, b: jnp.where(use_lookup_B[:, None], a, b).astype(jnp.int32)
    proposal = Proposal(
        draft_BK=pick(lookup.draft_BK, model.draft_BK), q_BKV=None,
        num_proposed_B=jnp.where(use_lookup_B, lookup.num_proposed_B,
                                 model.num_proposed_B).astype(jnp.int32),
        parent_BK=pick(lookup.parent_BK, model.parent_BK),
        depth_BK=pick(lookup.depth_BK, model.depth_BK))
    return proposal, state

  def propose(self, params, state, ctx: DraftContext, k: int, *, greedy: bool,
              purpose: int):
    lookup_BK, lookup_num_B, use_lookup_B, model_ctx = self._split(ctx, k)
    model, state = self.draft.propose(params, state, model_ctx, k, greedy=greedy,
                                      purpose=purpose)
    pick = lambda a, b: jnp.where(use_lookup_B.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    q_BKV = None
    if model.q_BKV is not None:
      q_BKV = pick(jax.nn.one_hot(lookup_BK, model.q_BKV.shape[-1], dtype=model.q_BKV.dtype),
                   model.q_BKV)
    proposal = Proposal(
        draft_BK=pick(lookup_BK, model.draft_BK), q_BKV=q_BKV,
        num_proposed_B=pick(lookup_num_B, model.num_proposed_B).astype(jnp.int32),
        shadow_B=jnp.where(use_lookup_B, 1, 0).astype(jnp.int32))
    return proposal, state
