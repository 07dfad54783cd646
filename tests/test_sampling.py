"""Warping logits to probabilities and sampling with per-position keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from specdec_jax import sampling


def warp(logits, temperature=1.0, top_k=0, top_p=1.0):
  params = sampling.SamplingParams.create(temperature, top_k, top_p)
  return np.asarray(sampling.warp(jnp.asarray(logits, jnp.float32), params))


# Probabilities 0.5, 0.25, 0.15, 0.1 in a shuffled order, so that the sort
# inside warp matters.
HAND_PROBS = np.array([0.15, 0.5, 0.1, 0.25])
HAND_LOGITS = np.log(HAND_PROBS)
ORDER = [1, 3, 0, 2]   # indices by decreasing probability


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0), dict(temperature=0.3), dict(temperature=2.5),
    dict(temperature=1.0, top_k=5), dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.3, top_k=7, top_p=0.5), dict(temperature=0.0),
])
def test_warp_sums_to_one(kwargs):
  logits = np.random.default_rng(0).normal(size=(3, 4, 50)) * 4
  probs = warp(logits, **kwargs)
  assert probs.shape == logits.shape
  assert probs.dtype == np.float32
  assert np.all(probs >= 0)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_sampled_warp_is_warp_at_positive_temperature():
  """The compiled sampling paths' warp (no argmax one-hot) equals warp
  wherever temperature > 0."""
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, 50)) * 4, jnp.float32)
  for t, k, p in ((1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.5)):
    params = sampling.SamplingParams.create(t, k, p)
    np.testing.assert_array_equal(np.asarray(sampling.warp(logits, params, sampled=True)),
                                  np.asarray(sampling.warp(logits, params)))


def test_temperature_changes_sharpness():
  logits = np.random.default_rng(1).normal(size=(20,)) * 2
  np.testing.assert_allclose(warp(logits, 1.0), jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(warp(logits, 0.5), jax.nn.softmax(logits / 0.5), rtol=1e-5,
                             atol=1e-7)


def test_temperature_zero_is_onehot_argmax():
  logits = np.random.default_rng(2).normal(size=(6, 30)) * 3
  probs = warp(logits, temperature=0.0)
  expected = np.eye(30, dtype=np.float32)[logits.argmax(-1)]
  np.testing.assert_array_equal(probs, expected)
  # top-k / top-p settings do not change the greedy one-hot.
  np.testing.assert_array_equal(warp(logits, 0.0, top_k=3, top_p=0.5), expected)


@pytest.mark.parametrize("k", [1, 2, 5, 29, 30, 100])
def test_top_k_keeps_exactly_k(k):
  rng = np.random.default_rng(3)
  logits = np.stack([rng.permutation(30) * 0.1 for _ in range(4)]).astype(np.float32)
  probs = warp(logits, 1.0, top_k=k)
  kept = min(k, 30)
  assert np.all((probs > 0).sum(-1) == kept)
  for row, p in zip(logits, probs):
    top = np.argsort(-row)[:kept]
    assert set(np.nonzero(p)[0]) == set(top)
    # Renormalised softmax over the kept logits.
    np.testing.assert_allclose(p[top], jax.nn.softmax(row[top]), rtol=1e-5)


@pytest.mark.parametrize("top_p,num_kept", [
    (0.3, 1), (0.49, 1), (0.6, 2), (0.74, 2), (0.76, 3), (0.88, 3), (0.91, 4), (1.0, 4)])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, num_kept):
  probs = warp(HAND_LOGITS, 1.0, top_p=top_p)
  kept = ORDER[:num_kept]
  assert set(np.nonzero(probs)[0]) == set(kept)
  np.testing.assert_allclose(probs[kept], HAND_PROBS[kept] / HAND_PROBS[kept].sum(), rtol=1e-5)


def test_top_p_applies_after_temperature():
  # At T=2 the probabilities become sqrt(p) renormalised: .370, .262, .203,
  # .165. Mass before the third token is .632 < 0.7, so three are kept; at
  # T=1 the mass before the third is .75 >= 0.7, so two are kept.
  hot = warp(HAND_LOGITS, 2.0, top_p=0.7)
  assert set(np.nonzero(hot)[0]) == set(ORDER[:3])
  flat = np.sqrt(HAND_PROBS)[ORDER[:3]]
  np.testing.assert_allclose(hot[ORDER[:3]], flat / flat.sum(), rtol=1e-5)
  assert set(np.nonzero(warp(HAND_LOGITS, 1.0, top_p=0.7))[0]) == set(ORDER[:2])


def test_top_k_then_top_p():
  # top_k=3 renormalises {0.5, 0.25, 0.15} to {.556, .278, .167}; then the
  # mass before the third token is .833 >= 0.8, so top_p keeps two tokens.
  # top_p=0.8 alone keeps three (mass before the third is 0.75).
  assert (warp(HAND_LOGITS, 1.0, top_p=0.8) > 0).sum() == 3
  both = warp(HAND_LOGITS, 1.0, top_k=3, top_p=0.8)
  assert set(np.nonzero(both)[0]) == set(ORDER[:2])
  np.testing.assert_allclose(both[ORDER[:2]], [2 / 3, 1 / 3], rtol=1e-5)
  # top_k=1 wins over any top_p.
  assert set(np.nonzero(warp(HAND_LOGITS, 1.0, top_k=1, top_p=0.99))[0]) == {ORDER[0]}


def test_top_p_keeps_ties():
  logits = np.log(np.array([0.3, 0.3, 0.3, 0.1]))
  probs = warp(logits, 1.0, top_p=0.35)
  # The second 0.3 is needed to reach 0.35; the third ties with it and is
  # kept too (the cut is by value, so equal logits are never split).
  assert (probs > 0).sum() == 3
  np.testing.assert_allclose(probs[:3], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6)


def test_sampling_params_changing_never_recompiles():
  from specdec_jax import compile_count
  compile_count.install()
  fn = jax.jit(sampling.warp)
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10)), jnp.float32)
  fn(logits, sampling.SamplingParams.create(1.0, 0, 1.0))
  before = compile_count.count("warp")
  for t, k, p in [(0.0, 0, 1.0), (0.5, 3, 0.9), (2.0, 0, 0.3), (1.0, 10, 1.0)]:
    fn(logits, sampling.SamplingParams.create(t, k, p))
  assert compile_count.count("warp") == before


# ----------------------------------------------------------------------------
# Empirical frequencies match the warped probabilities.

NUM_SAMPLES = 20_000


@pytest.fixture(scope="session")
def sample_fn():
  return jax.jit(lambda probs, keys: sampling.sample(probs, keys))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=3),
])
def test_sample_frequencies_match_warped_probs(sample_fn, kwargs):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(8,)).astype(np.float32) * 1.5
  probs = warp(logits, **kwargs)
  keys_B2 = jnp.tile(jax.random.PRNGKey(11)[None], (NUM_SAMPLES, 1))
  keys = sampling.position_keys(keys_B2, jnp.arange(NUM_SAMPLES), sampling.TARGET)
  # Distinct keys for every position.
  assert len({tuple(k) for k in np.asarray(keys)[:2000].tolist()}) == 2000
  samples = np.asarray(sample_fn(jnp.tile(jnp.asarray(probs)[None], (NUM_SAMPLES, 1)), keys))
  counts = np.bincount(samples, minlength=8)
  support = probs > 0
  assert counts[~support].sum() == 0, "sampled a token outside the warped support"
  if "top_k" in kwargs:
    assert support.sum() == 3
  expected = probs[support].astype(np.float64)
  _, p_value = scipy.stats.chisquare(counts[support], NUM_SAMPLES * expected / expected.sum())
  assert p_value > 1e-3, (counts, probs * NUM_SAMPLES)


@pytest.mark.parametrize("block", [16, 7])
def test_two_level_sample_frequencies_match_probs(block):
  """Several blocks (the last one partial, zero-probability tokens): the
  two-level draw still samples p exactly."""
  rng = np.random.default_rng(block)
  probs = rng.dirichlet(np.full(40, 0.5)).astype(np.float32)
  probs[[3, 17, 30]] = 0.0
  probs /= probs.sum()
  keys_B2 = jnp.tile(jax.random.PRNGKey(3)[None], (NUM_SAMPLES, 1))
  keys = sampling.position_keys(keys_B2, jnp.arange(NUM_SAMPLES), sampling.TARGET)
  fn = jax.jit(functools.partial(sampling.sample, block=block))
  samples = np.asarray(fn(jnp.tile(jnp.asarray(probs)[None], (NUM_SAMPLES, 1)), keys))
  counts = np.bincount(samples, minlength=40)
  assert counts[probs == 0].sum() == 0
  big = probs * NUM_SAMPLES >= 5
  small = ~big & (probs > 0)
  observed, expected = counts[big], probs[big] * NUM_SAMPLES
  if small.any():   # rare tokens pooled into one bin
    observed = np.append(observed, counts[small].sum())
    expected = np.append(expected, probs[small].sum() * NUM_SAMPLES)
  assert big.sum() > 20
  expected = expected.astype(np.float64)
  _, p_value = scipy.stats.chisquare(observed, expected * observed.sum() / expected.sum())
  assert p_value > 1e-3, p_value
  # One key couples two close distributions: they mostly pick the same token.
  nearby = probs * np.exp(rng.normal(size=40).astype(np.float32) * 0.05)
  nearby /= nearby.sum()
  other = np.asarray(fn(jnp.tile(jnp.asarray(nearby)[None], (NUM_SAMPLES, 1)), keys))
  assert np.mean(other == samples) > 0.9


def test_sample_frequencies_detect_wrong_distribution(sample_fn):
  """The chi-square check above can fail: samples of T=1 vs T=0.7 probs."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(8,)).astype(np.float32) * 1.5
  keys_B2 = jnp.tile(jax.random.PRNGKey(11)[None], (NUM_SAMPLES, 1))
  keys = sampling.position_keys(keys_B2, jnp.arange(NUM_SAMPLES), sampling.TARGET)
  samples = np.asarray(sample_fn(jnp.tile(jnp.asarray(warp(logits, 1.0))[None],
                                          (NUM_SAMPLES, 1)), keys))
  counts = np.bincount(samples, minlength=8)
  wrong = warp(logits, 0.7).astype(np.float64)
  _, p_value = scipy.stats.chisquare(counts, NUM_SAMPLES * wrong / wrong.sum())
  assert p_value < 1e-6


