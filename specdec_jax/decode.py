"""The decode loop: prefill, the speculative step, the compiled while_loop.

One step for all B rows (docs/design.md): draft -> verify -> accept -> commit ->
resync. Plain autoregressive decoding is the same step with K = 0, so the
baseline and the speculative path share every line that matters.

Everything inside ``generate_loop`` has a static shape: acceptance changes
lengths and masks, never shapes, so nothing recompiles after warm-up and the
whole generation is one ``lax.while_loop`` with no host round trips.
The phases ``draft_phase`` and ``verify_phase`` are also jitted on their own
for the Python-driven mode (streaming, traces): same functions, no second
implementation.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from specdec_jax import policies
from specdec_jax import sampling
from specdec_jax import tree
from specdec_jax import verify
from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.models import kv_cache
from specdec_jax.models.kv_cache import KVCache
from specdec_jax.models.transformer import Transformer

RUNNING, FINISHED_EOS, FINISHED_LENGTH = 0, 1, 2
FINISH_REASONS = {RUNNING: "running", FINISHED_EOS: "eos", FINISHED_LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Everything static about a compiled generate function.

  k_max: draft slots per step (0 = plain decoding). The effective k and the
    policy's per-row k_b vary at run time inside it without recompiling.
  num_slots: S, cache/token buffer length = max_prompt + max_new + the widest
    verify width (k_max + 1 unless padded wider).
  max_new_tokens: cap on generated tokens per row (sizes the stats buffers).
  """

  batch_size: int
  k_max: int
  num_slots: int
  max_new_tokens: int
  eos_ids: tuple[int, ...]
  greedy: bool
  rule: str = "rejection"
  policy: str = "fixed"
  typical_epsilon: float = 0.09
  typical_alpha: float = 0.3
  # Verify widths the loop chooses from each step: the smallest that holds
  # every active row's drafts plus one token (``default_verify_widths``).
  verify_widths: tuple[int, ...] = (1,)
  # Draft trees (tree.py): N nodes per row (0: chains of k_max drafts),
  # depth <= k_max, tree_topk branches; the widths are then (1, N + 1).
  tree_nodes: int = 0
  tree_topk: int = 1
  tree_candidates: str = "topk"   # or "sampled" (tree.TREE_CANDIDATES)

  def __post_init__(self):
    check_verify_widths(self.verify_widths, self.k_max)
    tree.check_settings(self.tree_nodes, self.tree_topk, self.k_max)
    tree.check_candidates(self.tree_candidates)


def default_verify_widths(k_max: int) -> tuple[int, ...]:
  """1 (a step where no row drafted costs a plain step) and K_max + 1.

  On the 2-core CPU this project is measured on, a target pass costs about
  the same for 2 to 8 tokens (the CPU matmul kernel: 1.0-1.2 plain steps;
  XLA's dot: ~1.6, flat in the width), so intermediate widths buy little and
  each one is another copy of the target's forward in the compiled loop."""
  return (1,) if k_max == 0 else (1, k_max + 1)


def check_verify_widths(widths, k_max: int) -> None:
  """ValueError unless ``widths`` are ascending ints >= 1 whose last holds
  k_max drafts plus the token (>= k_max + 1). A width beyond k_max + 1 pads
  the block: its extra rows are computed and ignored
  (``matched_verify_widths``)."""
  widths = tuple(widths)
  if (not widths or any(not isinstance(w, int) or isinstance(w, bool) for w in widths)
      or list(widths) != sorted(set(widths)) or widths[0] < 1 or widths[-1] < k_max + 1):
    raise ValueError(f"verify_widths={widths} must be ascending ints >= 1 ending at "
                     f">= k_max + 1 = {k_max + 1}")


