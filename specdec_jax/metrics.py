"""Acceptance statistics from per-row results.

Every statistic is computed per row first and then averaged over rows, so a
long completion counts as much as a short one (pooling lets long rows
dominate and hides a row whose acceptance collapsed).
"""

import collections
from typing import Sequence

import numpy as np

from specdec_jax.generation import RowResult


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def pooled_tokens_per_call(rows: Sequence[RowResult]) -> float:
  """Committed tokens per target call over all rows together (what timings
  pooled over the same rows compare with)."""
  tokens = sum(len(r.output_ids) for r in rows)
  return tokens / max(sum(r.target_calls for r in rows), 1)


def acceptance_summary(rows: Sequence[RowResult], k_max: int) -> dict:
  """Per-row-averaged acceptance statistics of one generation.

  Keys: acceptance_rate (accepted / evaluated drafts), mean_tokens_per_call
  (committed tokens per target call, the bonus or correction token
  included; averaged over rows, where ``pooled_tokens_per_call`` pools
  every token), acceptance_by_position,
  expected_acceptance_by_position (mean sum_v min(p, q) where evaluated),
  effective_k_histogram, wasted_drafts_per_token (proposed but rejected
  drafts per committed token), min_row_acceptance (a collapsing row shows).
  """
  rates, lengths, wasted = [], [], []
  by_pos = [[] for _ in range(k_max)]
  expected_by_pos = [[] for _ in range(k_max)]
  k_hist = collections.Counter()
  for row in rows:
    reached = np.asarray(row.reached_by_slot, float)
    accepted = np.asarray(row.accepted_by_slot, float)
    expected = np.asarray(row.expected_accept_by_slot, float)
    if reached.sum() > 0:
      rates.append(accepted.sum() / reached.sum())
    if row.target_calls:
      lengths.append(len(row.output_ids) / row.target_calls)
    if row.output_ids:
      proposed = sum(row.proposed_per_step)
      wasted.append((proposed - accepted.sum()) / len(row.output_ids))
    for i in range(min(k_max, len(reached))):
      if reached[i] > 0:
        by_pos[i].append(accepted[i] / reached[i])
        expected_by_pos[i].append(expected[i] / reached[i])
    k_hist.update(int(k) for k in row.proposed_per_step)
  return {
      "acceptance_rate": _mean(rates) if rates else 0.0,
      "min_row_acceptance": float(min(rates)) if rates else None,
      "mean_tokens_per_call": _mean(lengths),
      "acceptance_by_position": [_mean(v) for v in by_pos],
      "expected_acceptance_by_position": [_mean(v) for v in expected_by_pos],
      "effective_k_histogram": {str(k): n for k, n in sorted(k_hist.items())},
      "wasted_drafts_per_token": _mean(wasted),
  }

