"""bf16 end to end on CPU: greedy identity, near-ties and the numerics-matched mode.

In bf16 the verify pass (K+1 rows) and a plain step (1 row) multiply
matrices of different shapes, so their rounding differs and a greedy argmax
can flip where the target's two best logits are within rounding of each
other. The target here is big enough for that to happen (d_model 512: XLA:CPU
blocks its bf16 matmuls differently at 1 and 5 rows; at d_model 64 it does
not and nothing ever differs), drafting for itself so that nearly every
token comes out of a verify pass.

* Default mode: speculative greedy may part from plain greedy, but only at a
  near-tie (both tokens are the target's top two and the gap is within
  ``fidelity.NEAR_TIE_REL`` of the largest logit); the check itself flags a
  mismatch at a clear gap (negative control).
* Numerics-matched mode (``decode.matched_verify_widths``): greedy and
  coupled sampling are token-identical to the plain baseline on the same
  prompts and seeds where the default mode parts.
(Rejection and coupled fidelity in bf16: tests/test_fidelity.py.)
"""

import jax
import numpy as np
import pytest

from common import VOCAB, init, tiny_config
from specdec_jax import decode
from specdec_jax import fidelity
from specdec_jax import runtime
from specdec_jax.drafters import ModelDrafter
from specdec_jax.generation import Generator
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

# Compiled as users run it (optimisation passes on): the rounding under test
# belongs to the optimised program (with the passes off, 1- and 5-row passes
# round alike here and nothing ever differs).
pytestmark = [pytest.mark.slow, pytest.mark.optimized_xla]

TARGET = Transformer(ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=512, num_heads=8,
                                 num_kv_heads=2, head_dim=64, ffn_dim=1024, dtype="bfloat16"))
K, MAX_NEW, BATCH = 4, 32, 32
SEEDS = (0, 2)   # params seeds


def _prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, int(rng.integers(2, 12))).tolist() for _ in range(BATCH)]


def _generator(k_max, matched, rule="rejection"):
  return Generator(TARGET, ModelDrafter(TARGET) if k_max else None, k_max=k_max, rule=rule,
                   max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=BATCH,
                   verify_widths=decode.matched_verify_widths(K) if matched else None)


@pytest.fixture(scope="session")
def bf16_greedy():
  """{(mode, seed): (params, plain rows, speculative rows)}, greedy."""
  prompts, out = _prompts(), {}
  for matched in (False, True):
    plain, spec = _generator(0, matched), _generator(K, matched)
    for seed in SEEDS:
      params = init(TARGET, seed)
      out["matched" if matched else "default", seed] = (
          params, plain.generate(params, None, prompts).rows,
          spec.generate(params, params, prompts, k=K).rows)
  return prompts, out


def _ids(rows):
  return [r.output_ids for r in rows]


def test_params_and_caches_are_bf16():
  params = init(TARGET, 0)
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  cache = TARGET.init_cache(1, 8)
  assert {str(x.dtype) for x in jax.tree.leaves(cache)} == {"bfloat16"}


def test_default_mode_parts_from_plain_greedy_only_at_near_ties(bf16_greedy):
  prompts, out = bf16_greedy
  found = []
  for seed in SEEDS:
    params, plain, spec = out["default", seed]
    assert sum(sum(r.accepted_per_step) for r in spec) > 0.8 * BATCH * MAX_NEW
    found += fidelity.greedy_divergences(TARGET, params, prompts, _ids(plain), _ids(spec))
  # Without a mismatch here the matched mode's test below would show nothing.
  assert found, "no bf16 greedy mismatch in the default mode on this machine"
  for d in found:
    assert d["near_tie"], d
  rows, compared = np.sum([fidelity.divergence_counts(_ids(out["default", seed][1]),
                                                       _ids(out["default", seed][2]))
                           for seed in SEEDS], axis=0)
  assert rows == len(found)
  print(f"bf16 default mode: {len(found)} rows of {len(SEEDS) * BATCH} part from plain greedy "
        f"({1000 * len(found) / compared:.2f} per 1,000 tokens compared), top-2 gaps "
        f"{[round(d['gap'], 4) for d in found]} at max |logit| ~{found[0]['scale']:.1f}")


def test_the_near_tie_check_flags_a_mismatch_at_a_clear_gap(bf16_greedy):
  """Negative control: a wrong token where the target is sure (its top-2 gap
  is large) or a token outside the top two is not a near-tie."""
  prompts, out = bf16_greedy
  params, plain, _ = out["default", SEEDS[0]]
  expected = _ids(plain)
  report = fidelity.greedy_divergences(TARGET, params, prompts, expected, expected)
  assert report == []
  broken = [list(ids) for ids in expected]
  broken[0][3] = (broken[0][3] + 1) % VOCAB             # some other token
  [d] = fidelity.greedy_divergences(TARGET, params, prompts, expected, broken)
  assert (d["row"], d["position"]) == (0, 3) and not d["near_tie"], d
  assert d["gap"] > fidelity.NEAR_TIE_REL * d["scale"] or d["actual_token"] not in d["top2"]


def test_matched_mode_greedy_is_token_identical_in_bf16(bf16_greedy):
  _, out = bf16_greedy
  for seed in SEEDS:
    _, plain, spec = out["matched", seed]
    assert _ids(spec) == _ids(plain), seed
    assert sum(sum(r.accepted_per_step) for r in spec) > 0.8 * BATCH * MAX_NEW
    assert {w for r in spec for w in r.width_per_step} == {K + 1}


def test_matched_mode_coupled_sampling_is_token_identical_in_bf16():
  prompts, params = _prompts(), init(TARGET, SEEDS[0])
  kwargs = dict(seeds=list(range(BATCH)), temperature=1.0)
  plain = _generator(0, True).generate(params, None, prompts, **kwargs).rows
  spec = _generator(K, True, rule="coupled").generate(params, params, prompts, k=K, **kwargs).rows
  assert _ids(spec) == _ids(plain)
  assert sum(sum(r.accepted_per_step) for r in spec) > 0.5 * BATCH * MAX_NEW


def test_matched_numerics_from_the_config():
  """``config.decode.matched_numerics``: the baseline and the speculative Generator
  share the one verify width K + 1 (and so the cache length); bad values are
  refused before anything is built."""
  config = tiny_config(drafter="model", k=3, matched_numerics=True)
  rt = runtime.build(config)
  base, spec = rt.generator(baseline=True), rt.generator()
  assert base.k_max == 0 and spec.k_max == 3
  assert base.verify_widths == spec.verify_widths == (4,)
  assert base.num_slots == spec.num_slots
  rt.config.decode.matched_numerics = False
  assert rt.generator(baseline=True).verify_widths == (1,)
  bad = tiny_config()
  with bad.ignore_type():
    bad.decode.matched_numerics = 1
  with pytest.raises(ValueError, match="config.decode.matched_numerics"):
    runtime.validate_config(bad)