def matched_verify_widths(k_max: int) -> tuple[int, ...]:
  """The numerics-matched mode's one width, k_max + 1.

  Every target call of the loop then has the same shape, and so does the
  plain baseline's when it is built with the same width (k_max = 0, each
  step's token padded to k_max + 1 rows): every token of both decodes comes
  from the same compiled computation at the same shapes, so greedy (and
  coupled) speculative output equals plain output bit for bit in any dtype,
  where the default widths let bf16 rounding differ between a 1-row and a
  (K+1)-row pass and flip an argmax at a near-tie. (It relies on a row's
  result not depending on which row of the pass it is: true of the kernels
  XLA uses, whose reduction order is set by the shapes.) It costs the plain
  baseline a (k_max + 1)-row pass per token and the speculative loop its
  width-1 steps."""
  return (k_max + 1,)


@flax.struct.dataclass
class Batch:
  """One compiled call's requests, right-padded to static shapes (rows past
  the real requests are inactive).

  prompt_BT: int32 prompts, padded to the bucket length T.
  prompt_len_B: int32 prompt lengths (1 for padding rows).
  max_new_B: int32 new-token budget per row.
  keys_B2: per-request PRNG keys (``sampling.position_keys``).
  active_B: bool, True for real requests.
  """

  prompt_BT: jax.Array
  prompt_len_B: jax.Array
  max_new_B: jax.Array
  keys_B2: jax.Array
  active_B: jax.Array


@flax.struct.dataclass
class RunParams:
  """Traced run-time settings: changing any of them never recompiles."""

  sampling: sampling.SamplingParams
  k: jax.Array               # int32 scalar, effective K (<= k_max)
  tau: jax.Array             # float32 scalar, threshold policy's confidence bound
  budget: jax.Array          # int32 scalar, budget policy's draft tokens per step
  costs: policies.Costs      # measured costs the auto policy weighs
  synthetic_acceptance: jax.Array  # float32 scalar, rule="synthetic" only


@flax.struct.dataclass
class Stats:
  """Fixed-size on-device statistics.

  accepted_TB: accepted drafts per step and row (-1 where the row was idle).
  proposed_TB: drafts proposed per step and row (the effective k_b).
  width_T: the verify width each step ran (0 after the loop ended).
  reached_BK: times draft slot i was evaluated (proposed, all before accepted).
  accepted_BK: times draft slot i was accepted.
  expected_accept_BK: sum of sum_v min(p, q) over evaluated slots.
  target_calls_B: verify calls while the row was active.
  """

  accepted_TB: jax.Array
  proposed_TB: jax.Array
  width_T: jax.Array
  reached_BK: jax.Array
  accepted_BK: jax.Array
  expected_accept_BK: jax.Array
  target_calls_B: jax.Array


@flax.struct.dataclass
class DecodeState:
  """The loop carry. ``tokens_BS[b, :length_B[b]]`` is row b's committed text."""

  tokens_BS: jax.Array
  length_B: jax.Array
  prompt_len_B: jax.Array
  max_new_B: jax.Array
  finish_B: jax.Array
  keys_B2: jax.Array
  target_cache: KVCache
  drafter_state: Any
  policy_state: policies.PolicyState
  step: jax.Array
  stats: Stats


@flax.struct.dataclass
class DecodeOutput:
  """What generate_loop returns: the state without caches (no large copy back)."""

  tokens_BS: jax.Array
  length_B: jax.Array
  prompt_len_B: jax.Array
  finish_B: jax.Array
  stats: Stats


def _init_stats(spec: DecodeSpec) -> Stats:
  b, k, t = spec.batch_size, spec.k_max, spec.max_new_tokens
  return Stats(
      accepted_TB=jnp.full((t, b), -1, jnp.int32),
      proposed_TB=jnp.zeros((t, b), jnp.int32),
      width_T=jnp.zeros((t,), jnp.int32),
      reached_BK=jnp.zeros((b, k), jnp.int32),
      accepted_BK=jnp.zeros((b, k), jnp.int32),
      expected_accept_BK=jnp.zeros((b, k), jnp.float32),
      target_calls_B=jnp.zeros((b,), jnp.int32))


