"""Tests for the speedup model and the bottleneck report."""

import dataclasses

import pytest

from specdec_jax import diagnose as dg
from specdec_jax.phase_timing import PhaseCosts


# ---------------------------------------------------------------- formulas


def test_tokens_per_call_hand_values():
  assert dg.tokens_per_call(0.5, 3) == pytest.approx(1.875)  # 1 + .5 + .25 + .125
  assert dg.tokens_per_call(0.0, 5) == 1.0
  assert dg.tokens_per_call(0.3, 0) == 1.0
  assert dg.tokens_per_call(1.0, 4) == 5.0
  assert dg.tokens_per_call(1.0 - 1e-12, 4) == pytest.approx(5.0)
  # Closed form (1 - a^(k+1)) / (1 - a).
  assert dg.tokens_per_call(0.8, 8) == pytest.approx((1 - 0.8 ** 9) / 0.2)


@pytest.mark.parametrize("a,k", [(-0.1, 2), (1.1, 2), (0.5, -1), (0.5, 1.5)])
def test_tokens_per_call_rejects_bad_input(a, k):
  with pytest.raises(ValueError):
    dg.tokens_per_call(a, k)


def test_predicted_speedup_hand_values():
  # 3.3616 tokens per call / (4 * 0.05 + 1).
  assert dg.predicted_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
  assert dg.predicted_speedup(0.5, 3, 0.1, verify_cost=1.3) == pytest.approx(1.875 / 1.6)
  assert dg.predicted_speedup(0.7, 0, 0.2) == 1.0  # K = 0 is plain decoding
  assert dg.predicted_speedup(1.0, 4, 0.0) == 5.0
  with pytest.raises(ValueError):
    dg.predicted_speedup(0.5, 2, -0.1)
  with pytest.raises(ValueError):
    dg.predicted_speedup(0.5, 2, 0.1, verify_cost=0.0)


def test_best_k_hand_values():
  # a=0.8, c=0.05: speedups by K are 1.714, 2.218, 2.567, 2.801, 2.951,
  # 3.040, 3.082, 3.0921 (K=8), 3.078 (K=9), ... so K=8 wins.
  k, s = dg.best_k(0.8, 0.05)
  assert k == 8
  assert s == pytest.approx((1 - 0.8 ** 9) / 0.2 / 1.4)
  assert dg.best_k(0.8, 0.05, k_max=2) == (2, pytest.approx(2.44 / 1.1))
  assert dg.best_k(0.5, 0.25) == (1, pytest.approx(1.2))  # K=2 gives 1.1667
  assert dg.best_k(0.1, 0.5) == (0, 1.0)
  assert dg.best_k(1.0, 0.0, k_max=5) == (5, 6.0)


def test_best_k_beats_plain_decoding_iff_a_exceeds_c():
  # With verify cost 1, K=1 gives (1 + a) / (1 + c), and a + ... + a^K <= K a.
  for a in (0.0, 0.1, 0.3, 0.5, 0.9):
    for c in (0.0, 0.05, 0.3, 0.5, 0.95):
      assert (dg.best_k(a, c)[0] > 0) == (a > c), (a, c)


def test_best_k_with_verify_cost_fn():
  # Fully sequential verify: K=1 gives 1.9 / 2.05 < 1.
  assert dg.best_k(0.9, 0.05, verify_cost_fn=lambda k: k + 1.0) == (0, 1.0)
  # Verify cost 1 + 0.1 K with a=0.8, c=0: K=1 1.8/1.1=1.636, K=2 2.44/1.2=2.033,
  # K=3 2.952/1.3=2.271, K=4 3.3616/1.4=2.401, K=5 3.68928/1.5=2.460,
  # K=6 3.951424/1.6=2.470, K=7 4.16114/1.7=2.448.
  k, s = dg.best_k(0.8, 0.0, verify_cost_fn=lambda k: 1 + 0.1 * k)
  assert k == 6 and s == pytest.approx(3.951424 / 1.6)


