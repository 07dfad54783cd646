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

The candidates are a deterministic function of the text (top-k, not
sampled), so the tree is verified with one-hot q (``tree.accept``: exact).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.drafters.base import DraftContext, Proposal
from specdec_jax.tree import ROOT

# (state, tokens_BT, positions_BT, slots_BT, visible_BTS, parent_slot_BT)
#   -> (logits_BTV, state); parent_slot_BT: the slot the node's parent was fed
#   into, -1 for a child of the root (a feature draft reads its parent's output).
TreeAdvance = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                       tuple[jax.Array, Any]]


def scratch_slots(k: int, topk: int) -> int:
  """Draft-cache slots the expansion feeds: ``topk`` nodes at each depth
  1 .. k - 1 (the deepest nodes are never fed)."""
  return max(k - 1, 0) * topk


def _log_q(logits_BXV, ctx: DraftContext, greedy: bool) -> jax.Array:
  """The draft's log-probabilities under the run's warp (log softmax when
  greedy): -inf outside a top-k / top-p support."""
  if greedy:
    return jax.nn.log_softmax(logits_BXV.astype(jnp.float32), axis=-1)
  q_BXV = sampling.warp(logits_BXV.astype(jnp.float32), ctx.sampling, sampled=True)
  return jnp.where(q_BXV > 0, jnp.log(jnp.maximum(q_BXV, 1e-38)), -jnp.inf)


def expand_tree(ctx: DraftContext, k: int, num_nodes: int, topk: int, root_logits_BV,
                state: Any, advance: TreeAdvance, *, num_slots: int,
                greedy: bool) -> tuple[Proposal, Any]:
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

  Returns (Proposal with parent_BK / depth_BK and q_BKV None, the state).
  """
  length_B = ctx.length_B
  batch = length_B.shape[0]
  rows_B1 = jnp.arange(batch)[:, None]
  pool = max(topk + max(k - 1, 0) * topk * topk, num_nodes)
  pad = pool - topk
  scratch_start = num_slots - scratch_slots(k, topk)

  score_BT, token_BT = jax.lax.top_k(_log_q(root_logits_BV, ctx, greedy), topk)
  carry = dict(
      token=jnp.pad(token_BT.astype(jnp.int32), ((0, 0), (0, pad))),
      parent=jnp.full((batch, pool), ROOT, jnp.int32),
      depth=jnp.pad(jnp.ones((batch, topk), jnp.int32), ((0, 0), (0, pad)),
                    constant_values=k + 1),
      score=jnp.pad(score_BT, ((0, 0), (0, pad)), constant_values=-jnp.inf),
      fed_slot=jnp.full((batch, pool), -1, jnp.int32))
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
    child_lq_BTC, child_token_BTC = jax.lax.top_k(_log_q(logits_BTV, ctx, greedy), topk)
    start = topk + (d - 1) * topk * topk
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
        buf, x.reshape(batch, topk * topk).astype(buf.dtype), start, 1)
    c = dict(token=put(c["token"], child_token_BTC),
             parent=put(c["parent"], jnp.repeat(front_BT[:, :, None], topk, axis=2)),
             depth=put(c["depth"], jnp.full((batch, topk, topk), d + 1)),
             score=put(c["score"], front_score_BT[:, :, None] + child_lq_BTC),
             fed_slot=fed_slot)
    return (c, state), None

  if k > 1:
    (carry, state), _ = jax.lax.scan(grow, (carry, state), jnp.arange(1, k))
  return _rerank(carry, ctx.max_k_B, num_nodes, k), state


def _rerank(c: dict, max_k_B, num_nodes: int, k: int) -> Proposal:
  """The ``num_nodes`` best pool nodes the row may propose (depth <= its
  k_b): higher score first, then shallower, then pool order (two stable
  sorts); laid out by depth so that every parent precedes its children."""
  batch, pool = c["score"].shape
  rows_B1 = jnp.arange(batch)[:, None]
  valid_BP = jnp.isfinite(c["score"]) & (c["depth"] <= max_k_B[:, None])
  by_depth_BP = jnp.argsort(c["depth"], axis=1, stable=True)
  key_BP = jnp.where(valid_BP, -c["score"], jnp.inf)[rows_B1, by_depth_BP]
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
      depth_BK=jnp.where(real_BN, c["depth"][rows_B1, order_BN], 1).astype(jnp.int32))