def prefill(spec: DecodeSpec, target: Transformer, drafter: Drafter | None,
            target_params, draft_params, requests: Batch, run: RunParams) -> DecodeState:
  """Writes the right-padded prompts into both caches; no token is sampled.

  Padding tokens land in slots >= prompt_len, which the invariant treats as
  stale. The first step re-feeds the last prompt token to get its logits.
  """
  prompt_BT = requests.prompt_BT
  batch, prompt_slots = prompt_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(prompt_slots, dtype=jnp.int32), prompt_BT.shape)
  cache = target.init_cache(batch, spec.num_slots)
  _, hidden_BTD, cache = target.apply_with_hidden(target_params, prompt_BT, positions_BT, cache)
  drafter_state = ()
  if drafter is not None and spec.k_max > 0:
    drafter_state = drafter.init_state(batch, spec.num_slots)
    if reads_target_features(drafter):
      drafter_state = drafter.record_features(drafter_state, hidden_BTD, positions_BT)
    drafter_state = drafter.prefill(draft_params, drafter_state, prompt_BT, positions_BT)
  tokens_BS = jnp.zeros((batch, spec.num_slots), jnp.int32)
  tokens_BS = tokens_BS.at[:, :prompt_slots].set(prompt_BT)
  finish_B = jnp.where(requests.active_B, RUNNING, FINISHED_LENGTH).astype(jnp.int32)
  return DecodeState(
      tokens_BS=tokens_BS, length_B=requests.prompt_len_B, prompt_len_B=requests.prompt_len_B,
      max_new_B=requests.max_new_B, finish_B=finish_B, keys_B2=requests.keys_B2,
      target_cache=cache, drafter_state=drafter_state,
      policy_state=policies.init_state(batch, run.k), step=jnp.int32(0),
      stats=_init_stats(spec))


def reads_target_features(drafter: Drafter | None) -> bool:
  """Whether the drafter conditions on the target's hidden states (EAGLE-style):
  the loop then hands it every target pass's ``hidden_BTD``."""
  return drafter is not None and drafter.reads_target_features


def _draft_purpose(spec: DecodeSpec) -> int:
  return sampling.TARGET if spec.rule == "coupled" else sampling.DRAFT


def empty_proposal(batch: int) -> Proposal:
  return Proposal(draft_BK=jnp.zeros((batch, 0), jnp.int32), q_BKV=None,
                  num_proposed_B=jnp.zeros((batch,), jnp.int32))


def draft_phase(spec: DecodeSpec, drafter: Drafter | None, draft_params,
                state: DecodeState, run: RunParams) -> tuple[Proposal, DecodeState]:
  """Step 1 (and 5): the drafter resyncs and proposes K_max drafts per row."""
  if drafter is None or spec.k_max == 0:
    return empty_proposal(spec.batch_size), state
  active_B = state.finish_B == RUNNING
  max_k_B = policies.draft_limit(spec.policy, state.policy_state, run.k, run.budget,
                                 active_B, spec.k_max, run.costs, spec.verify_widths)
  min_confidence = jnp.where(spec.policy == "threshold", run.tau, 0.0)
  ctx = DraftContext(tokens_BS=state.tokens_BS, length_B=state.length_B,
                     keys_B2=state.keys_B2, sampling=run.sampling, max_k_B=max_k_B,
                     min_confidence=jnp.float32(min_confidence))
  if spec.tree_nodes:
    proposal, drafter_state = drafter.propose_tree(
        draft_params, state.drafter_state, ctx, spec.k_max, spec.tree_nodes, spec.tree_topk,
        greedy=spec.greedy, purpose=_draft_purpose(spec),
        sampled=spec.tree_candidates == "sampled")
    # A tree's depth is capped by max_k_B inside; its node count is not.
    num_proposed_B = jnp.where(active_B, proposal.num_proposed_B, 0)
  else:
    proposal, drafter_state = drafter.propose(
        draft_params, state.drafter_state, ctx, spec.k_max, greedy=spec.greedy,
        purpose=_draft_purpose(spec))
    num_proposed_B = jnp.where(active_B, jnp.minimum(proposal.num_proposed_B, max_k_B), 0)
  proposal = proposal.replace(num_proposed_B=num_proposed_B.astype(jnp.int32))
  return proposal, state.replace(drafter_state=drafter_state)