def test_fit_acceptance_inverts_tokens_per_call():
  assert dg.fit_acceptance(1.875, 3) == pytest.approx(0.5, abs=1e-8)
  assert dg.fit_acceptance(1.0, 4) == pytest.approx(0.0, abs=1e-8)
  assert dg.fit_acceptance(5.0, 4) == pytest.approx(1.0, abs=1e-8)
  for a in (0.05, 0.37, 0.8, 0.99):
    for k in (1, 4, 9):
      assert dg.fit_acceptance(dg.tokens_per_call(a, k), k) == pytest.approx(a, abs=1e-7)
  for bad in ((0.5, 4), (5.5, 4), (1.5, 0)):
    with pytest.raises(ValueError):
      dg.fit_acceptance(*bad)


def test_verify_slope_and_cost_fn():
  assert dg.verify_slope({1: 2.0, 2: 3.0, 4: 5.0}) == pytest.approx(1.0)
  assert dg.verify_slope({"8": 1.4}) == pytest.approx(0.05)  # anchored at (0, 1)
  assert dg.verify_slope({}) is None
  fn = dg.verify_cost_fn({2: 1.2, 4: 1.4})
  assert fn(2) == 1.2 and fn(0) == 1.0
  assert fn(8) == pytest.approx(1.8)


# ---------------------------------------------------------------- diagnose


def _codes(d):
  return [f.bottleneck for f in d.findings]


def test_low_acceptance_when_acceptance_is_the_binding_limit():
  # a=0.1, c=0.5: a free drafter could reach only 1/(1-a) ~ 1.11x, a perfect
  # drafter at c=0.5 ~ 1.89x, so acceptance, not cost, is what to fix.
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.1, k=4, cost_ratio_c=0.5,
                                  measured_speedup=0.36))
  assert d.bottleneck == "low_acceptance"
  assert d.best_k == 0 and d.best_k_speedup == 1.0
  assert "1.11x" in d.findings[0].message and "0.73x" in d.findings[0].message


def test_draft_too_expensive_when_cost_is_the_binding_limit():
  # a=0.5, c=0.6: free drafter ceiling 2.0x, perfect drafter ceiling
  # 17 / 10.6 = 1.60x at K=16, so cost binds; and a < c, so no K helps.
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.5, k=4, cost_ratio_c=0.6))
  assert d.bottleneck == "draft_too_expensive"
  assert d.best_k == 0
  # a=0.8, c=0.5: some gain, but at best 1.22x at K=2.
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.8, k=2, cost_ratio_c=0.5))
  assert d.bottleneck == "draft_too_expensive"
  assert d.best_k == 2


def test_k_too_long_for_acceptance():
  # a=0.6, c=0.02: best K=6 (2.17x); K=16 predicts 2.5/1.32 = 1.89x (< 90%).
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.6, k=16, cost_ratio_c=0.02))
  assert d.bottleneck == "low_acceptance"
  assert f"set K={d.best_k}" in d.findings[0].message
  assert d.best_k < 16


def test_verification_not_parallel():
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.9, k=4, cost_ratio_c=0.05,
                                  verify_cost_by_k={"1": 2.0, "2": 3.0, "4": 5.0, "8": 9.0},
                                  measured_speedup=0.76))
  assert _codes(d) == ["verification_not_parallel"]
  assert "1.00" in d.findings[0].message
  # The prediction includes the measured verify cost, so the slow verify is
  # not misreported as host overhead.
  assert d.predicted_speedup == pytest.approx(dg.tokens_per_call(0.9, 4) / 5.2)
  assert d.best_k == 0


def test_parallel_verify_is_not_flagged():
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.9, k=4, cost_ratio_c=0.05,
                                  verify_cost_by_k={1: 1.02, 2: 1.05, 4: 1.1, 8: 1.3}))
  assert d.bottleneck == "ok"


def test_recompilation():
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.8, k=4, cost_ratio_c=0.05,
                                  compiles_after_warmup=37, measured_speedup=2.7))
  assert d.bottleneck == "recompilation"
  assert "37" in d.findings[0].message


def test_not_exact_outranks_everything():
  d = dg.diagnose(dg.Measurements(outputs_identical=False, compiles_after_warmup=3,
                                  fidelity_passed=False, acceptance_rate=0.1, k=4,
                                  cost_ratio_c=0.5))
  assert _codes(d) == ["not_exact", "not_exact", "recompilation", "low_acceptance"]
  assert d.findings[0].severity == "error"
  healthy = dg.Measurements(outputs_identical=None, fidelity_passed=True)
  assert dg.diagnose(healthy).bottleneck == "ok"


