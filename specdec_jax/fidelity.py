"""Distribution checks: does a rule preserve the target's distribution?

On a tiny-vocabulary target the exact distribution of the next few tokens is
enumerable (V^n sequences). Many speculative samples are compared with it by
a chi-square test and the total-variation distance.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from specdec_jax import sampling
from specdec_jax.models.transformer import Transformer


def exact_sequence_probs(model: Transformer, params, prompt: list[int], num_tokens: int,
                         sampling_params: sampling.SamplingParams) -> dict[tuple, float]:
  """P(continuation) under the warped target for every length-n continuation."""
  vocab = model.cfg.vocab_size
  seqs = np.array(list(itertools.product(range(vocab), repeat=num_tokens)), np.int32)
  batch = seqs.shape[0]
  tokens_BT = np.concatenate([np.tile(np.asarray(prompt, np.int32), (batch, 1)), seqs], axis=1)
  positions_BT = np.broadcast_to(np.arange(tokens_BT.shape[1]), tokens_BT.shape)
  cache = model.init_cache(batch, tokens_BT.shape[1])
  logits_BTV, _ = jax.jit(model.apply)(params, jnp.asarray(tokens_BT), jnp.asarray(positions_BT),
                                      cache)
  probs_BTV = np.asarray(sampling.warp(logits_BTV, sampling_params))
  start = len(prompt) - 1
  prob_B = np.ones(batch)
  for i in range(num_tokens):
    prob_B *= probs_BTV[np.arange(batch), start + i, seqs[:, i]]
  return {tuple(s): float(p) for s, p in zip(seqs.tolist(), prob_B)}


def chi_square_test(samples: list[tuple], expected_probs: dict[tuple, float],
                    min_expected: float = 5.0) -> dict:
  """Chi-square goodness of fit; bins with expected count < min_expected pooled.

  Returns p_value, tv_distance, n_samples, dof, and the sample count that fell
  on zero-probability sequences (any such sample is a failure by itself).
  """
  n = len(samples)
  counts = {}
  for s in samples:
    counts[s] = counts.get(s, 0) + 1
  impossible = sum(c for s, c in counts.items() if expected_probs.get(s, 0.0) == 0.0)
  observed, expected = [], []
  pooled_obs, pooled_exp = 0.0, 0.0
  for seq, p in expected_probs.items():
    if p == 0.0:
      continue
    if p * n >= min_expected:
      observed.append(counts.get(seq, 0))
      expected.append(p * n)
    else:
      pooled_obs += counts.get(seq, 0)
      pooled_exp += p * n
  if pooled_exp > 0:
    observed.append(pooled_obs)
    expected.append(pooled_exp)
  observed, expected = np.asarray(observed, float), np.asarray(expected, float)
  expected *= observed.sum() / expected.sum() if expected.sum() else 1.0
  stat = float(np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-12)))
  dof = max(len(observed) - 1, 1)
  p_value = float(scipy.stats.chi2.sf(stat, dof))
  if impossible:
    p_value = 0.0
  support = set(expected_probs) | set(counts)
  tv = 0.5 * sum(abs(counts.get(s, 0) / n - expected_probs.get(s, 0.0)) for s in support)
  return {"p_value": p_value, "tv_distance": float(tv), "n_samples": n,
          "chi_square": stat, "dof": dof, "impossible_samples": impossible}


# ----------------------------------------------------------------------------
# Greedy identity: where two greedy decodes part, and whether it is a near-tie.

NEAR_TIE_REL = 2.0 ** -6   # 4 bf16 ulps of the largest logit


def first_divergence(expected: list[int], actual: list[int]) -> int | None:
  """First position where the two token lists differ (the shorter one's
  length when one is a prefix of the other); None when they are equal."""
  if expected == actual:
    return None
  n = min(len(expected), len(actual))
  return next((i for i in range(n) if expected[i] != actual[i]), n)


def divergence_counts(expected: list[list[int]], actual: list[list[int]]) -> tuple[int, int]:
  """(rows that diverge, tokens compared: each row's up to and including its
  first divergence, all of an equal row's), for a rate per token."""
  rows = tokens = 0
  for want, got in zip(expected, actual):
    first = first_divergence(want, got)
    rows += first is not None
    tokens += min(len(want), len(got)) if first is None else first + 1
  return rows, tokens


def greedy_divergences(model: Transformer, params, prompts: list[list[int]],
                       expected: list[list[int]], actual: list[list[int]]) -> list[dict]:
  """Each row whose ``actual`` greedy tokens leave ``expected`` (plain
  greedy decoding's), with the target's logits where they part.

  The logits come from one forward pass over prompt + the common prefix
  (all rows padded to one length: one compile). Returns dicts of row,
  position, expected_token, actual_token, top2 (the two largest logits'
  token ids), gap (largest minus second logit), scale (largest |logit|) and
  near_tie: both tokens are the top two and gap <= NEAR_TIE_REL * scale,
  the most that rounding in a low-precision dtype can explain.
  """
  found = []
  for row, (want, got) in enumerate(zip(expected, actual)):
    position = first_divergence(want, got)
    if position is not None and position < min(len(want), len(got)):
      found.append((row, position, prompts[row] + want[:position]))
  if not found:
    return []
  length = max(len(ids) for _, _, ids in found)
  tokens_BT = np.zeros((len(found), length), np.int32)
  for b, (_, _, ids) in enumerate(found):
    tokens_BT[b, :len(ids)] = ids   # right padding: causal, so it changes nothing before it
  positions_BT = np.broadcast_to(np.arange(length, dtype=np.int32), tokens_BT.shape)
  logits_BTV, _ = jax.jit(model.apply)(params, jnp.asarray(tokens_BT), jnp.asarray(positions_BT),
                                       model.init_cache(len(found), length))
  logits_BTV = np.asarray(logits_BTV, np.float32)
  report = []
  for b, (row, position, ids) in enumerate(found):
    logits_V = logits_BTV[b, len(ids) - 1]
    top2 = [int(t) for t in np.argsort(logits_V)[::-1][:2]]
    gap = float(logits_V[top2[0]] - logits_V[top2[1]])
    scale = float(np.max(np.abs(logits_V)))
    want, got = expected[row][position], actual[row][position]
    report.append(dict(row=row, position=position, expected_token=want, actual_token=got,
                       top2=top2, gap=gap, scale=scale,
                       near_tie=bool({want, got} == set(top2) and gap <= NEAR_TIE_REL * scale)))
  return report