def _accept(spec: DecodeSpec, proposal: Proposal, logits_BK1V, state, run):
  """Step 3: the acceptance rule on a block of K drafts (K = the verify width
  - 1). Returns (n_B, x_B, expected_BK): ``expected_BK`` is each slot's
  acceptance probability sum_v min(p, q) (in greedy mode 1 where the draft is
  the target's argmax)."""
  draft_BK, num_B = proposal.draft_BK, proposal.num_proposed_B
  if spec.rule == "synthetic":
    return _accept_synthetic(spec, proposal, logits_BK1V, state, run)
  if spec.greedy:
    n_B, x_B, target_BK1 = verify.greedy_accept(draft_BK, logits_BK1V, num_B)
    return n_B, x_B, (draft_BK == target_BK1[:, :draft_BK.shape[1]]).astype(jnp.float32)
  p_BK1V = sampling.warp(logits_BK1V, run.sampling, sampled=True)
  keys_B2, length_B = state.keys_B2, state.length_B
  if draft_BK.shape[1] == 0:
    # No draft slots (plain sampling, or a width-1 step): every exact rule
    # reduces to the target's own sample, with no residual to build.
    x_B = verify.target_samples(p_BK1V, keys_B2, length_B)[:, 0]
    return jnp.zeros_like(num_B), x_B, jnp.zeros(draft_BK.shape, jnp.float32)
  if spec.rule == "rejection":
    n_B, x_B = verify.rejection_accept(draft_BK, proposal.q_BKV, p_BK1V, num_B, keys_B2, length_B)
  elif spec.rule == "coupled":
    n_B, x_B = verify.coupled_accept(draft_BK, p_BK1V, num_B, keys_B2, length_B)
  elif spec.rule == "typical":
    n_B, x_B = verify.typical_accept(draft_BK, p_BK1V, num_B, keys_B2, length_B,
                                     spec.typical_epsilon, spec.typical_alpha)
  else:
    raise ValueError(f"unknown rule {spec.rule!r}; expected one of {verify.RULES}")
  k = draft_BK.shape[1]
  return n_B, x_B, verify.expected_acceptance(p_BK1V[:, :k], proposal.q_BKV, draft_BK)


def _accept_synthetic(spec: DecodeSpec, proposal: Proposal, logits_BK1V, state, run):
  """rule="synthetic" (greedy or sampled): drafts accepted with probability
  ``run.synthetic_acceptance``, then the target's own token (not exact)."""
  if spec.greedy:
    target_BK1 = verify.target_argmax(logits_BK1V)
  else:
    target_BK1 = verify.target_samples(sampling.warp(logits_BK1V, run.sampling, sampled=True),
                                       state.keys_B2, state.length_B)
  n_B, x_B = verify.synthetic_accept(target_BK1, proposal.num_proposed_B, state.keys_B2,
                                     state.length_B, run.synthetic_acceptance)
  expected_BK = jnp.full(proposal.draft_BK.shape, run.synthetic_acceptance, jnp.float32)
  return n_B, x_B, expected_BK


