"""job=benchmark: plain (K=0) vs speculative decoding in one process.

After a warm-up that compiles every prompt bucket, the compiled phases are
timed (prefill, draft, verify at every static width) in alternating rounds
for both generators; the auto policy's costs come from these figures. Then
baseline and speculative runs alternate over the same prompts,
``benchmark.repeats`` times, per prompt category; medians are reported.

Next to the measured speedup it reports: the memory roofline of a plain step
(weights and KV cache over a bandwidth measured in the same run) and the
fraction of it achieved, plain and speculative; the model-time prediction
from the measured phase costs and the loop's own step counts per verify
width; and what-ifs (verification at one step's cost, a free draft, perfect
acceptance, no prefill), naming the cost that binds.
"""

import collections
import os
import time

import numpy as np

from specdec_jax import compile_count
from specdec_jax import diagnose
from specdec_jax import metrics
from specdec_jax import phase_timing
from specdec_jax import roofline
from specdec_jax import runtime
from specdec_jax import verify
from specdec_jax.jobs import generate as generate_job
from specdec_jax.jobs import io


def _phase_costs(config, rt, base_gen, spec_gen, probe, base_kwargs, spec_kwargs):
  """Seconds of one prefill, draft phase and verify phase (at every width),
  on the compiled phases the loop uses, for the baseline and the speculative
  generator, plus the memory bandwidth.

  The two generators are measured in alternating rounds, each with a
  bandwidth measurement, and each field is the median over rounds, so a slow
  spell of the machine hits all of them alike (one back-to-back measurement
  of each varied the verify/step ratio by 1.3-2.4x at K=8 on a quiet 2-core
  CPU).
  """
  rounds = {"baseline": [], "speculative": []}
  bandwidth = []
  for _ in range(max(1, config.benchmark.timing_rounds)):
    for name, gen, kwargs in (("baseline", base_gen, base_kwargs),
                              ("speculative", spec_gen, spec_kwargs)):
      rounds[name].append(phase_timing.measure(gen, rt.target_params, rt.draft_params, probe,
                                               iters=config.benchmark.timing_iters, **kwargs))
    bandwidth.append(roofline.measure_bandwidth())
  return (phase_timing.median(rounds["baseline"]), phase_timing.median(rounds["speculative"]),
          float(np.median(bandwidth)))


