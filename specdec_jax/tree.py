"""Draft trees: the verify pass's block and mask, exact acceptance on a tree
and the slots the accepted path is written to (docs/design.md, "Draft trees").

A tree proposal (``drafters.base.Proposal`` with ``parent_BK``) holds N nodes
per row: ``draft_BK`` [B, N] tokens, ``parent_BK`` [B, N] (``ROOT`` = -1 for a
child of the root, the newest committed token; else a smaller node index),
``depth_BK`` [B, N] in 1..k; the first ``num_proposed_B`` nodes are real.
In the verify block, index 0 is the root and index j + 1 is node j.
"""

import functools

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax import verify

ROOT = -1
TREE_RULES = ("rejection", "coupled")   # at temperature > 0; greedy at 0
# auto: a row drafts a tree (of the depth the costs favour) or nothing.
TREE_POLICIES = ("fixed", "auto")
# A tree's candidates: each node's top-k children (deterministic, one-hot q),
# or children drawn from the draft's q without replacement (verified with
# that q; temperature > 0, rule rejection; greedy runs take the top-k).
TREE_CANDIDATES = ("topk", "sampled")
# Purpose of the accept test of the i-th sibling at a position: above the
# purposes of ``sampling`` (0-3), one per node index.
SIBLING_PURPOSE_BASE = 16


def check_settings(tree_nodes, tree_topk, k_max: int) -> None:
  """ValueError, naming the fix, unless the tree settings make a tree a row
  can hold: ``tree_nodes`` = 0 (chains) or >= k_max (the deepest path has k
  nodes), 1 <= ``tree_topk`` <= ``tree_nodes``."""
  if not isinstance(tree_nodes, int) or isinstance(tree_nodes, bool) or tree_nodes < 0:
    raise ValueError(f"tree_nodes={tree_nodes!r} must be an int >= 0 (0: chains)")
  if tree_nodes == 0:
    return
  if tree_nodes < k_max:
    raise ValueError(f"tree_nodes={tree_nodes} is below k={k_max}: a tree of depth k needs "
                     f"at least k nodes")
  if not isinstance(tree_topk, int) or isinstance(tree_topk, bool) or not (
      1 <= tree_topk <= tree_nodes):
    raise ValueError(f"tree_topk={tree_topk!r} must be an int in [1, tree_nodes={tree_nodes}]")


def check_candidates(candidates) -> None:
  """ValueError unless ``candidates`` is one of ``TREE_CANDIDATES``."""
  if candidates not in TREE_CANDIDATES:
    raise ValueError(f"tree_candidates={candidates!r}; expected one of {TREE_CANDIDATES}")


def check_setup(tree_nodes, tree_topk, k_max, drafter, rule, policy,
                verify_widths=None, candidates: str = "topk") -> None:
  """ValueError, naming the fix, unless draft trees can run with these
  settings (docs/design.md, "Draft trees"); tree_nodes > 0. ``drafter``: a
  Drafter or its registry entry (``drafters.DrafterKind``)."""
  check_settings(tree_nodes, tree_topk, k_max)
  check_candidates(candidates)
  if k_max == 0 or drafter is None:
    raise ValueError(f"tree_nodes={tree_nodes} needs a drafter and k >= 1")
  if not drafter.builds_trees:
    raise ValueError(f"tree_nodes={tree_nodes}: the {drafter.name!r} drafter does not "
                     "build draft trees (every built-in drafter does)")
  if rule not in TREE_RULES:
    raise ValueError(f"tree_nodes={tree_nodes} with rule={rule!r}: trees verify with rule "
                     f"{' or '.join(TREE_RULES)} (greedy at temperature 0)")
  if policy not in TREE_POLICIES:
    raise ValueError(f"tree_nodes={tree_nodes} with policy={policy!r}: trees draft with "
                     f"policy={' or policy='.join(TREE_POLICIES)}")
  if verify_widths:
    raise ValueError("tree_nodes > 0 sets the verify widths itself (1, tree_nodes + 1)")
  if candidates == "sampled":
    if not drafter.samples_trees:
      raise ValueError(f"tree_candidates='sampled': the {drafter.name!r} drafter has no draft "
                       "distribution to draw from (drafter=model or drafter=feature do)")
    if rule != "rejection":
      raise ValueError(f"tree_candidates='sampled' with rule={rule!r}: sampled candidates are "
                       "verified with rule=rejection")


