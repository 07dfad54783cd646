"""Prompt-lookup / n-gram drafter: copies what followed the last n-gram."""

import dataclasses

import jax
import jax.numpy as jnp

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal


@dataclasses.dataclass(frozen=True)
class NgramDrafter(Drafter):
  """Finds an earlier occurrence of the row's last n tokens in its own
  committed tokens and proposes the tokens that followed.

  Tries n = max_n down to min_n and uses the longest n that matches. Among
  the matches of that n it takes the one whose continuation is longest, up
  to the row's draft length, and the most recent among those: the most
  recent match alone often sits just before the end of the text and can
  offer only a token or two. Fully on device with static shapes
  (O(S * max_n^2) compares per row). Proposals never run past the committed
  text, so a short continuation proposes fewer than K drafts; no match
  proposes none. Deterministic: q is one-hot.
  """

  max_n: int = 3
  min_n: int = 1
  name: str = "ngram"
  builds_trees = True   # a class constant, not a field: ``propose_tree``

  def __post_init__(self):
    if self.min_n < 1 or self.max_n < self.min_n:
      raise ValueError(
          f"n-gram sizes must satisfy 1 <= ngram_min_n <= ngram_max_n, got "
          f"min_n={self.min_n}, max_n={self.max_n}")

  def init_state(self, batch_size, num_slots):
    del batch_size, num_slots
    return ()

  def prefill(self, params, state, prompt_BT, positions_BT):
    return state

  def propose(self, params, state, ctx: DraftContext, k: int, *, greedy: bool,
              purpose: int):
    del params, greedy, purpose
    draft_BK, num_proposed_B, match_len_B = self.lookup(ctx, k)
    return Proposal(draft_BK, None, num_proposed_B,
                    shadow_B=self.candidates(ctx, k, match_len_B)), state

  def candidates(self, ctx: DraftContext, k: int, match_len_B) -> jax.Array:
    """How many lookup tokens a row has (whatever its k_b): 1 where it matched
    (enough for the auto policy's shadow check), else 0."""
    del ctx, k
    return (match_len_B > 0).astype(jnp.int32)

  def _match_scores(self, ctx: DraftContext, k: int):
    """(continuation_BS, score_BS, match_len_B) for the longest n that
    matches: where the continuation after each earlier match of the row's
    last n tokens starts, its score (-1: no match; else tokens available
    after it, capped at the wanted length, first, recency second) and n
    (0: no match)."""
    tokens_BS, length_B = ctx.tokens_BS, ctx.length_B
    batch, num_slots = tokens_BS.shape
    starts_S = jnp.arange(num_slots)
    padded_BS = jnp.concatenate(
        [tokens_BS, jnp.full((batch, self.max_n), -1, tokens_BS.dtype)], axis=1)
    wanted_B = jnp.minimum(ctx.max_k_B, k)
    continuation_BS = jnp.zeros((batch, num_slots), jnp.int32)
    chosen_BS = jnp.full((batch, num_slots), -1, jnp.int32)
    match_len_B = jnp.zeros((batch,), jnp.int32)
    for n in range(self.max_n, self.min_n - 1, -1):
      match_BS = jnp.ones((batch, num_slots), bool)
      for i in range(n):
        suffix_token_B = jnp.take_along_axis(
            tokens_BS, jnp.maximum(length_B - n + i, 0)[:, None], axis=1)
        match_BS &= padded_BS[:, i:i + num_slots] == suffix_token_B
      # The match must end before the last committed token, so that at least
      # one token follows it; this also excludes the suffix itself.
      valid_BS = (starts_S[None, :] + n <= length_B[:, None] - 1) & (length_B[:, None] > n)
      available_BS = jnp.minimum(length_B[:, None] - (starts_S[None, :] + n), wanted_B[:, None])
      score_BS = jnp.where(match_BS & valid_BS, available_BS * num_slots + starts_S[None, :], -1)
      found_B = (jnp.max(score_BS, axis=1) >= 0) & (match_len_B == 0)
      chosen_BS = jnp.where(found_B[:, None], score_BS, chosen_BS)
      continuation_BS = jnp.where(found_B[:, None], starts_S[None, :] + n, continuation_BS)
      match_len_B = jnp.where(found_B, n, match_len_B).astype(jnp.int32)
    return continuation_BS.astype(jnp.int32), chosen_BS, match_len_B

  def _branch(self, ctx: DraftContext, k: int, continuation_B):
    """(tokens_BK, length_B): the k tokens from each row's continuation
    start (-1: none) and how many of them the row proposes."""
    tokens_BS, length_B = ctx.tokens_BS, ctx.length_B
    num_slots = tokens_BS.shape[1]
    pos_BK = continuation_B[:, None] + jnp.arange(k)[None, :]
    tokens_BK = jnp.take_along_axis(tokens_BS, jnp.clip(pos_BK, 0, num_slots - 1), axis=1)
    available_B = jnp.where(continuation_B >= 0, length_B - continuation_B, 0)
    return (tokens_BK.astype(jnp.int32),
            jnp.clip(jnp.minimum(available_B, ctx.max_k_B), 0, k).astype(jnp.int32))

  def lookup(self, ctx: DraftContext, k: int):
    """(draft_BK, num_proposed_B, match_len_B): the continuation of the best
    match, how many of its tokens the row proposes, and the matched n-gram's
    length n (0: no match, nothing proposed)."""
    continuation_BS, score_BS, match_len_B = self._match_scores(ctx, k)
    best_B = jnp.argmax(score_BS, axis=1)
    continuation_B = jnp.where(jnp.max(score_BS, axis=1) >= 0,
                               jnp.take_along_axis(continuation_BS, best_B[:, None], 1)[:, 0], -1)
    draft_BK, num_proposed_B = self._branch(ctx, k, continuation_B)
    return draft_BK, num_proposed_B, match_len_B

  def propose_tree(self, params, state, ctx: DraftContext, k: int, num_nodes: int,
                   topk: int, *, greedy: bool, purpose: int, sampled: bool = False):
    """Several matches as branches: the ``topk`` best continuations (scored
    as ``lookup`` scores them) whose first tokens differ, each a chain of up
    to k tokens under the root, laid out best branch first until
    ``num_nodes`` nodes are used. Deterministic (one-hot q)."""
    del params, greedy, purpose, sampled
    tokens_BS = ctx.tokens_BS
    batch = tokens_BS.shape[0]
    continuation_BS, score_BS, _ = self._match_scores(ctx, k)
    next_token_BS = jnp.take_along_axis(
        tokens_BS, jnp.clip(continuation_BS, 0, tokens_BS.shape[1] - 1), axis=1)
    branch_tokens, branch_lengths = [], []
    for _ in range(topk):
      best_B = jnp.argmax(score_BS, axis=1)
      found_B = jnp.max(score_BS, axis=1) >= 0
      continuation_B = jnp.where(
          found_B, jnp.take_along_axis(continuation_BS, best_B[:, None], 1)[:, 0], -1)
      tokens_BK, length_B = self._branch(ctx, k, continuation_B)
      branch_tokens.append(tokens_BK)
      branch_lengths.append(length_B)
      first_B = jnp.take_along_axis(next_token_BS, best_B[:, None], 1)
      score_BS = jnp.where(next_token_BS == first_B, -1, score_BS)   # another first token
    tokens_BTK = jnp.stack(branch_tokens, axis=1)
    lengths_BT = jnp.stack(branch_lengths, axis=1)
    ends_BT = jnp.cumsum(lengths_BT, axis=1)
    node_N = jnp.arange(num_nodes)
    branch_BN = jnp.sum(ends_BT[:, None, :] <= node_N[None, :, None], axis=2)
    branch_BN = jnp.minimum(branch_BN, topk - 1)
    start_BN = jnp.take_along_axis(ends_BT - lengths_BT, branch_BN, axis=1)
    depth_BN = node_N[None, :] - start_BN + 1
    draft_BN = tokens_BTK[jnp.arange(batch)[:, None], branch_BN,
                          jnp.clip(depth_BN - 1, 0, k - 1)]
    parent_BN = jnp.where(depth_BN == 1, -1, node_N[None, :] - 1)
    num_B = jnp.minimum(ends_BT[:, -1], num_nodes).astype(jnp.int32)
    valid_BN = node_N[None, :] < num_B[:, None]
    return Proposal(
        draft_BK=jnp.where(valid_BN, draft_BN, 0).astype(jnp.int32), q_BKV=None,
        num_proposed_B=num_B,
        parent_BK=jnp.where(valid_BN, parent_BN, -1).astype(jnp.int32),
        depth_BK=jnp.where(valid_BN, jnp.clip(depth_BN, 1, k), 1).astype(jnp.int32)), state