def _commit(spec: DecodeSpec, state: DecodeState, draft_BK, n_B, x_B):
  """Step 4: writes accepted drafts + x, honouring EOS and max_new per row.

  Returns the new state (without stats) and the number of tokens committed.
  """
  batch, k = draft_BK.shape
  slots_K1 = jnp.arange(k + 1)[None, :]
  emitted_BK1 = jnp.concatenate([draft_BK, jnp.zeros((batch, 1), jnp.int32)], axis=1)
  emitted_BK1 = jnp.where(slots_K1 == n_B[:, None], x_B[:, None], emitted_BK1)
  remaining_B = state.max_new_B - (state.length_B - state.prompt_len_B)
  count_B = jnp.minimum(n_B + 1, remaining_B)
  if spec.eos_ids:
    is_eos_BK1 = jnp.isin(emitted_BK1, jnp.asarray(spec.eos_ids, jnp.int32))
    is_eos_BK1 &= slots_K1 < count_B[:, None]
  else:
    is_eos_BK1 = jnp.zeros_like(emitted_BK1, bool)
  hit_eos_B = jnp.any(is_eos_BK1, axis=1)
  count_B = jnp.where(hit_eos_B, jnp.argmax(is_eos_BK1, axis=1) + 1, count_B)
  active_B = state.finish_B == RUNNING
  count_B = jnp.where(active_B, count_B, 0).astype(jnp.int32)

  positions_BK1 = state.length_B[:, None] + slots_K1
  positions_BK1 = jnp.where(slots_K1 < count_B[:, None], positions_BK1, spec.num_slots)
  rows_B1 = jnp.arange(batch)[:, None]
  tokens_BS = state.tokens_BS.at[rows_B1, positions_BK1].set(emitted_BK1, mode="drop")
  length_B = state.length_B + count_B
  out_of_budget_B = length_B - state.prompt_len_B >= state.max_new_B
  finish_B = jnp.where(active_B & hit_eos_B, FINISHED_EOS,
                       jnp.where(active_B & out_of_budget_B, FINISHED_LENGTH, state.finish_B))
  return state.replace(tokens_BS=tokens_BS, length_B=length_B,
                       finish_B=finish_B.astype(jnp.int32)), count_B


def _update_stats(stats: Stats, step, proposal: Proposal, n_B, reached_BK, expected_BK,
                  active_B, width):
  k = reached_BK.shape[1]
  slots_K = jnp.arange(k)[None, :]
  reached_BK = reached_BK & active_B[:, None]
  accepted_BK = (slots_K < n_B[:, None]) & active_B[:, None]
  return Stats(
      accepted_TB=stats.accepted_TB.at[step].set(jnp.where(active_B, n_B, -1), mode="drop"),
      proposed_TB=stats.proposed_TB.at[step].set(proposal.num_proposed_B, mode="drop"),
      width_T=stats.width_T.at[step].set(width, mode="drop"),
      reached_BK=stats.reached_BK + reached_BK,
      accepted_BK=stats.accepted_BK + accepted_BK,
      expected_accept_BK=stats.expected_accept_BK + jnp.where(reached_BK, expected_BK, 0.0),
      target_calls_B=stats.target_calls_B + active_B)


def _verify_at_width(spec: DecodeSpec, target: Transformer, width: int, in_switch: bool,
                     target_params, state: DecodeState, proposal: Proposal, run: RunParams):
  """One target pass over [last, d_0 .. d_{width-2}] and the acceptance rule.

  Every active row proposed at most width - 1 drafts (``verify_phase`` picks
  the width), so the slots beyond are never read. Returns a ``_Verified``;
  the per-slot arrays are padded to the K_max (+ 1) of the other widths.
  ``in_switch``: the pass only reads the cache and hands back its keys and
  values, padded to the widest width (zeros, never written); else it writes
  them itself (``transformer.run_blocks``: each way avoids a cache copy
  where it is used).
  """
  k = spec.k_max
  d = min(width - 1, k)   # drafts this width holds; rows beyond are padding
  sub = Proposal(draft_BK=proposal.draft_BK[:, :d],
                 q_BKV=None if proposal.q_BKV is None else proposal.q_BKV[:, :d],
                 num_proposed_B=jnp.minimum(proposal.num_proposed_B, d))
  last_B1 = jnp.take_along_axis(state.tokens_BS, state.length_B[:, None] - 1, axis=1)
  padding_BP = jnp.zeros((last_B1.shape[0], width - 1 - d), jnp.int32)
  block_BW = jnp.concatenate([last_B1, sub.draft_BK, padding_BP], axis=1)
  positions_BW = state.length_B[:, None] - 1 + jnp.arange(width)[None, :]
  if in_switch:
    logits_BWV, hidden_BWD, block = target.forward(
        target_params, block_BW, positions_BW, state.target_cache)
    widest = spec.verify_widths[-1]
    written = dict(block=kv_cache.pad_block(block, widest),
                   slots_BX=jnp.pad(positions_BW, ((0, 0), (0, widest - width)),
                                    constant_values=spec.num_slots))   # padding: dropped
  else:
    logits_BWV, hidden_BWD, target_cache = target.apply_with_hidden(
        target_params, block_BW, positions_BW, state.target_cache)
    written = dict(target_cache=target_cache)
  n_B, x_B, expected_BD = _accept(spec, sub, logits_BWV[:, :d + 1], state, run)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, k - d)] + [(0, 0)] * (x.ndim - 2))
  slots_K = jnp.arange(k)[None, :]
  reached_BK = (slots_K <= n_B[:, None]) & (slots_K < sub.num_proposed_B[:, None])
  return _Verified(n_B=n_B, x_B=x_B, committed_BK=pad(sub.draft_BK), reached_BK=reached_BK,
                   expected_BK=pad(expected_BD), hidden_BK1D=pad(hidden_BWD[:, :d + 1]),
                   **written)


