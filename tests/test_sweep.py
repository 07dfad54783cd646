"""Tests for the resumable sweep job, with a fake run_point (no model)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from specdec_jax.jobs import sweep

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_config(**sweep_values):
  cfg = ml_collections.ConfigDict()
  cfg.k = 4
  cfg.drafter = "ngram"
  cfg.temperature = 0.0
  cfg.draft = ml_collections.ConfigDict({"num_layers": 2})
  cfg.sweep = ml_collections.ConfigDict(
      sweep_values or {"k": [1, 2, 4], "drafter": ["ngram", "model"]})
  return cfg


class FakeRunPoint:
  """Records the configs it sees; returns a summary like the benchmark's."""

  def __init__(self, fail_on=None):
    self.seen = []
    self.fail_on = fail_on

  def __call__(self, cfg):
    self.seen.append((cfg.k, cfg.drafter))
    if self.fail_on == (cfg.k, cfg.drafter):
      raise RuntimeError("out of memory")
    a = 0.8 if cfg.drafter == "model" else 0.5
    return {"k": cfg.k, "speedup": 1.0 + 0.1 * cfg.k, "predicted_speedup": 1.1 + 0.1 * cfg.k,
            "acceptance_rate": a, "mean_tokens_per_call": np.float64(1.5),
            "acceptance_by_position": np.array([a] * cfg.k), "tokens": np.int32(7)}


def read_rows(workdir):
  lines = (pathlib.Path(workdir) / "results.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def quiet(_):
  pass


def test_grid_order_and_keys():
  fields = sweep.sweep_fields(make_config())
  assert fields == [("drafter", ["ngram", "model"]), ("k", [1, 2, 4])]
  points = sweep.grid_points(fields)
  assert points[:2] == [{"drafter": "ngram", "k": 1}, {"drafter": "ngram", "k": 2}]
  assert len(points) == 6
  assert sweep.point_key({"k": 1, "drafter": "a"}) == sweep.point_key({"drafter": "a", "k": 1})
  assert sweep.point_label(points[0]) == "drafter=ngram k=1"


@pytest.mark.parametrize("sweep_values,message", [
    ({"kk": [1, 2]}, "kk"),
    ({"draft": {"num_layer": [1]}}, "draft.num_layer"),
    ({"k": []}, "empty"),
    ({"k": 3}, "list"),
    ({"k": [1, 1]}, "duplicate"),
    ({"k": ["four"]}, "k="),
])
def test_invalid_sweep_raises_before_anything_is_written(tmp_path, sweep_values, message):
  run_point = FakeRunPoint()
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=message):
    sweep.run_sweep(make_config(**sweep_values), str(workdir), run_point, log=quiet)
  assert not run_point.seen
  assert not workdir.exists()


def test_missing_sweep_field(tmp_path):
  cfg = make_config()
  del cfg["sweep"]
  with pytest.raises(ValueError, match="sweep"):
    sweep.run_sweep(cfg, str(tmp_path), FakeRunPoint(), log=quiet)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  run_point = FakeRunPoint()
  with pytest.raises(ValueError, match="not writable"):
    sweep.run_sweep(make_config(), str(blocker / "sub"), run_point, log=quiet)
  assert not run_point.seen


def test_full_run_writes_each_point_once(tmp_path):
  cfg = make_config()
  run_point = FakeRunPoint()
  logs = []
  rows = sweep.run_sweep(cfg, str(tmp_path), run_point, log=logs.append)
  assert len(run_point.seen) == 6 and len(set(run_point.seen)) == 6
  on_disk = read_rows(tmp_path)
  assert rows == on_disk
  assert [r["point"] for r in rows] == sweep.grid_points(sweep.sweep_fields(cfg))
  assert rows[0]["point_key"] == sweep.point_key(rows[0]["point"])
  assert rows[0]["mean_tokens_per_call"] == 1.5 and rows[0]["tokens"] == 7
  assert any(line.startswith("[3/6] drafter=ngram k=4 ... done in") and "ETA" in line
             for line in logs)
  assert cfg.k == 4 and "k" in cfg.sweep  # the caller's config is untouched
  # A second run has nothing to do.
  again = FakeRunPoint()
  assert sweep.run_sweep(cfg, str(tmp_path), again, log=quiet) == rows
  assert not again.seen
  assert len(read_rows(tmp_path)) == 6


def test_point_config_sets_values_and_empties_sweep():
  cfg = make_config(k=[2], draft={"num_layers": [1, 3]}, temperature=[1])
  seen = []

  def run_point(point_cfg):
    seen.append(point_cfg)
    return {}

  for point in sweep.grid_points(sweep.sweep_fields(cfg)):
    run_point(sweep.point_config(cfg, point))
  assert [c.draft.num_layers for c in seen] == [1, 3]
  assert all(c.k == 2 and c.temperature == 1.0 and not c.sweep for c in seen)
  assert cfg.draft.num_layers == 2