def test_position_keys_depend_on_request_position_and_purpose():
  keys_B2 = jax.vmap(jax.random.PRNGKey)(jnp.arange(3, dtype=jnp.uint32))
  base = np.asarray(sampling.position_keys(keys_B2, jnp.array([5, 5, 5]), sampling.TARGET))
  assert len({tuple(k) for k in base.tolist()}) == 3          # per request
  other_pos = np.asarray(sampling.position_keys(keys_B2, jnp.array([6, 6, 6]), sampling.TARGET))
  other_use = np.asarray(sampling.position_keys(keys_B2, jnp.array([5, 5, 5]), sampling.DRAFT))
  assert not (base == other_pos).all(-1).any()
  assert not (base == other_use).all(-1).any()
  # A row's key does not depend on the other rows of the batch.
  alone = np.asarray(sampling.position_keys(keys_B2[1:2], jnp.array([5]), sampling.TARGET))
  np.testing.assert_array_equal(alone[0], base[1])
  # [B, K] positions give the same keys as [B] positions column by column.
  grid = np.asarray(sampling.position_keys(keys_B2, jnp.array([[5, 6]] * 3), sampling.TARGET))
  np.testing.assert_array_equal(grid[:, 0], base)
  np.testing.assert_array_equal(grid[:, 1], other_pos)


