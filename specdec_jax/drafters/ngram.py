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

  def lookup(self, ctx: DraftContext, k: int):
    """(draft_BK, num_proposed_B, match_len_B): the continuation of the best
    match, how many of its tokens the row proposes, and the matched n-gram's
    length n (0: no match, nothing proposed)."""
    tokens_BS, length_B = ctx.tokens_BS, ctx.length_B
    batch, num_slots = tokens_BS.shape
    starts_S = jnp.arange(num_slots)
    padded_BS = jnp.concatenate(
        [tokens_BS, jnp.full((batch, self.max_n), -1, tokens_BS.dtype)], axis=1)

    wanted_B = jnp.minimum(ctx.max_k_B, k)
    continuation_B = jnp.full((batch,), -1, jnp.int32)
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
      # Score: tokens available after the match (capped at the wanted
      # length) first, recency second.
      available_BS = jnp.minimum(length_B[:, None] - (starts_S[None, :] + n), wanted_B[:, None])
      score_BS = jnp.where(match_BS & valid_BS, available_BS * num_slots + starts_S[None, :], -1)
      best_start_B = jnp.argmax(score_BS, axis=1)
      found_B = (jnp.max(score_BS, axis=1) >= 0) & (continuation_B < 0)
      continuation_B = jnp.where(found_B, best_start_B + n, continuation_B).astype(jnp.int32)
      match_len_B = jnp.where(found_B, n, match_len_B).astype(jnp.int32)

    draft_pos_BK = continuation_B[:, None] + jnp.arange(k)[None, :]
    draft_BK = jnp.take_along_axis(tokens_BS, jnp.clip(draft_pos_BK, 0, num_slots - 1), axis=1)
    available_B = jnp.where(continuation_B >= 0, length_B - continuation_B, 0)
    num_proposed_B = jnp.clip(jnp.minimum(available_B, ctx.max_k_B), 0, k).astype(jnp.int32)
    return draft_BK.astype(jnp.int32), num_proposed_B, match_len_B