def proposed_depth(proposal) -> jax.Array:
  """int32 [B]: the depth of a row's deepest node (0: no tree), what a
  tree's accepted-node count is out of (the policies' acceptance rate)."""
  valid_BN = jnp.arange(proposal.draft_BK.shape[1])[None, :] < proposal.num_proposed_B[:, None]
  return jnp.max(jnp.where(valid_BN, proposal.depth_BK, 0), axis=1).astype(jnp.int32)


def ancestors(parent_BN: jax.Array, depth_max: int) -> jax.Array:
  """bool [B, N, N]: ``[b, i, j]`` is True when node i is node j or one of
  its ancestors (the root excluded). ``depth_max`` bounds the climb."""
  batch, n = parent_BN.shape
  rows_B1 = jnp.arange(batch)[:, None]
  anc_BIJ = jnp.broadcast_to(jnp.eye(n, dtype=bool), (batch, n, n))
  up_BJ = parent_BN
  for _ in range(max(depth_max - 1, 0)):
    anc_BIJ = anc_BIJ | jnp.swapaxes(jax.nn.one_hot(up_BJ, n, dtype=bool), 1, 2)
    up_BJ = jnp.where(up_BJ >= 0, parent_BN[rows_B1, jnp.maximum(up_BJ, 0)], ROOT)
  return anc_BIJ


def verify_block(tokens_BS, length_B, proposal, num_slots: int, depth_max: int):
  """The tree pass's inputs: (tokens_BW, positions_BW, slots_BW, visible_BWS)
  with W = N + 1. The root stands for its own slot length - 1, node j for
  slot length + j, past the committed text (the slots only name the entries
  for the mask: the pass writes nothing, ``path_slots`` says what is
  written); each key is rotated at its real position length - 1 + depth. A
  query sees the committed slots <= length - 1 and the entries of its
  ancestors and itself. Every named slot is below length + N, so the pass
  reads the attention window that holds them, as a chain step does."""
  draft_BN, depth_BN = proposal.draft_BK, proposal.depth_BK
  batch, n = draft_BN.shape
  last_B1 = jnp.take_along_axis(tokens_BS, length_B[:, None] - 1, axis=1)
  tokens_BW = jnp.concatenate([last_B1, draft_BN], axis=1)
  positions_BW = length_B[:, None] - 1 + jnp.concatenate(
      [jnp.zeros((batch, 1), jnp.int32), depth_BN], axis=1)
  slots_BW = length_B[:, None] - 1 + jnp.arange(n + 1)[None, :]
  slot_ids_S = jnp.arange(num_slots)[None, None, :]
  committed_BWS = slot_ids_S <= (length_B - 1)[:, None, None]
  anc_BJI = jnp.swapaxes(ancestors(proposal.parent_BK, depth_max), 1, 2)   # [b, query j, key i]
  tree_BWN = jnp.concatenate([jnp.zeros((batch, 1, n), bool), anc_BJI], axis=1)
  # Query w sees node i's entry, named slot length + i: per slot, its node.
  node_of_slot_BS = jnp.arange(num_slots)[None, :] - length_B[:, None]
  is_node_BS = (node_of_slot_BS >= 0) & (node_of_slot_BS < n)
  index_BWS = jnp.broadcast_to(jnp.clip(node_of_slot_BS, 0, n - 1)[:, None, :],
                               (batch, n + 1, num_slots))
  sees_node_BWS = jnp.take_along_axis(tree_BWN, index_BWS, axis=2) & is_node_BS[:, None, :]
  visible_BWS = committed_BWS | sees_node_BWS
  return tokens_BW, positions_BW.astype(jnp.int32), slots_BW.astype(jnp.int32), visible_BWS


