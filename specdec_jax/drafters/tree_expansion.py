"""A draft tree from a draft model: EAGLE-2's expansion and reranking with
static shapes (docs/design.md, "Draft trees").

Each candidate node carries a score, the sum of the draft's log-probabilities
along its path (the draft's estimate of the chance that the whole path is
accepted). The root's ``topk`` best children are depth 1. Then, depth after
depth under ``lax.scan``, the ``topk`` best-scored nodes of the newest depth
(the frontier) are fed to the draft together, each seeing the committed
cache and its own ancestors (a tree mask over scratch slots), and each gets
its ``topk`` best children. All candidates form a pool of
P = topk + (k - 1) * topk**2 nodes; the ``num_nodes`` best-scored among them
are the tree. Scores never rise along a path and ties go to the shallower
node, so the chosen set holds every chosen node's parent.

``candidates="topk"``: the candidates are a deterministic function of the
text (each node's top-k children), so the tree is verified with one-hot q.

``candidates="sampled"`` (Sequoia-style, temperature > 0): each fed node's
``topk`` children are drawn from the draft's warped q without replacement
(one after another, each from q without the earlier ones), and the tree is verified
with that q (``tree.accept``). Exactness needs every node's existence to be
decided before its own token is drawn, so the kept set differs from the
top-k mode's: depth d keeps ``sampled_depth_counts(...)[d - 1]`` nodes (a
static shape), chosen among the children of the depth-(d - 1) frontier by
the parent's score plus a prior on the child's draw rank
(``rank_log_prior``), never by the child's own probability. A family's kept
children are then a prefix of its draws, and the draws of depth d + 1 follow
every decision about depth d. Each node carries its parent's q (``q_BKV``
[B, N, V]).
"""

import heapq
import math

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import sampling
from specdec_jax.drafters.base import DraftContext, Proposal
from specdec_jax.tree import ROOT

# Sampled trees: the chance that the r-th draw (r = 1, 2, ..) of a node's
# children is accepted, as the tree's shape assumes it: FIRST / r^POWER (the
# shape of Sequoia's measured acceptance by draw rank at temperature 1).
PRIOR_FIRST, PRIOR_POWER = 0.6, 2.0


def rank_log_prior(rank):
  """log of the assumed acceptance chance of the ``rank``-th draw (1-based;
  an int or a numpy array of them)."""
  return math.log(PRIOR_FIRST) - PRIOR_POWER * np.log(rank)


# (state, tokens_BT, positions_BT, slots_BT, visible_BTS, parent_slot_BT)
#   -> (logits_BTV, state); parent_slot_BT: the slot the node's parent was fed
#   into, -1 for a child of the root (a feature draft reads its parent's output).
TreeAdvance = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                       tuple[jax.Array, Any]]


def scratch_slots(k: int, topk: int) -> int:
  """Draft-cache slots the expansion feeds: ``topk`` nodes at each depth
  1 .. k - 1 (the deepest nodes are never fed)."""
  return max(k - 1, 0) * topk


def sampled_depth_counts(num_nodes: int, topk: int, k: int) -> tuple[int, ...]:
  """Nodes per depth 1..k of a sampled tree: the ``num_nodes`` most likely
  nodes of the full ``topk``-ary tree of depth k when a path of draw ranks
  r_1 .. r_d is accepted with chance prior(r_1) * .. * prior(r_d)
  (``rank_log_prior``; ties to the shallower node), capped at what the
  expansion can grow: the ``topk`` children of each of the ``topk`` nodes
  it feeds per depth."""
  cost = lambda r: -float(rank_log_prior(r))
  heap = [(cost(r), 1, (r,)) for r in range(1, topk + 1)]
  counts = [0] * k
  for _ in range(num_nodes):
    if not heap:
      break
    path_cost, depth, path = heapq.heappop(heap)
    counts[depth - 1] += 1
    if depth < k:
      for r in range(1, topk + 1):
        heapq.heappush(heap, (path_cost + cost(r), depth + 1, path + (r,)))
  capped, above = [], 1
  for count in counts:
    capped.append(min(count, topk * min(topk, above)))
    above = capped[-1]
  return tuple(capped)


def _sampled_selection_score(parent_score_BT, child_lq_BTC):
  """What a sampled tree keeps children by, [B, T, C]: the parent's path
  log-probability plus the prior of the child's draw rank. Never the
  child's own log q (only ``child_lq_BTC``'s shape is read): a child kept
  for its own token would no longer be a draw from q, and the rule's output
  would leave p (tests/test_tree.py checks both)."""
  prior_C = rank_log_prior(1 + np.arange(child_lq_BTC.shape[-1])).astype(np.float32)
  return parent_score_BT[:, :, None] + prior_C[None, None, :]