def test_joint_axis_sets_fields_together(tmp_path):
  """A swept list of dicts is one axis whose values set several fields (a
  chain and a tree at the same verify width); the table shows each as k=v."""
  cfg = make_config(shape=({"k": 7}, {"k": 4, "drafter": "model"}))
  run_point = FakeRunPoint()

  def with_width(point_cfg):
    summary = run_point(point_cfg)
    tree = point_cfg.drafter == "model"
    return dict(summary, verify_width=8, tree_nodes=7 if tree else 0, tree_topk=3,
                tokens_per_call=2.0 if tree else 1.5)

  logs = []
  rows = sweep.run_sweep(cfg, str(tmp_path), with_width, log=logs.append)
  assert run_point.seen == [(7, "ngram"), (4, "model")]
  assert [r["point"] for r in rows] == [{"shape": {"k": 7}},
                                        {"shape": {"k": 4, "drafter": "model"}}]
  assert "k=4,drafter=model" in sweep.summary_table(rows)
  assert (tmp_path / "tokens_per_call_vs_width.png").read_bytes().startswith(PNG_MAGIC)
  with pytest.raises(ValueError, match="unknown sweep field 'bogus'"):
    sweep.sweep_fields(make_config(shape=({"k": 7}, {"bogus": 1})))


def test_dotted_sweep_keys(tmp_path):
  cfg = make_config()
  cfg.sweep = ml_collections.ConfigDict(allow_dotted_keys=True)
  cfg.sweep["draft.num_layers"] = [1, 2]
  layers = []

  def run_point(point_cfg):
    layers.append(point_cfg.draft.num_layers)
    return {"speedup": 1.0}

  rows = sweep.run_sweep(cfg, str(tmp_path), run_point, log=quiet)
  assert layers == [1, 2]
  assert [r["point"] for r in rows] == [{"draft.num_layers": 1}, {"draft.num_layers": 2}]


def test_frozen_config(tmp_path):
  frozen = ml_collections.FrozenConfigDict(make_config(draft={"num_layers": [3]}, k=[1, 2]))
  seen = []

  def run_point(point_cfg):
    seen.append((point_cfg.k, point_cfg.draft.num_layers))
    return {}

  sweep.run_sweep(frozen, str(tmp_path), run_point, log=quiet)
  assert seen == [(1, 3), (2, 3)]


def test_resume_skips_done_points(tmp_path):
  cfg = make_config()
  first = FakeRunPoint()
  sweep.run_sweep(make_config(k=[1, 2], drafter=["ngram"]), str(tmp_path), first, log=quiet)
  assert len(first.seen) == 2
  second = FakeRunPoint()
  rows = sweep.run_sweep(cfg, str(tmp_path), second, log=quiet)
  assert len(second.seen) == 4
  assert (1, "ngram") not in second.seen and (2, "ngram") not in second.seen
  assert len(rows) == 6
  keys = [r["point_key"] for r in read_rows(tmp_path)]
  assert len(keys) == len(set(keys)) == 6


def test_torn_last_line_is_repaired(tmp_path):
  cfg = make_config()
  sweep.run_sweep(make_config(k=[1, 2], drafter=["ngram"]), str(tmp_path), FakeRunPoint(),
                  log=quiet)
  results = tmp_path / "results.jsonl"
  complete = results.read_bytes()
  torn = json.dumps({"point": {"drafter": "ngram", "k": 4}, "point_key": "x"})[:25]
  results.write_bytes(complete + torn.encode())
  logs = []
  run_point = FakeRunPoint()
  sweep.run_sweep(cfg, str(tmp_path), run_point, log=logs.append)
  assert any("torn" in line for line in logs)
  assert len(run_point.seen) == 4
  data = results.read_bytes()
  assert data.startswith(complete) and data.endswith(b"\n")
  assert len(read_rows(tmp_path)) == 6


