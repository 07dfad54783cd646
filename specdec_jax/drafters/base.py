"""The drafter interface: what every draft source gets and returns."""

from typing import Any

import flax.struct
import jax

from specdec_jax import sampling


@flax.struct.dataclass
class DraftContext:
  """What a drafter may read from the decode state (all traced arrays).

  tokens_BS: committed tokens; ``tokens[b, :length[b]]`` is the row's text.
  length_B: committed lengths; drafts go to positions length .. length+K-1.
  keys_B2: per-request keys (see ``sampling.position_keys``).
  sampling: warp settings shared with the target.
  max_k_B: the most drafts row b may propose this step (the policy's k_b).
  min_confidence: float32 scalar; a row stops proposing at the first slot
    whose confidence is below it (0 disables; the ``threshold`` policy).
  """

  tokens_BS: jax.Array
  length_B: jax.Array
  keys_B2: jax.Array
  sampling: sampling.SamplingParams
  max_k_B: jax.Array
  min_confidence: jax.Array


@flax.struct.dataclass
class Proposal:
  """Drafts for positions length .. length+K-1.

  draft_BK: int32 proposed tokens (slots >= num_proposed_B are ignored).
  q_BKV: float32 warped draft distributions the drafts were sampled from, or
    None for a deterministic (one-hot) proposal. For a sampled tree, node
    j's parent's q, before its earlier siblings' draws are removed.
  num_proposed_B: int32 in [0, K]: how many drafts the row really proposes.
  shadow_B: int32 [B] or None: for a deterministic source (prompt lookup), how
    many of draft_BK are real candidates even where the policy let the row
    propose none. They are never verified; once the step commits its token,
    the auto policy learns from whether the first would have been right (the
    candidates depend only on committed text, so this keeps every rule exact).
  parent_BK, depth_BK: int32 [B, N] or None: a draft tree (``tree.py``):
    ``draft_BK`` then holds N nodes, node j's parent (-1: the root) and its
    depth (1..k); the first ``num_proposed_B`` nodes are real.
  """

  draft_BK: jax.Array
  q_BKV: jax.Array | None
  num_proposed_B: jax.Array
  shadow_B: jax.Array | None = None
  parent_BK: jax.Array | None = None
  depth_BK: jax.Array | None = None


class Drafter:
  """A draft source: the base class of every drafter. Params and state are
  pytrees; every method is pure.

  Subclasses (frozen dataclasses) implement ``init_state``, ``prefill`` and
  ``propose``; the rest has defaults that a drafter overrides when it has
  the capability:

  - ``reads_target_features`` / ``record_features``: a drafter that
    conditions on the target's hidden states (EAGLE-style,
    ``FeatureDrafter``) sets it True; the decode loop then calls
    ``record_features(state, hidden_BTD, positions_BT)`` after every target
    pass (at prefill before ``prefill``; each verify) with that pass's
    final-normed hidden states.
  - ``draft_model`` / ``with_draft_model``: the draft model a drafter runs
    (None for prompt lookup), and the same drafter running another one (the
    sharding hook wraps it to pin its cache's layout).
  - ``refeeding_all_drafts``: the same drafter, made to re-feed every token
    the last step committed, for a wrapper (``HybridDrafter``) whose steps
    commit drafts this drafter never saw.
  """

  name: str = "drafter"
  reads_target_features: bool = False
  builds_trees: bool = False   # implements ``propose_tree``
  samples_trees: bool = False   # ``propose_tree(sampled=True)`` draws from q

  def init_state(self, batch_size: int, num_slots: int) -> Any:
    """Drafter state (e.g. a KV cache) for B rows and S slots."""
    raise NotImplementedError

  def prefill(self, params: Any, state: Any, prompt_BT: jax.Array,
              positions_BT: jax.Array) -> Any:
    """Ingests the (right-padded) prompts."""
    raise NotImplementedError

  def propose(self, params: Any, state: Any, ctx: DraftContext, k: int, *,
              greedy: bool, purpose: int) -> tuple[Proposal, Any]:
    """Proposes K=k drafts per row and returns the updated state.

    On entry ``state`` may lack the last two committed tokens (after a full
    acceptance the drafter has not seen the last draft nor the bonus token);
    the drafter must ingest them. ``purpose`` is the sampling purpose of the
    draft's random draws (TARGET for the coupled rule, DRAFT otherwise).
    """
    raise NotImplementedError

  def propose_tree(self, params: Any, state: Any, ctx: DraftContext, k: int,
                   num_nodes: int, topk: int, *, greedy: bool, purpose: int,
                   sampled: bool = False) -> tuple[Proposal, Any]:
    """A draft tree of ``num_nodes`` nodes, depth <= k (and <= each row's
    ``ctx.max_k_B``), ``topk`` branches (``builds_trees`` drafters).
    ``sampled``: children drawn from the draft's q, which the proposal
    carries (``samples_trees`` drafters; ``tree_expansion``)."""
    raise NotImplementedError(f"the {self.name!r} drafter does not build draft trees")

  def tree_scratch_slots(self, k: int, num_nodes: int, topk: int) -> int:
    """Slots at the end of the buffer that ``propose_tree`` feeds into its own
    state (a draft model's cache); the buffer holds max(N + 1, this) past
    the text. Default: none."""
    del k, num_nodes, topk
    return 0

  def record_features(self, state: Any, hidden_BTD: jax.Array,
                      positions_BT: jax.Array) -> Any:
    """Takes the target's hidden states of a pass (default: not read)."""
    del hidden_BTD, positions_BT
    return state

  @property
  def draft_model(self) -> Any:
    """The draft model this drafter runs, or None (default: none)."""
    return None

  def with_draft_model(self, model: Any) -> "Drafter":
    """This drafter running ``model`` instead (default: it runs none)."""
    del model
    return self

  def refeeding_all_drafts(self) -> "Drafter":
    """This drafter re-feeding every committed token of the last step
    (default: it keeps no per-token state, so itself)."""
    return self