def accept(logits_BWV, proposal, keys_B2, length_B, depth_max: int, *, greedy: bool,
           rule: str, sampling_params):
  """Walks the tree from the root, one depth at a time (docs/design.md):
  greedy follows the argmax, coupled the target's own sample, rejection runs
  recursive rejection over the siblings (with each node's q, ``q_BKV``
  [B, N, V] its parent's draft distribution when the candidates were drawn,
  one-hot q when they are deterministic: ``q_BKV`` None).

  Returns (n_B accepted nodes, x_B the target's next token, path_tokens_BK
  [B, k] the accepted tokens (then padding), path_BK the accepted node
  indices (-1 after), reached_BK and expected_BK per depth: whether the
  walk reached a node with children at that depth, and the probability of
  accepting one of them (greedy and coupled: 1 where it did)).
  """
  draft_BN, parent_BN = proposal.draft_BK, proposal.parent_BK
  batch, n = draft_BN.shape
  vocab = logits_BWV.shape[-1]
  argmax_BW = verify.target_argmax(logits_BWV) if greedy else None
  valid_BN = jnp.arange(n)[None, :] < proposal.num_proposed_B[:, None]
  probs_BWV = None if greedy else sampling.warp(logits_BWV, sampling_params, sampled=True)
  cur_B = jnp.zeros((batch,), jnp.int32)     # block index: 0 the root, j + 1 node j
  alive_B = jnp.ones((batch,), bool)
  n_B = jnp.zeros((batch,), jnp.int32)
  x_B = jnp.zeros((batch,), jnp.int32)
  path, tokens, reached, expected = [], [], [], []
  for d in range(depth_max + 1):
    position_B = length_B + d                # the position a child of cur stands at
    child_BN = valid_BN & (parent_BN == (cur_B - 1)[:, None]) & alive_B[:, None]
    if d == depth_max:
      child_BN = jnp.zeros_like(child_BN)    # the deepest node's children: none
    has_child_B = jnp.any(child_BN, axis=1)
    if greedy:
      want_B = argmax_BW[jnp.arange(batch), cur_B]
      hit_BN = child_BN & (draft_BN == want_B[:, None])
      mass_B = jnp.any(hit_BN, axis=1).astype(jnp.float32)
      next_token_B = want_B
    else:
      p_BV = probs_BWV[jnp.arange(batch), cur_B]
      if rule == "coupled":
        want_B = sampling.sample(p_BV, sampling.position_keys(keys_B2, position_B,
                                                              sampling.TARGET))
        hit_BN = child_BN & (draft_BN == want_B[:, None])
        mass_B = jnp.any(hit_BN, axis=1).astype(jnp.float32)
        next_token_B = want_B
      else:
        hit_BN, residual_BV, mass_B = _recursive_rejection(
            p_BV, draft_BN, child_BN, proposal.q_BKV, keys_B2, position_B, vocab)
        # No child: the target's own sample (plain decoding's draw); all
        # rejected: a draw from what the rejections left.
        bonus_B = sampling.sample(p_BV, sampling.position_keys(keys_B2, position_B,
                                                               sampling.TARGET))
        safe_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_BV)
        correction_B = sampling.sample(
            safe_BV / jnp.sum(safe_BV, -1, keepdims=True),
            sampling.position_keys(keys_B2, position_B, sampling.RESIDUAL))
        next_token_B = jnp.where(has_child_B, correction_B, bonus_B)
    found_B = jnp.any(hit_BN, axis=1) & alive_B
    chosen_B = jnp.argmax(hit_BN, axis=1).astype(jnp.int32)
    stop_B = alive_B & ~found_B
    x_B = jnp.where(stop_B, next_token_B, x_B)
    if d < depth_max:
      path.append(jnp.where(found_B, chosen_B, -1))
      tokens.append(jnp.where(found_B, draft_BN[jnp.arange(batch), chosen_B], 0))
      reached.append(alive_B & has_child_B)
      expected.append(jnp.where(alive_B & has_child_B, mass_B, 0.0))
    n_B = n_B + found_B
    cur_B = jnp.where(found_B, chosen_B + 1, cur_B)
    alive_B = found_B
  stack = lambda xs: jnp.stack(xs, axis=1)
  return (n_B.astype(jnp.int32), x_B, stack(tokens).astype(jnp.int32),
          stack(path).astype(jnp.int32), stack(reached), stack(expected))