def test_uniform_in_unit_interval():
  keys = sampling.position_keys(jnp.tile(jax.random.PRNGKey(0)[None], (5000, 1)),
                                jnp.arange(5000), sampling.ACCEPT)
  u = np.asarray(sampling.uniform(keys))
  assert u.min() >= 0 and u.max() < 1
  assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3


# ----------------------------------------------------------------------------
# Validation.

@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_validation_errors(kwargs, field):
  full = dict(temperature=1.0, top_k=0, top_p=1.0)
  full.update(kwargs)
  with pytest.raises(ValueError, match=field):
    sampling.validate(**full)
  with pytest.raises(ValueError, match=field):
    sampling.SamplingParams.create(**full)


def test_validation_accepts_edges():
  sampling.validate(0.0, 0, 1.0)
  sampling.validate(5.0, 1, 1e-6)


def reference_truncated_probs(logits_NV, temperature, top_k, top_p):
  """Top-k then top-p by a full sort in numpy (float64), ties kept."""
  out = []
  for row in np.asarray(logits_NV, np.float64) / temperature:
    order = np.argsort(-row, kind="stable")
    kth = row[order[min(top_k, row.size) - 1]] if top_k > 0 else -np.inf
    kept = row >= kth
    probs = np.where(kept, np.exp(row - row.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
      mass_before = np.cumsum(probs[order]) - probs[order]
      cut = row[order[np.sum(mass_before < top_p) - 1]]
      kept &= row >= cut
    probs = np.where(kept, np.exp(row - row.max()), 0.0)
    out.append(probs / probs.sum())
  return np.stack(out)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.95), (0, 0.5), (3000, 1.0), (2000, 0.9),
                                         (5, 0.95)])