def test_corrupt_middle_line_is_an_error(tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text('{"point": {}, "point_key": "{}"}\nnot json\n{"point_key": "y"}\n')
  with pytest.raises(ValueError, match="results.jsonl:2"):
    sweep.run_sweep(make_config(), str(tmp_path), FakeRunPoint(), log=quiet)


def test_failed_point_is_not_written_and_retried(tmp_path):
  cfg = make_config()
  with pytest.raises(RuntimeError, match="drafter=model k=2"):
    sweep.run_sweep(cfg, str(tmp_path), FakeRunPoint(fail_on=(2, "model")), log=quiet)
  assert len(read_rows(tmp_path)) == 5
  retry = FakeRunPoint()
  assert len(sweep.run_sweep(cfg, str(tmp_path), retry, log=quiet)) == 6
  assert retry.seen == [(2, "model")]


def test_non_finite_values_are_written_as_null(tmp_path):
  cfg = make_config(k=[1])
  rows = sweep.run_sweep(cfg, str(tmp_path), lambda c: {"speedup": float("nan")}, log=quiet)
  assert rows[0]["speedup"] is None
  assert "NaN" not in (tmp_path / "results.jsonl").read_text()


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import ml_collections
    from specdec_jax.jobs.sweep import run_sweep

    cfg = ml_collections.ConfigDict({"k": 1, "drafter": "ngram", "sweep": {
        "k": [1, 2, 3, 4, 5, 6], "drafter": ["ngram", "model"]}})

    def run_point(c):
      time.sleep(float(sys.argv[2]))
      return {"k": c.k, "speedup": 1.0 + c.k / 10, "drafter_name": c.drafter}

    run_sweep(cfg, sys.argv[1], run_point, log=lambda line: None)
""")


def _run_kill_script(script, workdir, sleep_s):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, str(script), str(workdir), str(sleep_s)],
                          cwd=str(REPO_ROOT), env=env)


def test_sigkill_mid_sweep_then_resume(tmp_path):
  script = tmp_path / "kill_sweep.py"
  script.write_text(_KILL_SCRIPT)
  workdir = tmp_path / "work"
  results = workdir / "results.jsonl"
  proc = _run_kill_script(script, workdir, 0.3)
  try:
    deadline = time.time() + 60
    while time.time() < deadline:
      if results.exists() and results.read_bytes().count(b"\n") >= 3:
        break
      if proc.poll() is not None:
        pytest.fail(f"sweep subprocess exited early with code {proc.returncode}")
      time.sleep(0.05)
    else:
      pytest.fail("sweep subprocess wrote fewer than 3 rows in 60 s")
  finally:
    proc.kill()  # SIGKILL
    proc.wait()
  assert proc.returncode == -9
  done_before = results.read_bytes().count(b"\n")
  assert 3 <= done_before < 12

  proc = _run_kill_script(script, workdir, 0.0)
  assert proc.wait(timeout=120) == 0
  lines = results.read_text().splitlines()
  rows = [json.loads(line) for line in lines]  # every line is valid JSON
  keys = [r["point_key"] for r in rows]
  assert len(keys) == len(set(keys)) == 12
  assert {(r["point"]["k"], r["point"]["drafter"]) for r in rows} == {
      (k, d) for k in range(1, 7) for d in ("ngram", "model")}
  assert all(r["drafter_name"] == r["point"]["drafter"] for r in rows)


def test_plots_are_written(tmp_path):
  logs = []
  sweep.run_sweep(make_config(), str(tmp_path), FakeRunPoint(), log=logs.append)
  for name in ("speedup_vs_k.png", "acceptance_by_position.png"):
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
  # Only the chains-vs-trees plot has no data here.
  assert [line.split(":")[0] for line in logs if line.startswith("skipping")] == [
      "skipping tokens_per_call_vs_width.png"]


def test_plots_skip_missing_keys(tmp_path):
  logs = []
  rows = sweep.run_sweep(make_config(drafter=["ngram"]), str(tmp_path),
                         lambda cfg: {"acceptance_rate": 0.5}, log=logs.append)
  assert len(rows) == 1
  assert not (tmp_path / "speedup_vs_k.png").exists()
  assert not (tmp_path / "acceptance_by_position.png").exists()
  assert sum(line.startswith("skipping") for line in logs) == 3


def test_plots_tolerate_odd_values(tmp_path):
  rows = [
      {"point": {"k": 1}, "speedup": 1.2, "acceptance_by_position": [0.5, None, "x"]},
      {"point": {"k": "two"}, "speedup": 1.4},
      {"point": {}, "k": 3, "speedup": None, "predicted_speedup": 2.0},
      {"point": {"k": 4}, "speedup": 1.9, "predicted_speedup": 2.1},
  ]
  written = sweep.write_plots(rows, str(tmp_path), log=quiet)
  assert len(written) == 2


def test_summary_table():
  rows = [{"point": {"k": 1, "drafter": "ngram"}, "speedup": 1.23456, "acceptance_rate": 0.5},
          {"point": {"k": 16, "drafter": "model"}, "speedup": 2.0, "mean_tokens_per_call": 3}]
  table = sweep.summary_table(rows).splitlines()
  assert table[0].split() == ["k", "drafter", "speedup", "predicted_speedup",
                              "acceptance_rate", "mean_tokens_per_call"]
  assert table[2].split() == ["1", "ngram", "1.235", "-", "0.500", "-"]
  assert table[3].split() == ["16", "model", "2.000", "-", "-", "3"]
  assert sweep.summary_table([]) == "(no sweep results)"


def test_format_duration():
  assert sweep.format_duration(4.4) == "4s"
  assert sweep.format_duration(245) == "4m05s"
  assert sweep.format_duration(7380) == "2h03m"
