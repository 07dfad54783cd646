"""The drafter interface: what every draft source gets and returns."""

from typing import Any, Protocol

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
    None for a deterministic (one-hot) proposal.
  num_proposed_B: int32 in [0, K]: how many drafts the row really proposes.
  shadow_B: int32 [B] or None: for a deterministic source (prompt lookup), how
    many of draft_BK are real candidates even where the policy let the row
    propose none. They are never verified; once the step commits its token,
    the auto policy learns from whether the first would have been right (the
    candidates depend only on committed text, so this keeps every rule exact).
  """

  draft_BK: jax.Array
  q_BKV: jax.Array | None
  num_proposed_B: jax.Array
  shadow_B: jax.Array | None = None


class Drafter(Protocol):
  """A draft source. Params and state are pytrees; every method is pure.

  A drafter that conditions on the target's hidden states (EAGLE-style,
  ``FeatureDrafter``) also sets ``reads_target_features = True`` and has
  ``record_features(state, hidden_BTD, positions_BT) -> state``: the decode
  loop calls it after every target pass (prefill, before ``prefill``; each
  verify) with that pass's final-normed hidden states.
  """

  name: str

  def init_state(self, batch_size: int, num_slots: int) -> Any:
    """Drafter state (e.g. a KV cache) for B rows and S slots."""

  def prefill(self, params: Any, state: Any, prompt_BT: jax.Array,
              positions_BT: jax.Array) -> Any:
    """Ingests the (right-padded) prompts."""

  def propose(self, params: Any, state: Any, ctx: DraftContext, k: int, *,
              greedy: bool, purpose: int) -> tuple[Proposal, Any]:
    """Proposes K=k drafts per row and returns the updated state.

    On entry ``state`` may lack the last two committed tokens (after a full
    acceptance the drafter has not seen the last draft nor the bonus token);
    the drafter must ingest them. ``purpose`` is the sampling purpose of the
    draft's random draws (TARGET for the coupled rule, DRAFT otherwise).
    """