def test_host_overhead_when_measured_far_below_predicted():
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.8, k=4, cost_ratio_c=0.05,
                                  measured_speedup=1.0))
  assert _codes(d) == ["host_overhead"]
  assert "2.80x" in d.findings[0].message and "36%" in d.findings[0].message


def test_host_overhead_from_fraction_and_from_given_prediction():
  d = dg.diagnose(dg.Measurements(host_overhead_fraction=0.45))
  assert d.bottleneck == "host_overhead" and "45%" in d.findings[0].message
  d = dg.diagnose(dg.Measurements(measured_speedup=1.1, predicted_speedup=2.5))
  assert d.bottleneck == "host_overhead"


def test_ok_with_healthy_run_and_fitted_acceptance():
  d = dg.diagnose(dg.Measurements(mean_tokens_per_call=dg.tokens_per_call(0.8, 8), k=8,
                                  cost_ratio_c=0.05, measured_speedup=3.0,
                                  host_overhead_fraction=0.05, compiles_after_warmup=0,
                                  outputs_identical=True))
  assert _codes(d) == ["ok"]
  assert d.acceptance_rate == pytest.approx(0.8, abs=1e-6)
  assert d.best_k == 8


def test_format_diagnosis():
  d = dg.diagnose(dg.Measurements(acceptance_rate=0.1, k=4, cost_ratio_c=0.5,
                                  compiles_after_warmup=2))
  text = dg.format_diagnosis(d)
  assert text.startswith("Bottleneck: recompilation")
  assert "low_acceptance" in text and "plain decoding" in text
  assert "measured=?x" in text
  assert dg.format_diagnosis(dg.diagnose(dg.Measurements())).startswith("Bottleneck: ok")


def test_measurements_from_a_benchmark_summary():
  summary = {"speedup": 1.4, "k": 4, "cost_ratio_c": 0.1, "acceptance_rate": 0.6,
             "baseline_tokens_per_call": None, "per_category": {}, "drafter": "ngram"}
  m = dg.Measurements.from_summary(summary)
  assert m == dg.Measurements(measured_speedup=1.4, k=4, cost_ratio_c=0.1,
                              acceptance_rate=0.6)   # unknown keys dropped, None = default
  assert dg.Measurements.from_summary({**summary, "measured_speedup": 2.0}).measured_speedup == 2.0
  with pytest.raises(TypeError, match="Measurements.from_summary"):
    dg.diagnose(summary)
  with pytest.raises(TypeError):
    dg.Measurements(speedup=1.4)   # a typo'd or aliased name is an error, not a skipped check


def test_prediction_uses_measured_tokens_per_call():
  # An n-gram run: drafts are accepted at a = 0.5 when proposed, but many
  # steps propose nothing, so pooled tokens per call is 1.27, far below the
  # i.i.d. 1 + a + ... + a^4 = 1.94. Measured 1.0x is then what the model
  # time predicts (1.27 / (4 * 0.01 + 1.29) = 0.955x), not host overhead.
  m = dg.Measurements(acceptance_rate=0.5, k=4, cost_ratio_c=0.01,
                      verify_cost_by_k={"4": 1.29}, measured_speedup=0.9)
  assert "host_overhead" in _codes(dg.diagnose(m))
  d = dg.diagnose(dataclasses.replace(m, tokens_per_call=1.27, baseline_tokens_per_call=1.0))
  assert "host_overhead" not in _codes(d)
  assert d.predicted_speedup == pytest.approx(1.27 / (0.04 + 1.29))
  # baseline_tokens_per_call scales the prediction (e.g. prefill counted).
  d = dg.diagnose(dataclasses.replace(m, tokens_per_call=1.27,
                                      baseline_tokens_per_call=1.27 / 2))
  assert d.predicted_speedup == pytest.approx(2 / 1.33)


