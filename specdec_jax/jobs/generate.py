"""job=generate: decode the config's prompts and print the text.

Writes ``results.jsonl`` (one object per prompt, appended as each batch
finishes) and ``summary.json``.
"""

import os
import sys
import time

from specdec_jax import compile_count
from specdec_jax import metrics
from specdec_jax import runtime
from specdec_jax.jobs import io


def prompt_record(prompt) -> tuple[str, str]:
  """(text shown in results, category) of a str or suite Prompt."""
  if isinstance(prompt, str):
    return prompt, "builtin"
  return prompt.text(), prompt.category


def _log_process_split(generator, num_prompts: int, batch_size: int) -> None:
  """Multi-host: which prompts this process feeds (see multihost.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  if generator.shardings is None or jax.process_count() == 1:
    return
  from specdec_jax import multihost  # pylint: disable=g-import-not-at-top
  mine = multihost.process_prompts(num_prompts, batch_size, generator.shardings.batch(1))
  # stderr of every process (the job's own log is process 0's only)
  print(f"process {jax.process_index()}/{jax.process_count()} feeds prompts {mine}",
        file=sys.stderr)


def run(config, workdir: str, log=print) -> dict:
  workdir = io.prepare_workdir(workdir)
  prompts = runtime.load_prompt_list(config)
  t0 = time.perf_counter()
  rt = runtime.build(config)
  load_s = time.perf_counter() - t0
  prompt_ids = [rt.encode_prompt(p) for p in prompts]
  generator = rt.generator(baseline=rt.drafter is None)
  kwargs = rt.run_kwargs(baseline=rt.drafter is None)
  seeds = [config.seed + i for i in range(len(prompts))]
  s = config.sampling
  generator.validate(prompt_ids, [config.max_new_tokens] * len(prompts), kwargs.get("k", 0),
                     s.temperature, s.top_k, s.top_p, seeds, config.decode.tau, config.decode.budget)
  kwargs["costs"] = rt.measure_costs(generator, prompt_ids, log)

  results_path = os.path.join(workdir, "results.jsonl")
  if os.path.exists(results_path) and io.is_writer():
    os.remove(results_path)
  _log_process_split(generator, len(prompts), config.batch_size)
  compiles_before = compile_count.loop_compiles()
  rows = []
  t_start = time.perf_counter()
  for start in range(0, len(prompts), config.batch_size):
    chunk = slice(start, start + config.batch_size)
    result = generator.generate(rt.target_params, rt.draft_params, prompt_ids[chunk],
                                seeds=seeds[chunk], **kwargs)
    for prompt, row in zip(prompts[chunk], result.rows):
      text, category = prompt_record(prompt)
      output_text = rt.tokenizer.decode(row.output_ids, skip_special=True)
      log(f"--- prompt: {text[:200]!r}\n{output_text}\n[{row.finish_reason}, "
          f"{len(row.output_ids)} tokens, {row.target_calls} target calls]")
      io.append_jsonl(results_path, {
          "prompt": text, "category": category, "prompt_ids": row.prompt_ids,
          "output_text": output_text, "output_ids": row.output_ids,
          "finish_reason": row.finish_reason, "target_calls": row.target_calls,
          "accepted_per_step": row.accepted_per_step})
      rows.append(row)

  k_max = generator.k_max
  new_tokens = sum(len(r.output_ids) for r in rows)
  wall_s = time.perf_counter() - t_start
  summary = {
      "job": "generate", "num_prompts": len(prompts), "batch_size": config.batch_size,
      "drafter": config.decode.drafter, "k": config.decode.k if k_max else 0,
      "new_tokens": new_tokens, "load_time_s": load_s,
      "wall_time_s": wall_s,  # includes compilation; job=benchmark times warm runs
      "compiles": compile_count.loop_compiles() - compiles_before,
      **metrics.acceptance_summary(rows, k_max),
  }
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  log(f"wrote {results_path} and summary.json ({new_tokens} new tokens)")
  return summary