def _draws_without_replacement(q_BXV, keys_BX2, count: int):
  """``count`` tokens drawn from each q without replacement, in draw order:
  draw i from q without the earlier draws (``sampling.sample``'s exact
  two-level draw, key ``fold_in(key, i)``; unnormalised is fine). A few
  hundred random numbers per draw instead of a Gumbel per token. Returns
  (tokens [B, X, count], their log q: -inf once q has no mass left)."""
  vocab_V = jnp.arange(q_BXV.shape[-1])
  left_BXV = q_BXV
  tokens, log_qs = [], []
  for i in range(count):
    keys_i = jax.vmap(jax.vmap(lambda key: jax.random.fold_in(key, i)))(keys_BX2)
    token_BX = sampling.sample(left_BXV, keys_i)
    q_BX = jnp.take_along_axis(q_BXV, token_BX[..., None], axis=-1)[..., 0]
    has_mass_BX = jnp.sum(left_BXV, axis=-1) > 0
    tokens.append(token_BX)
    log_qs.append(jnp.where(has_mass_BX & (q_BX > 0), jnp.log(jnp.maximum(q_BX, 1e-38)),
                            -jnp.inf))
    left_BXV = jnp.where(vocab_V == token_BX[..., None], 0.0, left_BXV)
  return jnp.stack(tokens, axis=-1), jnp.stack(log_qs, axis=-1)


def _candidate_keys(ctx: DraftContext, position_B, depth: int | jax.Array,
                    count: int) -> jax.Array:
  """uint32 [B, count, 2]: the keys of the draws of the children (at
  ``position_B``) of the fed nodes 0 .. count - 1 of ``depth`` (0: the
  root). The DRAFT purpose, which the tree's accept tests never use;
  folding the depth in keeps a later step (whose root stands at a position
  an earlier step drafted deeper) from reusing an earlier step's draws."""
  keys_B2 = sampling.position_keys(ctx.keys_B2, position_B, sampling.DRAFT)
  return jax.vmap(lambda key: jax.vmap(
      lambda t: jax.random.fold_in(jax.random.fold_in(key, depth), t))(jnp.arange(count)))(
          keys_B2)


