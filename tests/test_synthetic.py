"""Systems benchmarking without real weights: rule="synthetic" (drafts
accepted with a set probability) and configs/shapes.py (real model shapes).

The measured per-slot acceptance matches the set probability within sampling
error, at 0 and 1 exactly; the probability is a traced value (no recompiles
across a sweep); outputs are not the target's. The shape configs have the
published models' parameter counts.
"""

import jax
import numpy as np
import pytest

from common import (TARGET, DRAFTERS, draft_params, init, load_config, make_prompts, outputs,
                    run_cli)
from specdec_jax import compile_count
from specdec_jax import runtime
from specdec_jax import verify
from specdec_jax.generation import Generator
from specdec_jax.models.transformer import Transformer

K = 4


def slot_acceptance(result) -> tuple[int, int]:
  """(drafts accepted, draft slots evaluated): slot i of a step is evaluated
  when every draft before it was accepted."""
  accepted = reached = 0
  for row in result.rows:
    for n, k in zip(row.accepted_per_step, row.proposed_per_step):
      accepted += n
      reached += min(n + 1, k)
  return accepted, reached


@pytest.fixture(scope="session")
def synthetic_setup():
  tp = init(TARGET, 0)
  dp = draft_params("model", 1, tp)
  gen = Generator(TARGET, DRAFTERS["model"], k_max=K, rule="synthetic", policy="fixed",
                  max_prompt_len=16, max_new_tokens=48, batch_size=8)
  return gen, tp, dp, make_prompts(3, n=8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_measured_acceptance_matches_the_set_probability(synthetic_setup, temperature):
  gen, tp, dp, prompts = synthetic_setup
  before = None
  for a in (0.0, 0.5, 0.9, 1.0):
    result = gen.generate(tp, dp, prompts, seeds=list(range(8)), temperature=temperature,
                          synthetic_acceptance=a)
    if before is None:   # the first call compiles; the other probabilities must not
      before = compile_count.loop_compiles()
    accepted, reached = slot_acceptance(result)
    assert reached > 300, reached
    rate = accepted / reached
    if a in (0.0, 1.0):
      assert rate == a, (a, rate)
    else:   # binomial error over the evaluated slots
      assert abs(rate - a) < 4 * np.sqrt(a * (1 - a) / reached), (a, rate, reached)
    if a == 1.0:   # every step commits K drafts + the target's token (until the cap)
      assert all(len(r.output_ids) == 48 and r.target_calls <= 48 // (K + 1) + 1
                 for r in result.rows), [r.target_calls for r in result.rows]
  assert compile_count.loop_compiles() == before


def test_synthetic_outputs_are_not_the_targets(synthetic_setup):
  """Negative control: at a = 0.9 random drafts are committed, so the text
  differs from plain greedy decoding (it would not if the rule still checked
  drafts against the target)."""
  gen, tp, dp, prompts = synthetic_setup
  plain = Generator(TARGET, max_prompt_len=16, max_new_tokens=48, batch_size=8)
  synthetic = gen.generate(tp, dp, prompts, synthetic_acceptance=0.9)
  reference = plain.generate(tp, None, prompts)
  assert sum(a != b for a, b in zip(outputs(synthetic), outputs(reference))) >= 6


@pytest.mark.parametrize("value", [1.5, -0.1, True, "0.5", float("nan")])
def test_bad_acceptance_is_refused(synthetic_setup, value):
  gen, tp, dp, prompts = synthetic_setup
  with pytest.raises(ValueError, match="synthetic_acceptance"):
    gen.generate(tp, dp, prompts, synthetic_acceptance=value)


def test_bad_acceptance_in_the_config_is_a_one_line_error(tmp_path, capsys):
  rc, _, err = run_cli(["--config=configs/tiny.py", f"--workdir={tmp_path}",
                        "--config.decode.rule=synthetic", "--config.decode.synthetic_acceptance=1.2"], capsys)
  assert rc == 2, err
  assert "config.decode.synthetic_acceptance=1.2 must be a number in [0, 1]" in err
  assert len(err.strip().splitlines()) == 1, err


# Published parameter counts (model cards / safetensors headers).
PUBLISHED = {"SmolLM2-135M": 134_515_008, "Llama-3.2-1B": 1_235_814_400,
             "Llama-3.1-8B": 8_030_261_248}


@pytest.mark.parametrize("variant, target, draft", [
    ("smollm2", "SmolLM2-135M", None),
    ("llama3_1b", "Llama-3.2-1B", None),
    ("llama3_8b_1b", "Llama-3.1-8B", "Llama-3.2-1B"),
])
def test_shape_configs_have_the_published_parameter_counts(variant, target, draft):
  config = load_config("configs/shapes.py", variant)
  runtime.validate_config(config)
  assert config.decode.rule == "synthetic"

  def count(model_config):
    shapes = Transformer(runtime.random_model_config(model_config)).expected_params_shapes()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))

  assert count(config.model) == PUBLISHED[target]
  if draft is not None:
    assert count(config.draft) == PUBLISHED[draft]
  assert config.draft.vocab_size == config.model.vocab_size


def test_which_outputs_the_benchmark_compares_with_plain_decoding():
  """Greedy output is plain greedy's under every rule but synthetic (typical
  included: temperature 0 accepts by argmax); sampled output only under the
  coupled rule."""
  assert {r for r in verify.RULES if verify.token_identical(r, greedy=True)} == (
      set(verify.RULES) - {"synthetic"})
  assert {r for r in verify.RULES if verify.token_identical(r, greedy=False)} == {"coupled"}