def _verify_tree(spec: DecodeSpec, target: Transformer, target_params, state: DecodeState,
                 proposal: Proposal, run: RunParams):
  """One target pass over [last, the tree's N nodes] under the tree mask and
  the walk of ``tree.accept``; only the root's and the accepted path's keys
  and values are written, into the slots of their positions (docs/design.md,
  "Draft trees")."""
  tokens_BW, positions_BW, slots_BW, visible_BWS = tree.verify_block(
      state.tokens_BS, state.length_B, proposal, spec.num_slots, spec.k_max)
  logits_BWV, hidden_BWD, block = target.forward(
      target_params, tokens_BW, positions_BW, state.target_cache, slots_BT=slots_BW,
      visible_BTS=visible_BWS)
  n_B, x_B, committed_BK, path_BK, reached_BK, expected_BK = tree.accept(
      logits_BWV, proposal, state.keys_B2, state.length_B, spec.k_max, greedy=spec.greedy,
      rule=spec.rule, sampling_params=run.sampling)
  # A feature drafter's features: the root's (position length - 1) and the
  # accepted path's nodes' (length ..); past the path stale, never read.
  rows_B1 = jnp.arange(hidden_BWD.shape[0])[:, None]
  path_index_BK1 = jnp.concatenate(
      [jnp.zeros_like(path_BK[:, :1]), jnp.maximum(path_BK, 0) + 1], axis=1)
  return _Verified(n_B=n_B, x_B=x_B, committed_BK=committed_BK, reached_BK=reached_BK,
                   expected_BK=expected_BK, hidden_BK1D=hidden_BWD[rows_B1, path_index_BK1],
                   block=block, slots_BX=tree.path_slots(path_BK, state.length_B,
                                                          spec.tree_nodes, spec.num_slots))


@flax.struct.dataclass
class _Verified:
  """What one verify branch hands back: n_B accepted drafts, x_B the
  target's token, committed_BK the accepted tokens in order (then padding),
  reached_BK / expected_BK per draft slot (per depth for a tree), the pass's
  hidden states for a feature drafter, and either the written cache
  (``target_cache``: a pass outside a switch) or the pass's keys and values
  (``block``, X = the widest verify width) with the cache slot each goes to
  (``slots_BX``; S: not written), which ``verify_phase`` writes after the
  switch: a branch that wrote the cache itself would make XLA copy the
  whole cache into and out of the conditional on every step."""

  n_B: jax.Array
  x_B: jax.Array
  committed_BK: jax.Array
  reached_BK: jax.Array
  expected_BK: jax.Array
  hidden_BK1D: jax.Array
  target_cache: Any = None
  block: Any = None
  slots_BX: jax.Array | None = None