def _warped(logits_BXV, ctx: DraftContext, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """The draft's probabilities and log-probabilities under the run's warp
  (softmax when greedy): log q is -inf outside a top-k / top-p support."""
  if greedy:
    lq_BXV = jax.nn.log_softmax(logits_BXV.astype(jnp.float32), axis=-1)
    return jnp.exp(lq_BXV), lq_BXV
  q_BXV = sampling.warp(logits_BXV.astype(jnp.float32), ctx.sampling, sampled=True)
  return q_BXV, jnp.where(q_BXV > 0, jnp.log(jnp.maximum(q_BXV, 1e-38)), -jnp.inf)


def expand_tree(ctx: DraftContext, k: int, num_nodes: int, topk: int, root_logits_BV,
                state: Any, advance: TreeAdvance, *, num_slots: int,
                greedy: bool, sampled: bool = False) -> tuple[Proposal, Any]:
  """A tree of ``num_nodes`` nodes of depth <= min(k, max_k_B) (module doc).

  Args:
    root_logits_BV: the draft's logits for position ``length`` (the root's
      children).
    state: the draft's state, threaded through ``advance``.
    advance: feeds a block of frontier nodes at the given positions into the
      given cache slots under the given mask [B, T, num_slots], told the
      slot each node's parent went to (-1: the root); returns their
      next-token logits and the state.
    num_slots: the draft cache's slots; the frontier nodes go to its last
      ``scratch_slots(k, topk)`` (beyond every committed position: the
      buffer holds them, ``Drafter.tree_scratch_slots``).
    sampled: draw the candidates (module doc; ignored when greedy).

  Returns (Proposal with parent_BK / depth_BK, and q_BKV [B, N, V] each
  node's parent's q when sampled, else None; the state).
  """
  sampled = sampled and not greedy
  length_B = ctx.length_B
  batch = length_B.shape[0]
  rows_B1 = jnp.arange(batch)[:, None]
  pool = max(topk + max(k - 1, 0) * topk * topk, num_nodes)
  pad = pool - topk
  scratch = scratch_slots(k, topk)
  scratch_start = num_slots - scratch
  # Sampled: nodes kept per depth (the pruning below); top-k: unused (the
  # rerank keeps the N best of the pool).
  depth_counts = jnp.asarray(sampled_depth_counts(num_nodes, topk, k) if sampled else (0,),
                             jnp.int32)

  root_q_BV, root_lq_BV = _warped(root_logits_BV, ctx, greedy)
  if sampled:
    token_B1T, lq_B1T = _draws_without_replacement(
        root_q_BV[:, None], _candidate_keys(ctx, length_B, 0, 1), topk)
    token_BT, lq_BT = token_B1T[:, 0], lq_B1T[:, 0]
    keep_BT = jnp.isfinite(lq_BT) & (jnp.arange(topk)[None, :] < depth_counts[0])
    score_BT = jnp.where(keep_BT, lq_BT, -jnp.inf)
    prior_T = rank_log_prior(1 + np.arange(topk)).astype(np.float32)
    keep_score_BT = jnp.where(keep_BT, prior_T[None, :], -jnp.inf)
  else:
    score_BT, token_BT = jax.lax.top_k(root_lq_BV, topk)
    keep_score_BT = score_BT
  fill = lambda x, value: jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)
  carry = dict(
      token=fill(token_BT.astype(jnp.int32), 0),
      parent=jnp.full((batch, pool), ROOT, jnp.int32),
      depth=fill(jnp.ones((batch, topk), jnp.int32), k + 1),
      score=fill(score_BT, -jnp.inf),   # the path's draft log-probability
      keep_score=fill(keep_score_BT, -jnp.inf),   # what the kept set is chosen by
      fed_slot=jnp.full((batch, pool), -1, jnp.int32))
  if sampled:   # the q each fed node's children were drawn from (a dummy row at k = 1)
    carry["fed_q"] = jnp.zeros((batch, max(scratch, 1), root_q_BV.shape[-1]), jnp.float32)
  slot_ids_S = jnp.arange(num_slots)
  vocab = root_logits_BV.shape[-1]

  def grow(carry_and_state, d):
    """Feeds the best ``topk`` nodes of depth d; adds their children (d + 1)."""
    c, state = carry_and_state
    front_score_BT, front_BT = jax.lax.top_k(
        jnp.where(c["depth"] == d, c["score"], -jnp.inf), topk)
    slots_BT = jnp.broadcast_to(scratch_start + (d - 1) * topk + jnp.arange(topk),
                                (batch, topk)).astype(jnp.int32)
    # A pick below the row's real nodes (score -inf) keeps the slot it had.
    fed_slot = c["fed_slot"].at[rows_B1, front_BT].set(
        jnp.where(jnp.isfinite(front_score_BT), slots_BT, c["fed_slot"][rows_B1, front_BT]))
    # A frontier node sees the committed slots and the slots of its path.
    visible_BTS = slot_ids_S[None, None, :] <= (length_B - 1)[:, None, None]
    node_BT = front_BT
    for _ in range(k - 1):
      slot_BT = jnp.where(node_BT >= 0, fed_slot[rows_B1, jnp.maximum(node_BT, 0)], -1)
      visible_BTS = visible_BTS | (slot_ids_S[None, None, :] == slot_BT[:, :, None])
      node_BT = jnp.where(node_BT >= 0, c["parent"][rows_B1, jnp.maximum(node_BT, 0)], ROOT)
    positions_BT = jnp.broadcast_to((length_B - 1 + d)[:, None], (batch, topk))
    parent_BT = c["parent"][rows_B1, front_BT]
    parent_slot_BT = jnp.where(parent_BT >= 0, fed_slot[rows_B1, jnp.maximum(parent_BT, 0)], -1)
    # No row may go deeper than d (the policy's k_b, or nothing to draft):
    # skip the draft's pass; the zero logits' children are never kept (the
    # rerank drops nodes deeper than a row's k_b).
    logits_BTV, state = jax.lax.cond(
        jnp.any(ctx.max_k_B > d),
        lambda s: advance(s, c["token"][rows_B1, front_BT], positions_BT, slots_BT,
                          visible_BTS, parent_slot_BT),
        lambda s: (jnp.zeros((batch, topk, vocab), jnp.float32), s), state)
    q_BTV, lq_BTV = _warped(logits_BTV, ctx, greedy)
    c = dict(c, fed_slot=fed_slot)
    if sampled:
      child_token_BTC, child_lq_BTC = _draws_without_replacement(
          q_BTV, _candidate_keys(ctx, length_B + d, d, topk), topk)
      # Depth d + 1 keeps its static count, by the parent's score and the
      # draw rank only: a child's own token never decides whether it exists.
      valid_BX = (jnp.isfinite(front_score_BT)[:, :, None]
                  & jnp.isfinite(child_lq_BTC)).reshape(batch, topk * topk)
      keep_score_BX = jnp.where(
          valid_BX, _sampled_selection_score(front_score_BT, child_lq_BTC).reshape(
              batch, topk * topk), -jnp.inf)
      order_BX = jnp.argsort(-keep_score_BX, axis=1, stable=True)
      rank_BX = jnp.zeros_like(order_BX).at[rows_B1, order_BX].set(
          jnp.broadcast_to(jnp.arange(topk * topk), (batch, topk * topk)))
      keep_BTC = (valid_BX & (rank_BX < depth_counts[d])).reshape(batch, topk, topk)
      child_score_BTC = jnp.where(keep_BTC, front_score_BT[:, :, None] + child_lq_BTC, -jnp.inf)
      child_keep_BTC = jnp.where(keep_BTC, keep_score_BX.reshape(batch, topk, topk), -jnp.inf)
      c["fed_q"] = jax.lax.dynamic_update_slice_in_dim(c["fed_q"], q_BTV, (d - 1) * topk, 1)
    else:
      child_lq_BTC, child_token_BTC = jax.lax.top_k(lq_BTV, topk)
      child_score_BTC = front_score_BT[:, :, None] + child_lq_BTC
      child_keep_BTC = child_score_BTC
    start = topk + (d - 1) * topk * topk
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
        buf, x.reshape(batch, topk * topk).astype(buf.dtype), start, 1)
    c.update(token=put(c["token"], child_token_BTC),
             parent=put(c["parent"], jnp.repeat(front_BT[:, :, None], topk, axis=2)),
             depth=put(c["depth"], jnp.full((batch, topk, topk), d + 1)),
             score=put(c["score"], child_score_BTC),
             keep_score=put(c["keep_score"], child_keep_BTC))
    return (c, state), None

  if k > 1:
    (carry, state), _ = jax.lax.scan(grow, (carry, state), jnp.arange(1, k))
  proposal, order_BN = _rerank(carry, ctx.max_k_B, num_nodes, k)
  if sampled:   # each node's parent's q: the root's, or a fed node's
    parent_BN = carry["parent"][rows_B1, order_BN]
    fed_row_BN = carry["fed_slot"][rows_B1, jnp.maximum(parent_BN, 0)] - scratch_start
    fed_q_BNV = carry["fed_q"][rows_B1, jnp.clip(fed_row_BN, 0, max(scratch, 1) - 1)]
    proposal = proposal.replace(q_BKV=jnp.where(
        (parent_BN >= 0)[..., None], fed_q_BNV, root_q_BV[:, None]))
  return proposal, state


