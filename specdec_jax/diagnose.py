"""Predicted speedup of speculative decoding and a bottleneck report.

Pure Python, no JAX. The model is the one of Leviathan et al. (2023), Thm 3.8:
each draft token is accepted independently with probability ``a`` (the
acceptance rate), a drafter step costs ``c`` target decode steps, and one
target call verifies K drafts plus one token of its own. Then

    tokens per target call  = (1 - a^(K+1)) / (1 - a)  =  1 + a + ... + a^K
    predicted speedup       = tokens per call / (K c + verify_cost)

where ``verify_cost`` = (cost of one target call over K+1 tokens) / (cost of
one target decode step over 1 token). The paper assumes ``verify_cost = 1``
(the verify pass is memory-bound, so extra tokens are free); measuring it per
K shows when that assumption breaks.

``diagnose`` turns the measurements of one benchmark run into findings, each
with a bottleneck code (see ``BOTTLENECKS``) and a message with the numbers.

How acceptance and draft cost are told apart (``low_acceptance`` vs
``draft_too_expensive``): both limit the speedup through a ceiling.
  * acceptance ceiling: best speedup with a *free* drafter (c = 0) of the
    measured acceptance; about 1 / (1 - a).
  * cost ceiling: best speedup with a *perfect* drafter (a = 1) of the
    measured cost; about 1 / c.
The smaller ceiling is the binding limit and names the bottleneck. Example:
a = 0.1, c = 0.5 gives ceilings 1.11x (acceptance) and ~1.9x (cost), so the
verdict is ``low_acceptance``: no cheaper drafter can help, a better-aligned
one can. With verify_cost = 1, *some* K beats plain decoding iff a > c.
"""

import dataclasses

from specdec_jax import phase_timing

# Ordered by severity: correctness first, then compile-time problems, then
# model-level limits, then systems overhead. Findings are sorted in this order.
BOTTLENECKS = (
    "not_exact",
    "recompilation",
    "low_acceptance",
    "draft_too_expensive",
    "verification_not_parallel",
    "host_overhead",
    "ok",
)

K_MAX = 16
# Below this best predicted speedup, speculation is reported as not worth it.
MIN_WORTHWHILE_SPEEDUP = 1.25
# The configured K is reported as mis-chosen when its predicted speedup is
# below this fraction of the best K's.
K_MISMATCH_RATIO = 0.9
# Verify cost growing by more than this many decode steps per extra verified
# token counts as "not parallel" (1.0 = fully sequential, ~0 = ideal).
VERIFY_SLOPE_LIMIT = 0.5
# Measured speedup below this fraction of the prediction points at overhead
# outside the models.
HOST_GAP_RATIO = 0.8
# Share of wall time outside compiled calls above which it is reported.
HOST_FRACTION_LIMIT = 0.2


# ----------------------------------------------------------------------------
# Formulas.


def tokens_per_call(a: float, k: int) -> float:
  """Expected tokens committed per target call: (1 - a^(k+1)) / (1 - a).

  Computed as the sum 1 + a + ... + a^k, which is exact at a = 1 (k + 1).
  """
  _check_rate(a, "acceptance rate a")
  _check_k(k)
  return sum(a ** i for i in range(k + 1))


def predicted_speedup(a: float, k: int, c: float, verify_cost: float = 1.0) -> float:
  """Predicted speedup over plain decoding (Leviathan et al., Thm 3.8).

  Args:
    a: per-token acceptance rate in [0, 1].
    k: draft length K >= 0 (K = 0 is plain decoding: speedup 1 if
      verify_cost = 1).
    c: cost ratio (one draft step) / (one target decode step), >= 0.
    verify_cost: (one target call over K+1 tokens) / (one target decode
      step); 1.0 in the paper's model.
  """
  if c < 0:
    raise ValueError(f"cost ratio c must be >= 0, got {c}")
  if verify_cost <= 0:
    raise ValueError(f"verify_cost must be > 0, got {verify_cost}")
  return tokens_per_call(a, k) / (k * c + verify_cost)


