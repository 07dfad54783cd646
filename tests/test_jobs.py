"""The command line: ``python -m specdec_jax.main`` end to end (subprocesses).

All job processes of this module start together (module fixture) and each
test waits for its own: on 2 cores this roughly halves the wall time, and no
assertion here depends on timing.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from specdec_jax.models.tokenizers import ByteTokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600

BAD_CONFIGS = {
    "k0": (["--config.k=0"], "k"),
    "rule": (["--config.rule=bogus"], "rule"),
    "temperature": (["--config.temperature=-1"], "temperature"),
    "top_p": (["--config.top_p=1.5"], "top_p"),
    "unknown_field": (["--config.bogus_field=1"], "bogus_field"),
    "unknown_nested_field": (["--config.model.bogus_field=1"], "bogus_field"),
}

BENCH_QUICK = ("--config.benchmark.repeats=1", "--config.benchmark.timing_iters=3",
               "--config.benchmark.timing_rounds=2")
JOBS = {
    "generate": [],
    "bench_ngram": ["--config.job=benchmark", "--config.drafter=ngram", *BENCH_QUICK],
    "bench_model": ["--config.job=benchmark", "--config.drafter=model", *BENCH_QUICK],
    **{f"bad_{name}": args for name, (args, _) in BAD_CONFIGS.items()},
}


class Job:
  def __init__(self, name, args, workdir):
    self.name, self.workdir = name, workdir
    cmd = [sys.executable, "-m", "specdec_jax.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    self._result = None

  def result(self):
    """(returncode, stdout bytes, stderr str); waits for the process."""
    if self._result is None:
      out, err = self.proc.communicate(timeout=TIMEOUT_S)
      self._result = (self.proc.returncode, out, err.decode("utf-8", "replace"))
    return self._result

  def read_json(self, name):
    return json.loads((pathlib.Path(self.workdir) / name).read_text())

  def read_jsonl(self, name):
    lines = (pathlib.Path(self.workdir) / name).read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  started = {name: Job(name, args, str(tmp_path_factory.mktemp(name)))
             for name, args in JOBS.items()}
  yield started
  for job in started.values():
    if job.proc.poll() is None:
      job.proc.kill()
      job.proc.wait()


def tiny_prompts():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", REPO_ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(module.get_config().prompt_texts)


def test_generate(jobs):
  job = jobs["generate"]
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
@pytest.mark.parametrize("name,drafter", [("bench_ngram", "ngram"), ("bench_model", "model")])
def test_benchmark(jobs, name, drafter):
  job = jobs[name]
  rc, out, err = job.result()
  assert rc == 0, err[-3000:]
  assert "Traceback" not in err
  summary = job.read_json("summary.json")
  for key in ("speedup", "acceptance_rate", "mean_accepted_length", "cost_ratio_c",
              "predicted_speedup", "outputs_identical", "compiles_after_warmup"):
    assert key in summary, key
  assert summary["drafter"] == drafter
  assert summary["outputs_identical"] is True
  assert summary["compiles_after_warmup"] == 0
  assert summary["speedup"] > 0 and summary["predicted_speedup"] > 0
  assert summary["cost_ratio_c"] > 0
  assert 0.0 <= summary["acceptance_rate"] <= 1.0
  assert 1.0 <= summary["mean_accepted_length"] <= summary["k"] + 1
  records = job.read_jsonl("results.jsonl")
  assert len(records) == len(tiny_prompts())
  assert all(r["identical"] for r in records)
  assert all(r["output_ids"] == r["baseline_output_ids"] for r in records)


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_config_exits_with_short_error(jobs, name):
  _, field = BAD_CONFIGS[name]
  rc, out, err = jobs[f"bad_{name}"].result()
  assert rc != 0
  assert "Traceback" not in err, err[-2000:]
  assert field in err
  error_lines = [line for line in err.splitlines() if field in line]
  assert error_lines and len(error_lines[0]) < 300
  assert len(err.splitlines()) <= 10, err
