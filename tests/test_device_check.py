"""launch/device_check.sh --dry-run: the accelerator check's code path on CPU
with tiny shapes, through the launcher users run (a subprocess: the launcher
sets the platform before JAX starts)."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_dry_run_prints_the_table_and_writes_every_figure(tmp_path):
  out = tmp_path / "check.json"
  proc = subprocess.run(["bash", "launch/device_check.sh", "--dry-run", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["platform"] == "cpu" and report["dry_run"]
  assert set(report["throughput"]) == {"1"}
  for row in report["throughput"].values():
    assert row["plain"]["tokens_per_s"] > 0
    assert row["ngram"]["speedup"] > 0 and row["model"]["speedup"] > 0
  assert set(report["verify_cost_by_width"]) == {"1", "2", "5"}
  assert all(cost > 0 for cost in report["verify_cost_by_width"].values())
  assert report["plain_step_ms"] > 0
  assert report["draft_cost_c"] > 0
  assert len(report["synthetic_speedup"]) == 3
  # every timed call reused the warm-up's program
  assert len(report["compiles_after_warmup"]) == 8
  assert set(report["compiles_after_warmup"].values()) == {0}
  mismatch = report["greedy_mismatch"]
  assert mismatch["dtype"] == "bfloat16" and mismatch["tokens_compared"] > 0
  assert mismatch["near_ties"] <= mismatch["rows_diverged"]
  matched = report["matched_numerics"]
  assert matched["rows_diverged"] == 0 and matched["tokens_compared"] > 0
  assert matched["plain_cost_vs_default"] > 0 and matched["model_tokens_per_s"] > 0
  for line in ("device check: cpu", "verify cost by width", "draft cost c",
               "synthetic acceptance speedup (NOT exact)", "compiles after warm-up: 0",
               "greedy speculative vs plain in bfloat16", "numerics-matched mode (batch 1): 0 rows"):
    assert line in proc.stdout, proc.stdout
