"""job=diagnose: benchmark, then name the bottleneck in actionable words.

Adds to the benchmark's measurements the verify cost as a function of K
(verify K+1 tokens / one decode step, for K = 1, 2, 4, ... up to
max(8, k)), so that verification that is not parallel on this hardware shows,
then prints the diagnosis and the K the formula predicts to be best.
"""

import os

from specdec_jax import diagnose
from specdec_jax import phase_timing
from specdec_jax import runtime
from specdec_jax.jobs import benchmark
from specdec_jax.jobs import io


def verify_cost_by_k(rt: runtime.Runtime, prompt_ids, iters: int, ks) -> dict:
  """{K: verify phase time at K / plain decode step time}."""
  base = phase_timing.measure(rt.generator(baseline=True), rt.target_params, rt.draft_params,
                              prompt_ids, iters=iters, **rt.run_kwargs(True))
  costs = {}
  for k in ks:
    spec = phase_timing.measure(rt.generator(k_max=k), rt.target_params, rt.draft_params,
                                prompt_ids, iters=iters, **dict(rt.run_kwargs(), k=k))
    costs[k] = spec.verify_s / base.verify_s
  return costs


def run(config, workdir: str, log=print) -> dict:
  workdir = io.prepare_workdir(workdir)
  rt = runtime.build(config)
  summary, _ = benchmark.run_benchmark(config, rt, log=log)
  log(benchmark.format_table(summary))
  prompt_ids = [rt.encode_prompt(runtime.load_prompt_list(config)[0])]
  ks = sorted({1, 2, 4, 8, int(config.decode.k)})
  summary["verify_cost_by_k"] = verify_cost_by_k(rt, prompt_ids,
                                                 config.benchmark.timing_iters, ks)
  result = benchmark.diagnosis_of(summary)
  summary["job"] = "diagnose"
  summary["diagnosis"] = {
      "bottleneck": result.bottleneck, "best_k": result.best_k,
      "best_k_predicted_speedup": result.best_k_speedup,
      "findings": [{"bottleneck": f.bottleneck, "message": f.message}
                   for f in result.findings]}
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  log(diagnose.format_diagnosis(result))
  return summary