def speedup_curve(a: float, c: float, k_max: int = K_MAX, verify_cost_fn=None) -> list:
  """Returns [(k, predicted_speedup)] for k = 1..k_max.

  verify_cost_fn: optional k -> verify cost ratio; None means 1.0 for all k.
  """
  curve = []
  for k in range(1, k_max + 1):
    verify_cost = 1.0 if verify_cost_fn is None else verify_cost_fn(k)
    curve.append((k, predicted_speedup(a, k, c, verify_cost)))
  return curve


def best_k(a: float, c: float, k_max: int = K_MAX, verify_cost_fn=None) -> tuple:
  """The draft length with the highest predicted speedup.

  Returns:
    (k, predicted_speedup) for the best k in 1..k_max (the smallest on ties),
    or (0, 1.0) when no k beats plain decoding.
  """
  if k_max < 1:
    raise ValueError(f"k_max must be >= 1, got {k_max}")
  k, speedup = max(speedup_curve(a, c, k_max, verify_cost_fn), key=lambda ks: ks[1])
  if speedup <= 1.0:
    return 0, 1.0
  return k, speedup


def fit_acceptance(mean_tokens_per_call: float, k: int, tol: float = 1e-10) -> float:
  """Acceptance rate a such that tokens_per_call(a, k) = mean_tokens_per_call.

  mean_tokens_per_call counts every token committed per target call, the
  target's own token included, so it lies in [1, k + 1]. Solved by bisection
  (tokens_per_call is increasing in a).
  """
  _check_k(k)
  if k < 1:
    raise ValueError("fit_acceptance needs k >= 1 (with k = 0 nothing is drafted)")
  length = float(mean_tokens_per_call)
  if not 1.0 - 1e-9 <= length <= k + 1 + 1e-9:
    raise ValueError(
        f"mean tokens per call {length} is outside [1, k + 1] = [1, {k + 1}]; it must "
        "count the accepted drafts plus the target's own token per call")
  lo, hi = 0.0, 1.0
  while hi - lo > tol:
    mid = (lo + hi) / 2
    if tokens_per_call(mid, k) < length:
      lo = mid
    else:
      hi = mid
  return (lo + hi) / 2


def _check_rate(a: float, name: str) -> None:
  if not 0.0 <= a <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {a}")


def _check_k(k: int) -> None:
  if int(k) != k or k < 0:
    raise ValueError(f"draft length k must be an integer >= 0, got {k}")


# ----------------------------------------------------------------------------
# Verify cost per K.


def verify_slope(verify_cost_by_k: dict) -> float | None:
  """Least-squares slope of verify cost vs K, in decode steps per token.

  The point (K=0, cost 1.0) holds by definition and is added unless given.
  Returns None when no K >= 1 was measured.
  """
  points = _verify_points(verify_cost_by_k)
  if len(points) < 2:
    return None
  return _fit_line(points)[0]


def verify_cost_fn(verify_cost_by_k: dict):
  """k -> verify cost: the measured value where available, else a line fit.

  The extrapolated slope is clamped at >= 0 so noise cannot make long drafts
  look cheaper to verify than short ones.
  """
  points = _verify_points(verify_cost_by_k)
  slope, intercept = _fit_line(points) if len(points) >= 2 else (0.0, 1.0)
  measured = dict(points)

  def cost(k: int) -> float:
    return measured.get(k, intercept + max(slope, 0.0) * k)

  return cost


def _verify_points(verify_cost_by_k: dict | None) -> list:
  """[(k, cost)] sorted by k; keys may be strings (after a JSON round trip)."""
  points = {int(k): float(v) for k, v in (verify_cost_by_k or {}).items()}
  points.setdefault(0, 1.0)
  return sorted(points.items())


def _fit_line(points: list) -> tuple:
  """(slope, intercept) of the least-squares line through [(x, y)]."""
  n = len(points)
  mean_x = sum(x for x, _ in points) / n
  mean_y = sum(y for _, y in points) / n
  sxx = sum((x - mean_x) ** 2 for x, _ in points)
  sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
  slope = sxy / sxx if sxx else 0.0
  return slope, mean_y - slope * mean_x