def _rerank(c: dict, max_k_B, num_nodes: int, k: int) -> tuple[Proposal, jax.Array]:
  """The ``num_nodes`` best pool nodes the row may propose (depth <= its
  k_b): higher ``keep_score`` first, then shallower, then pool order (two stable
  sorts); laid out by depth so that every parent precedes its children (and
  a family's draws in draw order). Returns (the Proposal, q_BKV None; the
  pool index of each node [B, N])."""
  batch, pool = c["keep_score"].shape
  rows_B1 = jnp.arange(batch)[:, None]
  valid_BP = jnp.isfinite(c["keep_score"]) & (c["depth"] <= max_k_B[:, None])
  by_depth_BP = jnp.argsort(c["depth"], axis=1, stable=True)
  key_BP = jnp.where(valid_BP, -c["keep_score"], jnp.inf)[rows_B1, by_depth_BP]
  best_BP = by_depth_BP[rows_B1, jnp.argsort(key_BP, axis=1, stable=True)]
  rank_BP = jnp.zeros((batch, pool), jnp.int32).at[rows_B1, best_BP].set(
      jnp.broadcast_to(jnp.arange(pool, dtype=jnp.int32), (batch, pool)))
  kept_BP = valid_BP & (rank_BP < num_nodes)
  layout_BP = jnp.where(kept_BP, c["depth"] * pool + rank_BP, (k + 2) * pool + rank_BP)
  order_BN = jnp.argsort(layout_BP, axis=1, stable=True)[:, :num_nodes]
  real_BN = kept_BP[rows_B1, order_BN]
  node_of_pool_BP = jnp.full((batch, pool), ROOT, jnp.int32).at[rows_B1, order_BN].set(
      jnp.broadcast_to(jnp.arange(num_nodes, dtype=jnp.int32), (batch, num_nodes)))
  parent_pool_BN = c["parent"][rows_B1, order_BN]
  parent_BN = jnp.where(parent_pool_BN >= 0,
                        node_of_pool_BP[rows_B1, jnp.maximum(parent_pool_BN, 0)], ROOT)
  return Proposal(
      draft_BK=jnp.where(real_BN, c["token"][rows_B1, order_BN], 0).astype(jnp.int32),
      q_BKV=None,
      num_proposed_B=jnp.sum(real_BN, axis=1).astype(jnp.int32),
      parent_BK=jnp.where(real_BN, parent_BN, ROOT).astype(jnp.int32),
      depth_BK=jnp.where(real_BN, c["depth"][rows_B1, order_BN], 1).astype(jnp.int32)), order_BN