def test_truncation_past_the_candidate_cap_matches_a_full_sort(top_k, top_p):
  # A vocabulary of 8192 and flat rows: the nucleus (or top_k) holds more
  # than the 1024 candidates, so the bisection fallback sets the cut; the
  # peaked last row alone would not need it.
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(4, 8192)).astype(np.float32) * np.array([[0.3], [1.0], [2.0], [8.0]],
                                                                    np.float32)
  assert sampling.TRUNCATE_CANDIDATES < 8192
  probs = warp(logits, 1.0, top_k=top_k, top_p=top_p)
  expected = reference_truncated_probs(logits, 1.0, top_k, top_p)
  np.testing.assert_array_equal(probs > 0, expected > 0)
  np.testing.assert_allclose(probs, expected, rtol=2e-4, atol=1e-9)
  if top_k == 0:
    assert (probs[0] > 0).sum() > sampling.TRUNCATE_CANDIDATES   # the fallback was needed


def test_largest_threshold_bisection_handles_negative_zero_and_inf():
  values = jnp.asarray([[-3.0, -0.0, 0.0, 2.5, -jnp.inf, 2.5]], jnp.float32)
  ones = jnp.ones_like(values)
  for count, expected in [(1, 2.5), (2, 2.5), (3, 0.0), (5, -3.0), (6, -jnp.inf), (9, -jnp.inf)]:
    got = sampling._largest_threshold(values, ones, jnp.full((1, 1), count, jnp.float32))
    assert float(got[0, 0]) == expected, (count, got)


def test_a_rows_cut_does_not_depend_on_its_batch():
  # Row 0 is peaked (its nucleus lies inside the candidates); batched with a
  # flat row that needs the fallback, its probabilities stay bit-identical.
  rng = np.random.default_rng(11)
  peaked = (rng.normal(size=(1, 8192)) * 8).astype(np.float32)
  flat = (rng.normal(size=(1, 8192)) * 0.3).astype(np.float32)
  alone = warp(peaked, 1.0, top_p=0.9)
  together = warp(np.concatenate([peaked, flat]), 1.0, top_p=0.9)
  np.testing.assert_array_equal(together[0], alone[0])
  assert (together[1] > 0).sum() > sampling.TRUNCATE_CANDIDATES