# ----------------------------------------------------------------------------
# Diagnosis.


@dataclasses.dataclass(frozen=True)
class Finding:
  """One problem found. severity: "error" | "warning" | "info"."""

  bottleneck: str
  severity: str
  message: str


@dataclasses.dataclass(frozen=True)
class Diagnosis:
  """Findings ordered by severity (``BOTTLENECKS`` order) plus key numbers.

  best_k / best_k_speedup: the best draft length predicted for the measured
  a and c (and measured verify costs, when given); k = 0 means plain decoding
  wins. predicted_speedup: the prediction the measured speedup was compared
  with. Any number may be None when its inputs were not measured.
  """

  findings: tuple
  best_k: int | None = None
  best_k_speedup: float | None = None
  acceptance_rate: float | None = None
  k: int | None = None
  cost_ratio_c: float | None = None
  predicted_speedup: float | None = None
  measured_speedup: float | None = None

  @property
  def bottleneck(self) -> str:
    """Code of the most severe finding ("ok" when none)."""
    return self.findings[0].bottleneck


@dataclasses.dataclass(frozen=True)
class Measurements:
  """What one run measured; None where it was not measured (the checks that
  need a missing value are skipped).

  acceptance_rate: per-token acceptance rate a (if None, fitted from
    mean_tokens_per_call and k). k: draft length. cost_ratio_c: draft step /
    target step. verify_cost_by_k: {k: verify cost ratio} (module docstring).
  host_overhead_fraction: wall time outside compiled calls / total.
  compiles_after_warmup: compilations after warm-up.
  outputs_identical: greedy speculative == greedy target. fidelity_passed:
    the sampling fidelity test's result. measured_speedup: over plain decoding.
  tokens_per_call / baseline_tokens_per_call: committed tokens per target
    call, pooled like the timings; with k and c the prediction is
    tokens_per_call / baseline_tokens_per_call / (K c + verify_cost), which
    holds for drafters that often propose fewer than K tokens (n-gram,
    threshold) where the i.i.d. formula from a overestimates.
  call_reduction: plain decoding's target calls per speculative target call,
    as loop steps (a batch runs until its slowest row is done); preferred
    over tokens_per_call when given.
  prefill_fraction: share of plain decoding's model time spent in prefill,
    which speculation does not shorten.
  predicted_speedup: used only when a, k or c is missing; otherwise the
    prediction is recomputed with the measured verify cost, so that a slow
    verify pass is not mistaken for host overhead.
  """

  acceptance_rate: float | None = None
  mean_tokens_per_call: float | None = None
  k: int | None = None
  cost_ratio_c: float | None = None
  verify_cost_by_k: dict | None = None
  host_overhead_fraction: float | None = None
  compiles_after_warmup: int | None = None
  outputs_identical: bool | None = None
  fidelity_passed: bool | None = None
  measured_speedup: float | None = None
  tokens_per_call: float | None = None
  baseline_tokens_per_call: float = 1.0
  call_reduction: float | None = None
  prefill_fraction: float = 0.0
  predicted_speedup: float | None = None

  @classmethod
  def from_summary(cls, summary: dict) -> "Measurements":
    """The fields of a benchmark summary (``job=benchmark``'s summary.json)
    that have these names; its ``speedup`` is the measured speedup. Other
    keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: v for n, v in summary.items() if n in names and v is not None}
    values.setdefault("measured_speedup", summary.get("speedup"))
    return cls(**values)


def diagnose(m: Measurements) -> Diagnosis:
  """Explains what limits the speedup of one measured run."""
  if not isinstance(m, Measurements):
    raise TypeError(f"diagnose takes a Measurements (Measurements.from_summary for a "
                    f"summary dict), got {type(m).__name__}")
  a, k, c = _measured_a_k_c(m)
  costs = m.verify_cost_by_k or None
  slope = verify_slope(costs) if costs else None
  measured_verify = verify_cost_fn(costs) if costs else None
  predicted = _prediction(m, a, k, c, measured_verify)
  measured = _float(m.measured_speedup)

  findings = _exactness_findings(m) + _recompilation_findings(m)
  if a is not None and c is not None:
    # After a verification finding, judge acceptance and cost as they will be
    # once verification is fixed (parallel, cost 1).
    parallel = slope is None or slope <= VERIFY_SLOPE_LIMIT
    findings += _acceptance_cost_findings(a, k, c, measured_verify if parallel else None)
  if slope is not None and slope > VERIFY_SLOPE_LIMIT:
    findings.append(_verification_finding(costs, slope))
  findings += _host_findings(measured, predicted, _float(m.host_overhead_fraction))

  findings.sort(key=lambda f: BOTTLENECKS.index(f.bottleneck))
  best = best_k(a, c, K_MAX, measured_verify) if a is not None and c is not None else (None, None)
  if best[0] and predicted is not None and k:
    best = (best[0], _prediction_at(m, a, k, c, measured_verify, best[0]))
  if not findings:
    findings = [_ok_finding(measured, predicted, k, best)]
  return Diagnosis(tuple(findings), best[0], best[1], a, k, c, predicted, measured)


def _float(value):
  return None if value is None else float(value)


def _measured_a_k_c(m: Measurements) -> tuple:
  """Acceptance rate, K and c from the measurements (None where unknown)."""
  k = None if m.k is None else int(m.k)
  c = _float(m.cost_ratio_c)
  if c is not None and c < 0:
    raise ValueError(f"cost_ratio_c must be >= 0, got {c}")
  a = _float(m.acceptance_rate)
  length = _float(m.mean_tokens_per_call)
  if a is None and length is not None and k:
    a = fit_acceptance(length, k)
  if a is not None:
    _check_rate(a, "acceptance_rate")
  return a, k, c


def _prediction(m: Measurements, a, k, c, verify_fn) -> float | None:
  """Predicted speedup at the run's K, with the measured verify cost if any."""
  verify_cost = 1.0 if verify_fn is None or k is None else verify_fn(k)
  reduction = _float(m.call_reduction)
  if reduction is None and m.tokens_per_call is not None:
    reduction = float(m.tokens_per_call) / float(m.baseline_tokens_per_call)
  if reduction is not None and k is not None and c is not None:
    decode_speedup = reduction / (k * c + verify_cost)
  elif a is None or k is None or c is None:
    return _float(m.predicted_speedup)
  else:
    decode_speedup = predicted_speedup(a, k, c, verify_cost)
  prefill = float(m.prefill_fraction)
  if not 0.0 <= prefill < 1.0:
    raise ValueError(f"prefill_fraction must be in [0, 1), got {prefill}")
  return 1.0 / (prefill + (1.0 - prefill) / decode_speedup)