def verify_phase(spec: DecodeSpec, target: Transformer, drafter: Drafter | None,
                 target_params, state: DecodeState, proposal: Proposal,
                 run: RunParams) -> DecodeState:
  """Steps 2-4: one target call over [last, d_0 ..], accept, commit.

  The call's width is the smallest of ``spec.verify_widths`` that holds the
  most drafts any active row proposed, plus one: one ``lax.switch`` over
  static widths, so a step where no row drafted costs a plain step and
  nothing recompiles. A drafter that reads the target's features gets this
  pass's hidden states (valid for the committed positions, stale beyond:
  the cache invariant).
  """
  k = spec.k_max
  active_B = state.finish_B == RUNNING
  widths = spec.verify_widths
  if len(widths) == 1:
    index = jnp.int32(0)
    verified = _verify_at_width(spec, target, widths[0], False, target_params, state, proposal,
                                run)
    target_cache = verified.target_cache
  else:
    branches = [functools.partial(_verify_at_width, spec, target, w, True) for w in widths]
    if spec.tree_nodes:   # widths (1, N + 1): a plain step, or the tree
      branches[-1] = functools.partial(_verify_tree, spec, target)
    needed = jnp.max(jnp.where(active_B, proposal.num_proposed_B, 0)) + 1
    index = jnp.sum(jnp.asarray(widths) < needed).astype(jnp.int32)
    verified = jax.lax.switch(index, branches, target_params, state, proposal, run)
    # The one in-place write of the step's keys and values.
    target_cache = kv_cache.write_block(state.target_cache, verified.block, verified.slots_BX)
  n_B, x_B = verified.n_B, verified.x_B
  hidden_BK1D = verified.hidden_BK1D
  width = jnp.asarray(widths, jnp.int32)[index]
  if k > 0 and reads_target_features(drafter):
    slots_K1 = jnp.arange(k + 1)[None, :]
    positions_BK1 = jnp.where(slots_K1 < width, state.length_B[:, None] - 1 + slots_K1,
                              spec.num_slots)   # padding: dropped
    state = state.replace(drafter_state=drafter.record_features(
        state.drafter_state, hidden_BK1D, positions_BK1))
  stats = _update_stats(state.stats, state.step, proposal, n_B, verified.reached_BK,
                        verified.expected_BK, active_B, width)
  shadow_B = None
  if proposal.shadow_B is not None and k > 0:
    # Rows that proposed nothing but had a lookup candidate: would it have
    # been the token the target just chose? (1 right, 0 wrong, -1 no news)
    shadow_B = jnp.where((proposal.num_proposed_B == 0) & (proposal.shadow_B > 0),
                         (proposal.draft_BK[:, 0] == x_B).astype(jnp.int32), -1)
  # A tree's n_B accepted nodes are out of its depth, not its node count.
  out_of_B = tree.proposed_depth(proposal) if spec.tree_nodes else proposal.num_proposed_B
  policy_state = policies.update(spec.policy, state.policy_state, n_B, out_of_B, active_B,
                                 run.k, shadow_B)
  state = state.replace(target_cache=target_cache, policy_state=policy_state, stats=stats)
  state, _ = _commit(spec, state, verified.committed_BK, n_B, x_B)
  return state.replace(step=state.step + 1)


def step(spec, target, drafter, target_params, draft_params, state, run) -> DecodeState:
  """One speculative step for all rows (plain decoding when k_max == 0)."""
  proposal, state = draft_phase(spec, drafter, draft_params, state, run)
  return verify_phase(spec, target, drafter, target_params, state, proposal, run)


def generate_loop(spec: DecodeSpec, target: Transformer, drafter: Drafter | None,
                  target_params, draft_params, requests: Batch,
                  run: RunParams) -> DecodeOutput:
  """Prefill + the whole generation as one ``lax.while_loop``."""
  state = prefill(spec, target, drafter, target_params, draft_params, requests, run)

  def not_done(state):
    return jnp.any(state.finish_B == RUNNING) & (state.step < spec.max_new_tokens)

  def body(state):
    return step(spec, target, drafter, target_params, draft_params, state, run)

  state = jax.lax.while_loop(not_done, body, state)
  return DecodeOutput(tokens_BS=state.tokens_BS, length_B=state.length_B,
                      prompt_len_B=state.prompt_len_B, finish_B=state.finish_B,
                      stats=state.stats)