def run_benchmark(config, rt: runtime.Runtime, log=print) -> tuple[dict, list]:
  """Runs the measurement; returns (summary, per-prompt records)."""
  if rt.drafter is None:
    raise ValueError("config.job=benchmark needs a drafter (config.decode.drafter=ngram or model)")
  prompts = runtime.load_prompt_list(config)
  prompt_ids = [rt.encode_prompt(p) for p in prompts]
  categories = [generate_job.prompt_record(p)[1] for p in prompts]
  seeds = [config.seed + i for i in range(len(prompts))]
  base_gen = rt.generator(baseline=True)
  spec_gen = rt.generator()
  base_kwargs, spec_kwargs = rt.run_kwargs(baseline=True), rt.run_kwargs()
  d, s = config.decode, config.sampling
  spec_gen.validate(prompt_ids, [config.max_new_tokens] * len(prompts), d.k, s.temperature,
                    s.top_k, s.top_p, seeds, d.tau, d.budget)

  groups = collections.OrderedDict()
  for i, category in enumerate(categories):
    groups.setdefault(category, []).append(i)

  log(f"warm-up: compiling for {len(prompts)} prompts ({len(groups)} categories)")
  for _ in range(max(1, config.benchmark.warmup)):
    for idx in groups.values():
      ids = [prompt_ids[i] for i in idx]
      s = [seeds[i] for i in idx]
      base_gen.generate(rt.target_params, rt.draft_params, ids, seeds=s, **base_kwargs)
      spec_gen.generate(rt.target_params, rt.draft_params, ids, seeds=s, **spec_kwargs)
  log("timing the compiled phases (prefill, draft, verify at every width) and the "
      "memory bandwidth")
  base_costs, spec_costs, bandwidth = _phase_costs(
      config, rt, base_gen, spec_gen, [prompt_ids[0]], base_kwargs, spec_kwargs)
  if config.decode.policy == "auto":
    spec_kwargs = dict(spec_kwargs, costs=phase_timing.policy_costs(
        spec_costs, spec_gen.verify_widths, config.decode.k))
  compiles_warm = compile_count.loop_compiles()

  times = {c: {"baseline": [], "speculative": []} for c in groups}
  base_rows, spec_rows = {}, {}
  start = time.perf_counter()
  for repeat in range(config.benchmark.repeats):
    for category, idx in groups.items():
      ids = [prompt_ids[i] for i in idx]
      s = [seeds[i] for i in idx]
      base = base_gen.generate(rt.target_params, rt.draft_params, ids, seeds=s, **base_kwargs)
      spec = spec_gen.generate(rt.target_params, rt.draft_params, ids, seeds=s, **spec_kwargs)
      times[category]["baseline"].append(base.wall_time_s)
      times[category]["speculative"].append(spec.wall_time_s)
      for i, b_row, s_row in zip(idx, base.rows, spec.rows):
        base_rows[i], spec_rows[i] = b_row, s_row
    elapsed = time.perf_counter() - start
    eta = elapsed / (repeat + 1) * (config.benchmark.repeats - repeat - 1)
    log(f"repeat {repeat + 1}/{config.benchmark.repeats} done "
        f"({elapsed:.0f}s, ETA {eta:.0f}s)")
  compiles_after_warmup = compile_count.loop_compiles() - compiles_warm

  target_step_s = base_costs.verify_s
  cost_ratio_c = spec_costs.draft_s / (config.decode.k * target_step_s)
  verify_cost = spec_costs.verify_s / target_step_s
  verify_cost_by_width = {str(w): v / target_step_s
                          for w, v in spec_costs.verify_s_by_width.items()}
  ordered_base = [base_rows[i] for i in range(len(prompts))]
  ordered_spec = [spec_rows[i] for i in range(len(prompts))]
  greedy = config.sampling.temperature == 0
  comparable = verify.token_identical(config.decode.rule, greedy)
  identical = [b.output_ids == s.output_ids for b, s in zip(ordered_base, ordered_spec)]
  k_slots = spec_gen.k_max
  acc = metrics.acceptance_summary(ordered_spec, k_slots)

  def tokens(rows):
    return sum(len(r.output_ids) for r in rows)

  per_category = []
  for category, idx in groups.items():
    base_t = float(np.median(times[category]["baseline"]))
    spec_t = float(np.median(times[category]["speculative"]))
    cat_spec_rows = [spec_rows[i] for i in idx]
    cat_acc = metrics.acceptance_summary(cat_spec_rows, k_slots)
    per_category.append({
        "category": category, "num_prompts": len(idx),
        "baseline_s": base_t, "speculative_s": spec_t, "speedup": base_t / spec_t,
        "baseline_tokens_per_s": tokens(base_rows[i] for i in idx) / base_t,
        "speculative_tokens_per_s": tokens(cat_spec_rows) / spec_t,
        "acceptance_rate": cat_acc["acceptance_rate"],
        "mean_tokens_per_call": cat_acc["mean_tokens_per_call"],
    })
  a = acc["acceptance_rate"]
  base_total = sum(r["baseline_s"] for r in per_category)
  spec_total = sum(r["speculative_s"] for r in per_category)
  spec_calls = sum(r.target_calls for r in ordered_spec)
  base_calls = sum(r.target_calls for r in ordered_base)
  # Pooled over all rows, like the timings they are compared with (the
  # per-row means in ``acc`` weight a short row as much as a long one).
  tokens_per_call = metrics.pooled_tokens_per_call(ordered_spec)
  baseline_tokens_per_call = metrics.pooled_tokens_per_call(ordered_base)
  # Prefill is the same work in both runs and speculation does not speed it
  # up; its share of plain decoding's model time enters the prediction.
  counts = _loop_counts(groups, ordered_base, ordered_spec, config.batch_size, k_slots)
  # The baseline as plain width-1 steps (its own width is k_max+1 in the
  # numerics-matched mode).
  base_phases = phase_timing.PhaseCosts(base_costs.prefill_s, 0.0, {1: target_step_s})
  model_prediction = diagnose.model_speedup(counts, base_phases, spec_costs)
  what_if = diagnose.what_ifs(counts, base_phases, spec_costs)
  binding, binding_speedup = diagnose.binding_cost(what_if)
  prefill_time = counts.batches * base_costs.prefill_s
  prefill_fraction = prefill_time / (prefill_time + counts.plain_steps * target_step_s)
  model_time = counts.batches * spec_costs.prefill_s + sum(
      n * (spec_costs.draft_s + spec_costs.verify_s_by_width[w])
      for w, n in counts.steps_by_width.items())
  base_steps, spec_steps = counts.plain_steps, sum(counts.steps_by_width.values())
  # The memory roofline of a plain step: its weights and KV cache over the
  # bandwidth measured in this run.
  step_bytes = roofline.step_bytes(rt.target.cfg, rt.target_params, config.batch_size,
                                   base_gen.num_slots)
  roofline_step_s = step_bytes / bandwidth
  roofline_tokens_per_s = config.batch_size / roofline_step_s
  summary = {
      "job": "benchmark", "drafter": config.decode.drafter, "rule": config.decode.rule,
      "exact_rule": verify.is_exact(config.decode.rule, config.sampling.temperature == 0),
      "synthetic_acceptance": (config.decode.synthetic_acceptance
                               if config.decode.rule == "synthetic" else None),
      "matched_numerics": config.decode.matched_numerics,
      "tree_nodes": int(config.decode.tree_nodes), "tree_topk": int(config.decode.tree_topk),
      "tree_candidates": str(config.decode.tree_candidates),
      "verify_width": spec_gen.verify_widths[-1],
      "policy": config.decode.policy, "k": config.decode.k, "k_max": k_slots,
      **config.sampling,
      "batch_size": config.batch_size, "num_prompts": len(prompts),
      "max_new_tokens": config.max_new_tokens, "repeats": config.benchmark.repeats,
      "speedup": base_total / spec_total,
      "baseline_s": base_total, "speculative_s": spec_total,
      "baseline_tokens_per_s": tokens(ordered_base) / base_total,
      "speculative_tokens_per_s": tokens(ordered_spec) / spec_total,
      "target_calls_baseline": base_calls, "target_calls_speculative": spec_calls,
      "cost_ratio_c": cost_ratio_c, "verify_cost_ratio": verify_cost,
      "target_step_s": target_step_s, "draft_phase_s": spec_costs.draft_s,
      "verify_phase_s": spec_costs.verify_s, "prefill_s": base_costs.prefill_s,
      "prefill_fraction": prefill_fraction,
      "loop_steps_baseline": base_steps, "loop_steps_speculative": spec_steps,
      "call_reduction": base_steps / max(spec_steps, 1),
      "tokens_per_call": tokens_per_call,
      "baseline_tokens_per_call": baseline_tokens_per_call,
      "verify_cost_by_k": {str(config.decode.k): verify_cost},
      "verify_cost_by_width": verify_cost_by_width,
      "loop_steps_by_width": {str(w): n for w, n in counts.steps_by_width.items()},
      "model_predicted_speedup": model_prediction,
      "what_if_speedup": what_if,
      "binding_cost": binding, "binding_cost_speedup": binding_speedup,
      "bandwidth_gb_s": bandwidth / 1e9, "step_bytes": step_bytes,
      "roofline_step_s": roofline_step_s,
      "roofline_fraction_plain": roofline_step_s / target_step_s,
      "roofline_tokens_per_s": roofline_tokens_per_s,
      "roofline_fraction_speculative": (tokens(ordered_spec) / spec_total) / roofline_tokens_per_s,
      # Leviathan et al.'s i.i.d. model from the per-token acceptance rate;
      # it overestimates drafters that often propose fewer than K tokens.
      "predicted_speedup_iid": diagnose.predicted_speedup(a, config.decode.k, cost_ratio_c,
                                                          verify_cost),
      "host_overhead_fraction": max(0.0, 1.0 - model_time / spec_total),
      "outputs_identical": all(identical) if comparable else None,
      "num_outputs_different": (len(identical) - sum(identical)) if comparable else None,
      "compiles_warmup": compiles_warm,
      "compiles_after_warmup": compiles_after_warmup,
      "per_category": per_category,
      **acc,
  }
  diagnosis = diagnosis_of(summary)
  # From the measured call reduction, c, verify cost and prefill share: the
  # gap to the measured speedup is time outside the models.
  summary["predicted_speedup"] = diagnosis.predicted_speedup
  summary["diagnosis"] = {
      "bottleneck": diagnosis.bottleneck, "best_k": diagnosis.best_k,
      "best_k_predicted_speedup": diagnosis.best_k_speedup,
      "findings": [{"bottleneck": f.bottleneck, "message": f.message}
                   for f in diagnosis.findings]}
  records = []
  for i, prompt in enumerate(prompts):
    text, category = generate_job.prompt_record(prompt)
    records.append({
        "prompt": text, "category": category, "prompt_ids": prompt_ids[i],
        "output_ids": ordered_spec[i].output_ids,
        "output_text": rt.tokenizer.decode(ordered_spec[i].output_ids, skip_special=True),
        "baseline_output_ids": ordered_base[i].output_ids,
        "finish_reason": ordered_spec[i].finish_reason,
        "identical": identical[i], "target_calls": ordered_spec[i].target_calls,
        "baseline_target_calls": ordered_base[i].target_calls})
  return summary, records