def _prediction_at(m: Measurements, a, k, c, verify_fn, k_new: int) -> float | None:
  """The run's prediction (``_prediction``: measured tokens per call and
  prefill share where known) at K=k_new instead of k: the measured tokens
  per call moved by the formula's ratio 1 + a + .. + a^K, so that a suggested
  K is weighed on the run's basis. (The formula alone assumes every step
  drafts K with acceptance a; under the auto policy or a lookup drafter most
  steps may draft nothing.)"""
  reduction = _float(m.call_reduction)
  if reduction is None and m.tokens_per_call is not None:
    reduction = float(m.tokens_per_call) / float(m.baseline_tokens_per_call)
  if reduction is not None:
    reduction *= tokens_per_call(a, k_new) / tokens_per_call(a, k)
  moved = dataclasses.replace(m, k=k_new, call_reduction=reduction)
  return _prediction(moved, a, k_new, c, verify_fn)


def _exactness_findings(m: Measurements) -> list:
  findings = []
  if m.outputs_identical is False:
    findings.append(Finding("not_exact", "error", (
        "Greedy speculative output differs from plain greedy decoding of the target, so "
        "speed numbers mean nothing yet. Check that draft i is compared with the target "
        "logits at position length+i-1, and that the bonus token reaches the draft cache.")))
  if m.fidelity_passed is False:
    findings.append(Finding("not_exact", "error", (
        "The sampling fidelity test failed: outputs do not follow the target distribution. "
        "Check that p and q are warped by the same function in float32 and that q is the "
        "exact distribution each draft token was sampled from.")))
  return findings