def test_a_suggested_k_is_weighed_on_the_runs_basis():
  """The main job's case: a = 0.51 on drafted steps but 1.27 tokens per
  call pooled (most steps draft nothing), prefill 17%. The i.i.d. formula
  alone predicts 1.6x at the best K while the run's own prediction at K=4 is
  ~1.1x; the suggestion must be on the run's basis (measured tokens per call
  moved by the formula's ratio), or it promises a speedup no K gives."""
  m = dg.Measurements(acceptance_rate=0.51, k=4, cost_ratio_c=0.002,
                      verify_cost_by_k={"0": 1.0, "4": 1.12}, tokens_per_call=1.27,
                      prefill_fraction=0.17, measured_speedup=1.16)
  d = dg.diagnose(m)
  formula_k, formula_best = dg.best_k(0.51, 0.002, dg.K_MAX, dg.verify_cost_fn(m.verify_cost_by_k))
  assert d.best_k == formula_k and formula_best > 1.4
  moved = 1.27 * dg.tokens_per_call(0.51, formula_k) / dg.tokens_per_call(0.51, 4)
  verify = dg.verify_cost_fn(m.verify_cost_by_k)(formula_k)
  assert d.best_k_speedup == pytest.approx(
      1 / (0.17 + 0.83 * (formula_k * 0.002 + verify) / moved))
  assert d.best_k_speedup < 1.2 and d.best_k_speedup >= d.predicted_speedup
  assert f"({d.best_k_speedup:.2f}x)" in dg.format_diagnosis(d)


def test_prefill_share_limits_the_prediction():
  m = dg.Measurements(acceptance_rate=0.8, k=4, cost_ratio_c=0.05)
  decode_only = dg.diagnose(m).predicted_speedup
  assert decode_only == pytest.approx(dg.tokens_per_call(0.8, 4) / 1.2)
  # Amdahl: a quarter of plain decoding's time is prefill, which stays.
  d = dg.diagnose(dataclasses.replace(m, prefill_fraction=0.25))
  assert d.predicted_speedup == pytest.approx(1 / (0.25 + 0.75 / decode_only))
  with pytest.raises(ValueError, match="prefill_fraction"):
    dg.diagnose(dataclasses.replace(m, prefill_fraction=1.0))


def test_call_reduction_outranks_pooled_tokens_per_call():
  # Batch 8: rows average 2.5 tokens per call, but each batch runs until its
  # slowest row is done, so loop steps fall only 1.6x.
  m = dg.Measurements(k=4, cost_ratio_c=0.0, verify_cost_by_k={"4": 1.6},
                      tokens_per_call=2.5, call_reduction=1.6)
  assert dg.diagnose(m).predicted_speedup == pytest.approx(1.0)
  m = dataclasses.replace(m, call_reduction=None)
  assert dg.diagnose(m).predicted_speedup == pytest.approx(2.5 / 1.6)


def test_model_speedup_and_what_ifs_hand_values():
  """Plain: 2 batches x 0.1 s prefill + 100 steps x 0.01 s = 1.2 s.
  Speculative: 2 x 0.1 + 40 steps at width 1 (0.01 + 0.001 draft) + 20 at
  width 5 (0.016 + 0.001) = 0.2 + 0.44 + 0.34 = 0.98 s."""
  counts = dg.LoopCounts(batches=2, plain_steps=100, steps_by_width={1: 40, 5: 20},
                               perfect_steps=21)
  base = PhaseCosts(prefill_s=0.1, draft_s=0.0, verify_s_by_width={1: 0.01})
  spec = PhaseCosts(prefill_s=0.1, draft_s=0.001,
                             verify_s_by_width={1: 0.01, 5: 0.016})
  assert dg.model_speedup(counts, base, spec) == pytest.approx(1.2 / 0.98)
  what_if = dg.what_ifs(counts, base, spec)
  assert what_if["verify at one step's cost"] == pytest.approx(1.2 / (0.2 + 60 * 0.011))
  assert what_if["a free draft"] == pytest.approx(1.2 / (0.2 + 40 * 0.01 + 20 * 0.016))
  assert what_if["perfect acceptance"] == pytest.approx(1.2 / (0.2 + 21 * 0.017))
  assert what_if["no prefill"] == pytest.approx(1.0 / 0.78)
  assert dg.binding_cost(what_if) == ("perfect acceptance", what_if["perfect acceptance"])
  with pytest.raises(ValueError, match="what-if"):
    dg.model_speedup(counts, base, spec, "faster hardware")
