"""The n-gram drafter against a plain-Python statement of its matching rule."""

import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import sampling
from specdec_jax.drafters import NgramDrafter
from specdec_jax.drafters.base import DraftContext


def reference_proposal(text, k, max_n, min_n):
  """Longest n first; among its matches (which must leave a token after
  them and differ from the suffix itself) the longest continuation capped at
  k, then the most recent. Returns the proposed tokens (maybe empty)."""
  length = len(text)
  for n in range(max_n, min_n - 1, -1):
    if length <= n:
      continue
    suffix = text[length - n:]
    best = None   # (capped available, start)
    for start in range(0, length - n):
      if start + n > length - 1:
        break
      if text[start:start + n] == suffix:
        key = (min(length - (start + n), k), start)
        best = key if best is None or key > best else best
    if best is not None:
      begin = best[1] + n
      return text[begin:begin + min(k, length - begin)]
  return []


def _propose(drafter, rows, k, num_slots, max_k=None):
  batch = len(rows)
  tokens = np.zeros((batch, num_slots), np.int32)
  for b, row in enumerate(rows):
    tokens[b, :len(row)] = row
  ctx = DraftContext(
      tokens_BS=jnp.asarray(tokens),
      length_B=jnp.asarray([len(r) for r in rows], jnp.int32),
      keys_B2=jnp.zeros((batch, 2), jnp.uint32),
      sampling=sampling.SamplingParams.create(0.0),
      max_k_B=jnp.asarray(max_k if max_k is not None else [k] * batch, jnp.int32),
      min_confidence=jnp.float32(0.0))
  proposal, _ = drafter.propose(None, (), ctx, k, greedy=True, purpose=0)
  drafts = np.asarray(proposal.draft_BK)
  counts = np.asarray(proposal.num_proposed_B)
  return [list(drafts[b, :counts[b]]) for b in range(batch)]


def test_prefers_a_full_continuation_over_the_most_recent_match():
  # The suffix "1 2" also occurs at 0 and at 7; both are followed by at
  # least K=4 tokens, so the more recent one wins.
  text = [1, 2, 3, 4, 5, 6, 0, 1, 2, 9, 8, 7, 1, 2]
  assert _propose(NgramDrafter(max_n=2, min_n=2), [text], 4, 32) == [[9, 8, 7, 1]]
  # Now the most recent earlier match sits 2 tokens before the end: the
  # older match with a full continuation is taken.
  text = [1, 2, 3, 4, 5, 6, 7, 1, 2, 1, 2]
  assert _propose(NgramDrafter(max_n=2, min_n=2), [text], 4, 32) == [[3, 4, 5, 6]]


def test_row_draft_length_caps_the_proposal():
  text = [5, 6, 7, 8, 9, 10, 5, 6]
  got = _propose(NgramDrafter(max_n=2, min_n=1), [text, text], 4, 16, max_k=[4, 1])
  assert got == [[7, 8, 9, 10], [7]]


@pytest.mark.parametrize("max_n,min_n", [(3, 1), (2, 2), (4, 2)])
def test_matches_reference_on_random_texts(max_n, min_n):
  rng = np.random.default_rng(max_n * 10 + min_n)
  k, num_slots = 5, 48
  rows = []
  for _ in range(64):
    length = int(rng.integers(1, num_slots))
    vocab = int(rng.integers(2, 6))   # small vocabularies: many repeats
    rows.append([int(t) for t in rng.integers(0, vocab, size=length)])
  got = _propose(NgramDrafter(max_n=max_n, min_n=min_n), rows, k, num_slots)
  want = [reference_proposal(r, k, max_n, min_n) for r in rows]
  assert got == want
  assert sum(len(w) for w in want) > 100   # not vacuous