def _recompilation_findings(m: Measurements) -> list:
  compiles = m.compiles_after_warmup
  if not compiles:
    return []
  return [Finding("recompilation", "warning", (
      f"{int(compiles)} compilation(s) after warm-up; each costs seconds of wall time. "
      "Something reaching jit changes shape, dtype or a static value between calls: "
      "Python scalars of varying type, unpadded prompt lengths or batch sizes."))]


def _acceptance_cost_findings(a: float, k, c: float, verify_fn) -> list:
  """low_acceptance / draft_too_expensive, attributed by the binding ceiling."""
  curve = speedup_curve(a, c, K_MAX, verify_fn)
  top_k, top = max(curve, key=lambda ks: ks[1])
  code, why = _binding_limit(a, c, verify_fn)
  numbers = f"a={a:.2f}, c={c:.2f}"
  if top <= 1.0:
    return [Finding(code, "warning", (
        f"No K beats plain decoding ({numbers}: best predicted {top:.2f}x at K={top_k}). "
        + why))]
  if k is not None and k >= 1:
    at_k = predicted_speedup(a, k, c, 1.0 if verify_fn is None else verify_fn(k))
    if at_k < K_MISMATCH_RATIO * top and top_k < k:
      return [Finding(code, "warning", (
          f"K={k} is too long for {numbers}: predicted {at_k:.2f}x vs {top:.2f}x at "
          f"K={top_k}; set K={top_k}. " + why))]
  if top < MIN_WORTHWHILE_SPEEDUP:
    return [Finding(code, "warning", (
        f"Speculation gains little ({numbers}: best predicted {top:.2f}x at K={top_k}). "
        + why))]
  return []


def _binding_limit(a: float, c: float, verify_fn) -> tuple:
  """(code, sentence) naming the smaller of the acceptance and cost ceilings."""
  free_draft = max(s for _, s in speedup_curve(a, 0.0, K_MAX, verify_fn))
  perfect_draft = max(s for _, s in speedup_curve(1.0, c, K_MAX, verify_fn))
  if free_draft <= perfect_draft:
    return "low_acceptance", (
        f"Acceptance is the binding limit: even a free drafter would reach only "
        f"{free_draft:.2f}x, a perfect one at this cost {perfect_draft:.2f}x; use a drafter "
        "better aligned with the target (same family, distilled, n-gram on copy-heavy text).")
  return "draft_too_expensive", (
      f"Draft cost is the binding limit: a perfect drafter at this cost would reach only "
      f"{perfect_draft:.2f}x, a free one with this acceptance {free_draft:.2f}x; use a "
      "cheaper drafter (fewer layers, smaller width, or n-gram).")


def _verification_finding(costs: dict, slope: float) -> Finding:
  points = [(k, v) for k, v in _verify_points(costs) if k >= 1]
  listed = ", ".join(f"K={k}: {v:.2f}" for k, v in points)
  return Finding("verification_not_parallel", "warning", (
      f"Verifying K+1 tokens costs {slope:.2f} extra decode steps per token ({listed}); "
      "a parallel verify pass stays near 1 step for small K. The target call over K+1 "
      "tokens is serialised or compute-bound (per-token loop, large batch, CPU)."))


def _host_findings(measured, predicted, host_fraction) -> list:
  parts = []
  if measured is not None and predicted:
    ratio = measured / predicted
    if ratio < HOST_GAP_RATIO:
      parts.append(
          f"Measured speedup {measured:.2f}x is {100 * ratio:.0f}% of the predicted "
          f"{predicted:.2f}x.")
  if host_fraction is not None and host_fraction > HOST_FRACTION_LIMIT:
    parts.append(f"{100 * host_fraction:.0f}% of wall time is spent outside compiled calls.")
  if not parts:
    return []
  parts.append(
      "Time goes outside the models: per-step host syncs, a Python-driven loop, dispatch "
      "or transfers; use the fused while_loop path and profile one step.")
  return [Finding("host_overhead", "warning", " ".join(parts))]


