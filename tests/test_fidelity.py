"""Distribution checks: exact rules preserve the warped target distribution.

``run_fidelity`` enumerates the exact distribution of the next 3 tokens of a
vocab-6 random target and compares 20k speculative samples with it by a
chi-square test. A lossy rule and a deliberately broken rejection rule must be
caught by the same test (negative controls).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import fidelity
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax import verify
from specdec_jax.jobs.fidelity import run_fidelity
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_SAMPLES = 20_000


def tiny_config(**changes):
  spec = importlib.util.spec_from_file_location("tiny_config", REPO_ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.job = "fidelity"
  for key, value in changes.items():
    config[key] = value
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
  (drafter, rule) serves all three warps, and the (deterministic) random
  models are built once. This saves most compiles, and is itself a check: a
  warp setting baked into the compiled loop would fail the test."""
  original_generator, original_load = runtime.Runtime.generator, runtime.load_model

  def generator(self, **overrides):
    c = self.config
    key = (c.drafter, c.rule, c.policy, c.k, c.k_max, c.batch_size, c.max_prompt_len,
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


@pytest.mark.slow
@pytest.mark.parametrize("warp", list(WARPS))
@pytest.mark.parametrize("drafter,rule", [
    ("model", "rejection"), ("model", "coupled"), ("ngram", "rejection")])
def test_exact_rule_preserves_distribution(share_generators, drafter, rule, warp):
  config = tiny_config(drafter=drafter, rule=rule, **WARPS[warp])
  assert config.fidelity.vocab_size == 6   # top-k 5 really truncates
  assert config.fidelity.num_samples >= MIN_SAMPLES
  stats = run_fidelity(config, log=quiet)
  assert stats["n_samples"] >= MIN_SAMPLES
  assert stats["impossible_samples"] == 0
  assert stats["passed"], stats
  assert stats["p_value"] > 1e-3, stats
  assert stats["exact_rule"]


# ----------------------------------------------------------------------------
# Negative controls: the same test catches a lossy or a broken rule.

@pytest.mark.slow
def test_typical_with_different_draft_fails():
  config = tiny_config(drafter="model", rule="typical", temperature=1.0)
  stats = run_fidelity(config, log=quiet)
  assert not stats["passed"], stats
  assert stats["p_value"] < 1e-3
  assert not stats["exact_rule"]


def _take_row(x_BK_, index_B):
  return jnp.take_along_axis(
      x_BK_, index_B.reshape((-1, 1) + (1,) * (x_BK_.ndim - 2)), axis=1)[:, 0]


@pytest.mark.slow
def test_broken_rejection_rule_is_caught(monkeypatch):
  """After a rejection, sampling from p instead of the residual max(0, p - q)
  over-weights tokens the draft likes; the chi-square test must notice."""
  original = verify.rejection_accept

  def broken_rejection_accept(draft_BK, q_BKV, p_BK1V, num_proposed_B, keys_B2, length_B):
    n_B, x_B = original(draft_BK, q_BKV, p_BK1V, num_proposed_B, keys_B2, length_B)
    rejected_B = n_B < num_proposed_B
    keys = sampling.position_keys(keys_B2, length_B + n_B, sampling.RESIDUAL)
    from_p_B = sampling.sample(_take_row(p_BK1V, n_B), keys)
    return n_B, jnp.where(rejected_B, from_p_B, x_B)

  monkeypatch.setattr(verify, "rejection_accept", broken_rejection_accept)
  config = tiny_config(drafter="model", rule="rejection", temperature=1.0)
  stats = run_fidelity(config, log=quiet)
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
