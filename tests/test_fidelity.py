"""Distribution checks: exact rules preserve the warped target distribution.

``run_fidelity`` enumerates the exact distribution of the next 3 tokens of a
vocab-6 random target and compares 10k speculative samples with it by a
chi-square test (the exact rules pass at p 0.4-0.8; the broken rules below
fail it at p < 1e-30 with 3k samples). K=2 < 3 tokens, so full acceptances put bonus tokens into
the samples; every exact row asserts that drafts were accepted, rejected and
bonus tokens drawn. A lossy rule and deliberately broken rejection rules (the
residual, the acceptance ratio, the bonus position) must be caught by the
same test (negative controls). Two exact rows run with bf16 params and
caches as well.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import tiny_config as _tiny_config
from specdec_jax import fidelity
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax import verify
from specdec_jax.jobs.fidelity import run_fidelity
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

MIN_SAMPLES = 10_000
# The negative controls' samples: at 3,000 the mildest bug below (the
# residual) scores p ~ 1e-32 and the lossy typical rule ~ 1e-155, against
# the 1e-3 they must fall below (measured; 10,000 only adds orders).
CONTROL_SAMPLES = 3_000
K = 2


def tiny_config(num_samples=MIN_SAMPLES, **changes):
  config = _tiny_config(job="fidelity", k=K, **{"fidelity.num_samples": num_samples}, **changes)
  assert config.decode.k < config.fidelity.num_tokens   # the bonus token is sampled
  return config


def quiet(*_):
  pass


WARPS = {
    "t1": dict(temperature=1.0),
    "t0.7_p0.9": dict(temperature=0.7, top_p=0.9),
    "topk5": dict(temperature=1.0, top_k=5),
}


# ----------------------------------------------------------------------------
# Exact rules pass.

_SHARED_GENERATORS = {}
_SHARED_MODELS = {}


@pytest.fixture
def share_generators(monkeypatch):
  """run_fidelity builds new random models and a new Generator per call. The
  warp settings are traced run-time values, so one compiled Generator per
  (drafter, rule, policy) serves all warps, and the (deterministic) random
  models are built once. This saves most compiles, and is itself a check: a
  warp setting baked into the compiled loop would fail the test."""
  original_generator, original_load = runtime.Runtime.generator, runtime.load_model

  def generator(self, **overrides):
    c = self.config
    d = c.decode
    key = (d.drafter, d.rule, d.policy, d.k, d.k_max, c.batch_size, c.max_prompt_len,
           c.max_new_tokens, self.target.cfg, self.drafter, tuple(sorted(overrides.items())))
    if key not in _SHARED_GENERATORS:
      _SHARED_GENERATORS[key] = original_generator(self, **overrides)
    return _SHARED_GENERATORS[key]

  def load_model(model_config, config, *args, **kwargs):
    if model_config.source != "random" or any(a is not None for a in args) or kwargs:
      return original_load(model_config, config, *args, **kwargs)
    key = repr(sorted(model_config.to_dict().items()))
    if key not in _SHARED_MODELS:
      _SHARED_MODELS[key] = original_load(model_config, config, *args, **kwargs)
    return _SHARED_MODELS[key]

  monkeypatch.setattr(runtime.Runtime, "generator", generator)
  monkeypatch.setattr(runtime, "load_model", load_model)


def assert_drafts_accepted_rejected_and_bonus_drawn(stats, n):
  assert stats["accepted"] > 0.1 * n, stats
  assert stats["proposed"] - stats["accepted"] > 0.1 * n, stats    # rejections
  assert stats["bonus_tokens"] > 0.02 * n, stats


BF16 = {"model.dtype": "bfloat16", "draft.dtype": "bfloat16"}
EXACT_CASES = {
    # (drafter, rule, warp, extra config)
    "model-rejection-t1": ("model", "rejection", "t1", {}),
    "model-rejection-t0.7_p0.9": ("model", "rejection", "t0.7_p0.9", {}),
    "model-rejection-topk5": ("model", "rejection", "topk5", {}),
    "model-coupled-t1": ("model", "coupled", "t1", {}),
    "model-coupled-t0.7_p0.9": ("model", "coupled", "t0.7_p0.9", {}),
    "ngram-rejection-t1": ("ngram", "rejection", "t1", {}),
    # Draft-length policies under rejection sampling.
    "adaptive-rejection-t1": ("model", "rejection", "t1", dict(policy="adaptive")),
    "threshold-rejection-t0.7_p0.9": ("model", "rejection", "t0.7_p0.9",
                                      dict(policy="threshold", tau=0.3)),
    "budget-rejection-t1": ("model", "rejection", "t1", dict(policy="budget", budget=2500)),
    # bf16 params and caches (logits, softmax and acceptance stay float32).
    "bf16-model-rejection-t1": ("model", "rejection", "t1", BF16),
    "bf16-model-coupled-t1": ("model", "coupled", "t1", BF16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_rule_preserves_distribution(share_generators, case):
  drafter, rule, warp, extra = EXACT_CASES[case]
  config = tiny_config(drafter=drafter, rule=rule, **WARPS[warp], **extra)
  assert config.fidelity.vocab_size == 6   # top-k 5 really truncates
  assert config.fidelity.num_samples >= MIN_SAMPLES
  stats = run_fidelity(config, log=quiet)
  assert stats["n_samples"] >= MIN_SAMPLES
  assert stats["impossible_samples"] == 0
  assert stats["passed"], stats
  assert stats["p_value"] > 1e-3, stats
  assert stats["exact_rule"]
  if drafter == "ngram":   # the lookup rarely matches in 3 tokens of a random text
    assert stats["accepted"] > 0.01 * stats["n_samples"], stats
  else:
    assert_drafts_accepted_rejected_and_bonus_drawn(stats, stats["n_samples"])


# ----------------------------------------------------------------------------
# Negative controls: the same test catches a lossy or a broken rule.

@pytest.mark.slow
def test_typical_with_different_draft_fails():
  config = tiny_config(CONTROL_SAMPLES, drafter="model", rule="typical", temperature=1.0)
  stats = run_fidelity(config, log=quiet)
  assert not stats["passed"], stats
  assert stats["p_value"] < 1e-3
  assert not stats["exact_rule"]


def _take_row(x_BK_, index_B):
  return jnp.take_along_axis(
      x_BK_, index_B.reshape((-1, 1) + (1,) * (x_BK_.ndim - 2)), axis=1)[:, 0]


def _residual_is_p(p_BK1V, q_BKV, draft_BK, n_B, rejected_B):
  """Bug: after a rejection, the correction comes from p, not max(0, p - q)."""
  return _take_row(p_BK1V, n_B)


def _bonus_one_slot_early(p_BK1V, q_BKV, draft_BK, n_B, rejected_B):
  """Bug: after full acceptance, the bonus comes from p at slot n - 1 (the
  last draft's distribution) instead of slot n."""
  right = ORIGINAL_NEXT(p_BK1V, q_BKV, draft_BK, n_B, rejected_B)
  early = _take_row(p_BK1V, jnp.maximum(n_B - 1, 0))
  return jnp.where(rejected_B[:, None], right, early)


def _ratio_without_q(u_BK, p_draft_BK, q_draft_BK):
  """Bug: accept with probability p(d) instead of min(1, p(d) / q(d))."""
  return u_BK < p_draft_BK


ORIGINAL_NEXT = verify.next_token_distribution
BROKEN = {
    "residual": ("next_token_distribution", _residual_is_p),
    "bonus_position": ("next_token_distribution", _bonus_one_slot_early),
    "acceptance_ratio": ("accept_test", _ratio_without_q),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", list(BROKEN))
def test_broken_rejection_rule_is_caught(monkeypatch, bug):
  """Each deliberate bug in rejection sampling shifts the distribution of
  the samples, and the chi-square test must notice (while drafts are still
  accepted and bonus tokens drawn, so the bug is exercised)."""
  name, broken = BROKEN[bug]
  monkeypatch.setattr(verify, name, broken)
  config = tiny_config(CONTROL_SAMPLES, drafter="model", rule="rejection", temperature=1.0)
  stats = run_fidelity(config, log=quiet)
  assert stats["accepted"] > 0 and stats["bonus_tokens"] > 0, stats
  assert stats["p_value"] < 1e-3, stats
  assert not stats["passed"]


# ----------------------------------------------------------------------------
# The statistics themselves (cheap, numpy only).

EXPECTED = {(a, b): p for (a, b), p in zip(
    [(a, b) for a in range(3) for b in range(3)],
    [0.2, 0.1, 0.05, 0.15, 0.15, 0.0, 0.1, 0.05, 0.2])}


def draw(probs, n, seed):
  keys = list(probs)
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(keys), size=n, p=np.asarray([probs[k] for k in keys]))
  return [keys[i] for i in idx]


def test_chi_square_accepts_exact_samples():
  p_values = [fidelity.chi_square_test(draw(EXPECTED, 20_000, s), EXPECTED)["p_value"]
              for s in range(5)]
  assert min(p_values) > 1e-3
  stats = fidelity.chi_square_test(draw(EXPECTED, 20_000, 0), EXPECTED)
  assert stats["n_samples"] == 20_000
  assert stats["impossible_samples"] == 0
  assert stats["tv_distance"] < 0.02


def test_chi_square_flags_wrong_samples():
  wrong = dict(EXPECTED)
  wrong[(0, 0)], wrong[(2, 2)] = 0.17, 0.23   # a 3-point shift of mass
  stats = fidelity.chi_square_test(draw(wrong, 20_000, 1), EXPECTED)
  assert stats["p_value"] < 1e-6
  assert stats["tv_distance"] > 0.02


def test_chi_square_flags_impossible_samples():
  samples = draw(EXPECTED, 20_000, 2)
  samples[0] = (1, 2)   # probability 0
  stats = fidelity.chi_square_test(samples, EXPECTED)
  assert stats["impossible_samples"] == 1
  assert stats["p_value"] == 0.0


def test_chi_square_pools_rare_bins():
  probs = {(i,): 0.9 / 5 for i in range(5)}
  probs.update({(5 + i,): 0.1 / 50 for i in range(50)})   # expected count 4 each
  samples = draw(probs, 2000, 3)
  stats = fidelity.chi_square_test(samples, probs)
  assert stats["dof"] == 5   # five big bins + one pooled bin, minus one
  assert stats["p_value"] > 1e-3


def test_exact_sequence_probs_is_a_distribution():
  model = Transformer(ModelConfig(vocab_size=5, num_layers=1, d_model=16, num_heads=2,
                                  num_kv_heads=1, head_dim=8, ffn_dim=32))
  params = jax.jit(model.init_params)(jax.random.PRNGKey(0))
  prompt = [0, 1, 2]
  sp = sampling.SamplingParams.create(1.0, 0, 1.0)
  probs = fidelity.exact_sequence_probs(model, params, prompt, 2, sp)
  assert len(probs) == 25
  assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
  # Chain rule by hand for one continuation.
  seq = (3, 1)
  tokens = jnp.asarray([prompt + list(seq)])
  logits, _ = jax.jit(model.apply)(params, tokens, jnp.arange(5)[None],
                                   model.init_cache(1, 5))
  p = np.asarray(jax.nn.softmax(logits[0], axis=-1))
  assert probs[seq] == pytest.approx(p[2, 3] * p[3, 1], rel=1e-4)
  # top-k 2 leaves at most 2 tokens per position.
  top2 = fidelity.exact_sequence_probs(model, params, prompt, 2,
                                       sampling.SamplingParams.create(1.0, 2, 1.0))
  assert sum(v > 0 for v in top2.values()) <= 4
  assert sum(top2.values()) == pytest.approx(1.0, abs=1e-5)