def _ok_finding(measured, predicted, k, best) -> Finding:
  if measured is None and predicted is None and best[0] is None:
    return Finding("ok", "info", "Nothing to check: no speedup, acceptance or cost measured.")
  parts = ["No bottleneck found."]
  if measured is not None and predicted:
    parts.append(f"Measured {measured:.2f}x vs predicted {predicted:.2f}x.")
  best_k_value, best_speedup = best
  if best_k_value is not None and k is not None and best_k_value != k:
    parts.append(f"K={best_k_value} is predicted to do better ({best_speedup:.2f}x).")
  return Finding("ok", "info", " ".join(parts))


def format_diagnosis(d: Diagnosis) -> str:
  """Multi-line, human-readable report."""
  lines = [f"Bottleneck: {d.bottleneck}"]
  lines.append(
      f"  a={_fmt(d.acceptance_rate, '.3f')}  K={_fmt(d.k, 'd')}  "
      f"c={_fmt(d.cost_ratio_c, '.3f')}  measured={_fmt(d.measured_speedup, '.2f')}x  "
      f"predicted={_fmt(d.predicted_speedup, '.2f')}x")
  if d.best_k is not None:
    best = "plain decoding" if d.best_k == 0 else f"K={d.best_k}"
    lines.append(f"  best predicted: {best} ({d.best_k_speedup:.2f}x)")
  for i, f in enumerate(d.findings, start=1):
    lines.append(f"  {i}. [{f.severity}] {f.bottleneck}: {f.message}")
  return "\n".join(lines)


def _fmt(value, spec: str) -> str:
  return "?" if value is None else format(value, spec)


# ----------------------------------------------------------------------------
# Model time from the loop's own step counts, and what-ifs.


@dataclasses.dataclass(frozen=True)
class LoopCounts:
  """What a benchmark run did, in compiled-loop iterations (a batch runs
  until its slowest row is done)."""

  batches: int
  plain_steps: int            # plain decoding's iterations
  steps_by_width: dict        # {verify width: speculative iterations at it}
  perfect_steps: int          # iterations had every draft been accepted (widest width)


WHAT_IFS = ("verify at one step's cost", "a free draft", "perfect acceptance", "no prefill")


def model_speedup(counts: LoopCounts, base: phase_timing.PhaseCosts,
                  spec: phase_timing.PhaseCosts,
                  what_if: str | None = None) -> float:
  """Plain model time / speculative model time, from phase costs and counts:
  prefill per batch, then per iteration one draft phase and one verify pass
  at that iteration's width (plain: one width-1 pass). ``what_if`` (one of
  ``WHAT_IFS``) changes one cost or count."""
  step_s = base.verify_s_by_width[1]
  verify = dict(spec.verify_s_by_width)
  steps = dict(counts.steps_by_width)
  draft_s, prefill = spec.draft_s, (base.prefill_s, spec.prefill_s)
  if what_if == "verify at one step's cost":
    verify = {w: step_s for w in verify}
  elif what_if == "a free draft":
    draft_s = 0.0
  elif what_if == "perfect acceptance":
    steps = {max(verify): counts.perfect_steps}
  elif what_if == "no prefill":
    prefill = (0.0, 0.0)
  elif what_if is not None:
    raise ValueError(f"unknown what-if {what_if!r}; expected one of {WHAT_IFS}")
  plain = counts.batches * prefill[0] + counts.plain_steps * step_s
  speculative = counts.batches * prefill[1] + sum(
      n * (draft_s + verify[w]) for w, n in steps.items())
  return plain / speculative


def what_ifs(counts: LoopCounts, base: phase_timing.PhaseCosts,
             spec: phase_timing.PhaseCosts) -> dict:
  """{what-if: predicted speedup} for each of ``WHAT_IFS``."""
  return {name: model_speedup(counts, base, spec, name) for name in WHAT_IFS}


def binding_cost(what_if_speedups: dict) -> tuple[str, float]:
  """The what-if that gains most, and its predicted speedup."""
  return max(what_if_speedups.items(), key=lambda item: item[1])
