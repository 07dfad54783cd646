"""The command line: ``python -m specdec_jax.main``.

One real subprocess per entry path (the tiny generate job, and the real
SmolLM2 config), started when its test first asks for it; the benchmark
jobs and the bad-flag checks call the same entry point in-process
(``common.run_cli``), which parses flags and runs the job exactly as the
command does, without a JAX start-up each.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from common import REPO_ROOT, real_model_env, run_cli, tiny_config
from specdec_jax import diagnose
from specdec_jax import phase_timing
from specdec_jax.models.tokenizers import ByteTokenizer

TIMEOUT_S = 600
TINY = f"--config={REPO_ROOT / 'configs' / 'tiny.py'}"

BAD_CONFIGS = {
    "k0": (["--config.decode.k=0"], "k"),
    "rule": (["--config.decode.rule=bogus"], "rule"),
    "temperature": (["--config.sampling.temperature=-1"], "temperature"),
    "top_p": (["--config.sampling.top_p=1.5"], "top_p"),
    "unknown_field": (["--config.bogus_field=1"], "bogus_field"),
    "unknown_nested_field": (["--config.model.bogus_field=1"], "bogus_field"),
}
BENCH_QUICK = ("--config.benchmark.repeats=1", "--config.benchmark.timing_iters=3",
               "--config.benchmark.timing_rounds=2")


class Job:
  """A CLI subprocess, started on the first ``result()``."""

  def __init__(self, args, workdir, real_model=False):
    self.args, self.workdir, self.real_model = args, workdir, real_model
    self._result = None

  def result(self):
    """(returncode, stdout bytes, stderr str); runs the process once."""
    if self._result is None:
      env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep
                 + os.environ.get("PYTHONPATH", ""))
      if self.real_model:
        env = real_model_env(env)
      proc = subprocess.run([sys.executable, "-m", "specdec_jax.main",
                             f"--workdir={self.workdir}", *self.args], cwd=REPO_ROOT,
                            env=env, capture_output=True, timeout=TIMEOUT_S)
      self._result = (proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))
    return self._result

  def read_json(self, name):
    return json.loads((pathlib.Path(self.workdir) / name).read_text())

  def read_jsonl(self, name):
    lines = (pathlib.Path(self.workdir) / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


def tiny_prompts():
  return list(tiny_config().prompt_texts)


def test_generate(tmp_path):
  job = Job([TINY], str(tmp_path))
  rc, out, err = job.result()
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err
  records = job.read_jsonl("results.jsonl")
  prompts = tiny_prompts()
  assert [r["prompt"] for r in records] == prompts
  tok = ByteTokenizer()
  for r in records:
    assert {"prompt", "prompt_ids", "output_text", "output_ids", "finish_reason"} <= set(r)
    assert r["prompt_ids"] == tok.encode(r["prompt"], add_bos=True)
    assert 1 <= len(r["output_ids"]) <= 32
    assert all(0 <= t < 259 for t in r["output_ids"])
    assert r["finish_reason"] in ("eos", "length")
    if r["finish_reason"] == "eos":
      assert r["output_ids"][-1] in tok.eos_ids
      assert not set(r["output_ids"][:-1]) & set(tok.eos_ids)
    else:
      assert len(r["output_ids"]) == 32
    assert r["output_text"] == tok.decode(r["output_ids"], skip_special=True)
    # The decoded text is printed.
    assert r["output_text"].encode("utf-8") in out
  summary = job.read_json("summary.json")
  assert summary["num_prompts"] == len(prompts)
  assert summary["new_tokens"] == sum(len(r["output_ids"]) for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_benchmark(tmp_path, capsys, drafter):
  rc, out, err = run_cli([TINY, f"--workdir={tmp_path}", "--config.job=benchmark",
                          f"--config.decode.drafter={drafter}", *BENCH_QUICK], capsys)
  assert rc == 0, err[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  records = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert summary["drafter"] == drafter
  assert summary["outputs_identical"] is True and summary["compiles_after_warmup"] == 0
  assert len(records) == len(tiny_prompts())
  assert all(r["identical"] and r["output_ids"] == r["baseline_output_ids"] for r in records)
  # The summary's figures follow from what it measured.
  tokens = sum(len(r["output_ids"]) for r in records)
  assert summary["baseline_tokens_per_s"] == pytest.approx(tokens / summary["baseline_s"])
  assert summary["speculative_tokens_per_s"] == pytest.approx(tokens / summary["speculative_s"])
  assert summary["speedup"] == pytest.approx(summary["baseline_s"] / summary["speculative_s"])
  calls = sum(r["target_calls"] for r in records)
  assert summary["target_calls_speculative"] == calls
  assert summary["target_calls_baseline"] == sum(r["baseline_target_calls"] for r in records)
  assert summary["target_calls_baseline"] == tokens     # plain: one call per token
  assert summary["tokens_per_call"] == pytest.approx(tokens / calls)
  if drafter == "ngram":   # the copy-heavy prompts get drafts accepted
    assert calls < summary["target_calls_baseline"]
  assert 0.0 <= summary["acceptance_rate"] <= 1.0
  assert 1.0 <= summary["mean_tokens_per_call"] <= summary["k"] + 1
  assert summary["cost_ratio_c"] > 0 and summary["verify_cost_ratio"] > 0
  # The step counts by verify width cover every speculative loop step; the
  # roofline and what-ifs follow from the measured figures.
  assert sum(summary["loop_steps_by_width"].values()) == summary["loop_steps_speculative"]
  assert set(summary["loop_steps_by_width"]) <= {"1", str(summary["k"] + 1)}
  assert summary["roofline_fraction_plain"] == pytest.approx(
      summary["roofline_step_s"] / summary["target_step_s"])
  assert summary["roofline_step_s"] == pytest.approx(
      summary["step_bytes"] / (summary["bandwidth_gb_s"] * 1e9))
  assert summary["bandwidth_gb_s"] > 0.1
  assert set(summary["what_if_speedup"]) == set(diagnose.WHAT_IFS)
  assert summary["binding_cost_speedup"] == max(summary["what_if_speedup"].values())
  assert summary["what_if_speedup"][summary["binding_cost"]] == summary["binding_cost_speedup"]
  # The table and the diagnosis are printed.
  assert "speedup" in out and "Bottleneck" in out and "roofline:" in out and "what if:" in out


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_with_short_error(tmp_path, capsys, name):
  args, field = BAD_CONFIGS[name]
  rc, out, err = run_cli([TINY, f"--workdir={tmp_path}", *args], capsys)
  assert rc == 2
  assert "Traceback" not in err, err[-2000:]
  assert "Unknown command line flag" not in err, err   # the override itself was parsed
  assert field in err
  error_lines = [line for line in err.splitlines() if field in line]
  assert error_lines and len(error_lines[0]) < 300
  assert len(err.splitlines()) <= 10, err


def test_phase_costs_time_the_loops_own_phases():
  """phase_timing.measure: positive medians for prefill and verify; no draft
  phase for plain decoding; and timing leaves the outputs untouched (the
  phases take the state by donation, nothing is shared with generate)."""
  from common import DRAFT, TARGET, init, make_prompts
  from common import generator as gen
  tp, dp = init(TARGET, 70), init(DRAFT, 71)
  prompts = make_prompts(72)
  plain, spec = gen("plain", 5), gen("model", 5)
  before = [r.output_ids for r in spec.generate(tp, dp, prompts).rows]
  base = phase_timing.measure(plain, tp, None, prompts, iters=3)
  costs = phase_timing.measure(spec, tp, dp, prompts, iters=3, k=3)
  assert base.draft_s == 0.0 and base.verify_s > 0 and base.prefill_s > 0
  assert set(base.verify_s_by_width) == {1}
  assert costs.draft_s > 0 and costs.verify_s > 0
  assert set(costs.verify_s_by_width) == set(spec.verify_widths)
  assert all(v > 0 for v in costs.verify_s_by_width.values())
  assert [r.output_ids for r in spec.generate(tp, dp, prompts).rows] == before


@pytest.mark.slow
def test_diagnose_job(tmp_path, capsys):
  rc, out, err = run_cli([TINY, f"--workdir={tmp_path}", "--config.job=diagnose",
                          "--config.decode.drafter=ngram", *BENCH_QUICK], capsys)
  assert rc == 0, err[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["job"] == "diagnose" and summary["outputs_identical"] is True
  assert set(summary["verify_cost_by_k"]) == {"1", "2", "4", "8"}
  assert all(v > 0 for v in summary["verify_cost_by_k"].values())
  diagnosis = summary["diagnosis"]
  assert diagnosis["bottleneck"] in [f["bottleneck"] for f in diagnosis["findings"]]
  assert diagnosis["best_k"] >= 0
  assert f"Bottleneck: {diagnosis['bottleneck']}" in out


@pytest.mark.slow
def test_smollm2_config_from_the_command_line(tmp_path, smollm2_scan, smollm2_cache_dir):
  """configs/smollm2.py through the real command: the GGUF's orbax cache (this
  session's), ChatML prompts, SmolLM2's EOS ids; its greedy tokens are the
  loaded model's. (A fixed K: the auto policy's cost measurement is tested on
  the tiny models, and here it would compile three more 30-layer programs.
  The scanned layout: its programs compile ~4x faster than the unrolled
  default's, whose equality with it and with transformers
  test_smollm2_generation checks.)"""
  job = Job([f"--config={REPO_ROOT / 'configs' / 'smollm2.py'}",
             f"--config.cache_dir={smollm2_cache_dir}", "--config.max_new_tokens=12",
             "--config.max_prompts=2", "--config.decode.policy=fixed",
             "--config.model.layer_loop=scan"], str(tmp_path), real_model=True)
  rc, out, err = job.result()
  assert rc == 0, err[-3000:]
  records = job.read_jsonl("results.jsonl")
  assert len(records) == 2
  target, params, tokenizer = smollm2_scan
  prompts = [r["prompt_ids"] for r in records]
  assert all(tokenizer.decode(p).startswith("<|im_start|>system") for p in prompts)
  from specdec_jax.generation import Generator
  plain = Generator(target, max_prompt_len=512, max_new_tokens=12,
                    eos_ids=tokenizer.eos_ids).generate(params, None, prompts).rows
  assert [r["output_ids"] for r in records] == [r.output_ids for r in plain]
  assert all(r["output_text"].encode("utf-8") in out for r in records)