def _recursive_rejection(p_BV, draft_BN, child_BN, q_BNV, keys_B2, position_B, vocab):
  """Sibling after sibling (node order, which is draw order), with r = p:
  accept child i (token t) with probability min(1, r(t) / Q_i(t)), else
  r <- norm(max(0, r - Q_i)). Q_i is what child i was drawn from: q with
  the earlier siblings' tokens removed, renormalised (``q_BNV``: drawn
  without replacement), or onehot(t) for deterministic candidates
  (``q_BNV`` None; then r just loses t). Returns (hit_BN: the accepted
  child, one at most; the unnormalised residual r [B, V] after every child
  was rejected, p where there is none; mass_B: the probability, given the
  candidates, that some child is accepted)."""
  batch, n = draft_BN.shape

  def sibling(j, carry):
    """Child j's test, and r as if it were rejected (read only while no
    sibling was accepted); rows where node j is no child pass through."""
    r_BV, drawn_BV, none_B, done_B = carry   # drawn: the earlier siblings' tokens
    t_B = draft_BN[:, j]
    is_child_B = child_BN[:, j]
    onehot_BV = jax.nn.one_hot(t_B, vocab, dtype=r_BV.dtype)
    r_sum_B = jnp.sum(r_BV, axis=-1)
    r_t_B = jnp.take_along_axis(r_BV, t_B[:, None], axis=1)[:, 0]
    if q_BNV is None:
      q_t_B = jnp.ones_like(r_t_B)
    else:
      left_BV = q_BNV[:, j] * (1.0 - drawn_BV)
      left_sum_B1 = jnp.sum(left_BV, axis=-1, keepdims=True)
      qi_BV = jnp.where(left_sum_B1 > 0, left_BV / jnp.maximum(left_sum_B1, 1e-30), onehot_BV)
      q_t_B = jnp.take_along_axis(qi_BV, t_B[:, None], axis=1)[:, 0]
    u_B = sampling.uniform(sampling.position_keys(keys_B2, position_B,
                                                  SIBLING_PURPOSE_BASE + j))
    threshold_B = r_sum_B * q_t_B      # accept when u * Q(t) * sum(r) < r(t)
    ok_B = is_child_B & ~done_B & verify.accept_test(u_B, r_t_B, threshold_B)
    # min(1, r(t) / (sum(r) Q(t))), as the test decides it (1 where the
    # threshold underflows to 0 with r(t) > 0).
    accept_prob_B = jnp.where(threshold_B > 0,
                              jnp.minimum(r_t_B / jnp.maximum(threshold_B, 1e-30), 1.0),
                              (r_t_B > 0).astype(jnp.float32))
    none_B = jnp.where(is_child_B, none_B * (1.0 - accept_prob_B), none_B)
    if q_BNV is None:
      rejected_BV = r_BV * (1.0 - onehot_BV)
    else:
      rejected_BV = jnp.maximum(r_BV / jnp.maximum(r_sum_B, 1e-30)[:, None] - qi_BV, 0.0)
      drawn_BV = jnp.where(is_child_B[:, None], jnp.maximum(drawn_BV, onehot_BV), drawn_BV)
    r_BV = jnp.where(is_child_B[:, None], rejected_BV, r_BV)
    return (r_BV, drawn_BV, none_B, done_B | ok_B), ok_B

  carry = (p_BV, jnp.zeros_like(p_BV), jnp.ones((batch,), jnp.float32),
           jnp.zeros((batch,), bool))
  hit = []
  for j in range(n):
    if q_BNV is None:   # a few cheap [B, V] products: straight-line code compiles faster
      carry, ok_B = sibling(j, carry)
    else:   # node j is a child of no row's current node (most nodes at most
      # depths): skip its vocabulary-wide work with q
      carry, ok_B = jax.lax.cond(jnp.any(child_BN[:, j]), functools.partial(sibling, j),
                                 lambda c: (c, jnp.zeros((batch,), bool)), carry)
    hit.append(ok_B)
  r_BV, _, none_B, _ = carry
  return jnp.stack(hit, axis=1), r_BV, 1.0 - none_B


def path_slots(path_BK, length_B, num_nodes: int, num_slots: int) -> jax.Array:
  """Where the tree pass's entries go (``kv_cache.write_block``), [B, N + 1]:
  the root to slot length - 1, the accepted node path[i] (depth i + 1) to
  slot length + i, every other node nowhere (S: dropped). Rejected nodes
  are never written, so rejection leaves the cache as it was."""
  batch, k = path_BK.shape
  rows_B1 = jnp.arange(batch)[:, None]
  slots_BW = jnp.full((batch, num_nodes + 1), num_slots, jnp.int32)
  slots_BW = slots_BW.at[:, 0].set(length_B - 1)
  # Block index of node path[i] is path[i] + 1; unaccepted depths (-1) go
  # past the block and are dropped.
  index_BK = jnp.where(path_BK >= 0, path_BK + 1, num_nodes + 1)
  return slots_BW.at[rows_B1, index_BK].set(
      (length_B[:, None] + jnp.arange(k)[None, :]).astype(jnp.int32), mode="drop")