def _loop_counts(groups, base_rows, spec_rows, batch_size: int,
                 k_max: int) -> diagnose.LoopCounts:
  """Compiled-loop iterations per batch (consecutive prompts of a category,
  as ``Generator.generate`` chunks them: its longest row's target calls),
  the speculative ones by verify width (the longest row saw every step)."""
  batches, plain, perfect = 0, 0, 0
  by_width = collections.Counter()
  for idx in groups.values():
    for start in range(0, len(idx), batch_size):
      batch = idx[start:start + batch_size]
      batches += 1
      plain += max(base_rows[i].target_calls for i in batch)
      longest = max(batch, key=lambda i: spec_rows[i].target_calls)
      by_width.update(spec_rows[longest].width_per_step)
      perfect += max(-(-len(spec_rows[i].output_ids) // (k_max + 1)) for i in batch)
  return diagnose.LoopCounts(batches, plain, dict(sorted(by_width.items())), perfect)


def format_table(summary: dict) -> str:
  """A readable stdout table."""
  lines = [f"{'category':<16}{'n':>3}{'base tok/s':>12}{'spec tok/s':>12}"
           f"{'speedup':>9}{'accept':>8}{'tok/call':>9}"]
  for row in summary["per_category"] + [dict(
      category="ALL", num_prompts=summary["num_prompts"],
      baseline_tokens_per_s=summary["baseline_tokens_per_s"],
      speculative_tokens_per_s=summary["speculative_tokens_per_s"],
      speedup=summary["speedup"], acceptance_rate=summary["acceptance_rate"],
      mean_tokens_per_call=summary["mean_tokens_per_call"])]:
    lines.append(
        f"{row['category']:<16}{row['num_prompts']:>3}{row['baseline_tokens_per_s']:>12.1f}"
        f"{row['speculative_tokens_per_s']:>12.1f}{row['speedup']:>8.2f}x"
        f"{(row['acceptance_rate'] or 0):>8.2f}{(row['mean_tokens_per_call'] or 0):>9.2f}")
  widths = " ".join(f"{w}:{v:.2f}" for w, v in summary["verify_cost_by_width"].items())
  steps = " ".join(f"{w}:{n}" for w, n in summary["loop_steps_by_width"].items())
  lines.append(
      f"K={summary['k']} drafter={summary['drafter']} policy={summary['policy']} "
      f"c={summary['cost_ratio_c']:.3f} verify cost by width {{{widths}}} steps by width "
      f"{{{steps}}} tokens/call={summary['tokens_per_call']:.2f} "
      f"prefill={100 * summary['prefill_fraction']:.0f}%")
  lines.append(
      f"measured={summary['speedup']:.2f}x model-predicted={summary['model_predicted_speedup']:.2f}x "
      f"outputs_identical={summary['outputs_identical']} "
      f"compiles_after_warmup={summary['compiles_after_warmup']}")
  lines.append(
      f"roofline: {summary['step_bytes'] / 1e6:.0f} MB per step at "
      f"{summary['bandwidth_gb_s']:.1f} GB/s (measured) = {1e3 * summary['roofline_step_s']:.1f} ms; "
      f"plain step {1e3 * summary['target_step_s']:.1f} ms = "
      f"{summary['roofline_fraction_plain']:.2f} of it; speculative tokens/s = "
      f"{summary['roofline_fraction_speculative']:.2f} of the plain roofline's")
  if summary["matched_numerics"]:
    lines.append("numerics-matched mode: every target call, the baseline's too, is "
                 f"{summary['k_max'] + 1} tokens wide (the baseline pays for it)")
  if summary["synthetic_acceptance"] is not None:
    lines.append(f"NOT EXACT: rule=synthetic accepts each draft with probability "
                 f"{summary['synthetic_acceptance']} (a systems benchmark; outputs are not "
                 f"the target's)")
  what_if = ", ".join(f"{name} {value:.2f}x" for name, value in summary["what_if_speedup"].items())
  lines.append(f"what if: {what_if}; binding: {summary['binding_cost']} "
               f"({summary['binding_cost_speedup']:.2f}x)")
  return "\n".join(lines)


def diagnosis_of(summary: dict) -> diagnose.Diagnosis:
  """The diagnosis of a benchmark summary (or of one extended by job=diagnose)."""
  return diagnose.diagnose(diagnose.Measurements.from_summary(summary))


def run(config, workdir: str, log=print) -> dict:
  workdir = io.prepare_workdir(workdir)
  rt = runtime.build(config)
  summary, records = run_benchmark(config, rt, log=log)
  results_path = os.path.join(workdir, "results.jsonl")
  if os.path.exists(results_path):
    os.remove(results_path)
  for record in records:
    io.append_jsonl(results_path, record)
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  log(format_table(summary))
  log(diagnose.format_diagnosis(diagnosis_of(summary)))
  return summary
