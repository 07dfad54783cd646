"""End-to-end experiment jobs through the command line's entry point (in
process, ``common.run_cli``): trace, sweep, prompts files, errors."""

import json

import ml_collections
import pytest

from common import REPO_ROOT, load_config, run_cli, tiny_config
from specdec_jax import config_defaults
from specdec_jax import runtime
from specdec_jax.jobs import sweep
from specdec_jax.jobs import trace as trace_job


def _main(capsys, workdir, *overrides, config="configs/tiny.py"):
  """(exit code, stdout, stderr) of the CLI on ``config`` (in process)."""
  return run_cli([f"--config={REPO_ROOT / config}", f"--workdir={workdir}", *overrides],
                 capsys)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_trace_mode_matches_compiled_loop(tmp_path, drafter):
  config = tiny_config(drafter=drafter, batch_size=2, job="trace")
  summary = trace_job.run(config, str(tmp_path), log=lambda *_: None)
  rt = runtime.build(config)
  prompts = [rt.encode_prompt(p) for p in runtime.load_prompt_list(config)[:2]]
  compiled = rt.generator().generate(rt.target_params, rt.draft_params, prompts,
                                     seeds=[0, 1], **rt.run_kwargs())
  assert summary["output_ids"] == [r.output_ids for r in compiled.rows]
  lines = (tmp_path / "trace.jsonl").read_text().splitlines()
  steps = [json.loads(line) for line in lines]
  assert len(steps) == summary["steps"] > 0
  # Emitted tokens per step concatenate to the output; accepted <= proposed.
  for b in range(2):
    emitted = [t for s in steps for t in s["rows"][b]["emitted"]]
    assert emitted == summary["output_ids"][b]
    for s in steps:
      row = s["rows"][b]
      if row["accepted"] >= 0:
        assert row["accepted"] <= len(row["drafts"])
        assert row["emitted"][:row["accepted"]] == row["drafts"][:row["accepted"]]
  html = (tmp_path / "trace.html").read_text()
  assert "<table>" in html and "Row 1" in html


def test_sweep_job_end_to_end(tmp_path, capsys):
  # k_max=2: both points run the same compiled programs (K is traced). The
  # flat --config.sweep.k (the name before decode settings were grouped)
  # still works, with a one-line note.
  rc, _, err = _main(capsys, tmp_path, "--config.sweep.k=(1, 2)", "--config.decode.k_max=2",
                     "--config.decode.k=2", "--config.decode.policy=fixed",
                     "--config.sweep.decode.drafter=('ngram',)", "--config.benchmark.repeats=1",
                     "--config.benchmark.timing_iters=2", "--config.benchmark.timing_rounds=1",
                     "--config.max_new_tokens=8", config="configs/tiny.py:sweep")
  assert rc == 0, err[-2000:]
  assert "note: --config.sweep.k is now --config.sweep.decode.k" in err
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
  assert sorted((r["point"]["decode.k"], r["point"]["decode.drafter"]) for r in rows) == [
      (1, "ngram"), (2, "ngram")]
  assert all("speedup" in r and "predicted_speedup" in r for r in rows)
  assert (tmp_path / "speedup_vs_k.png").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--config.job=benchmark", "--config.prompts=nonsense"], "nonsense"),
    (["--config.prompts_file=/nonexistent/prompts.jsonl"], "prompts.jsonl"),
    (["--config.job=bogus"], "config.job"),
    (["--config.decode.policy=sometimes"], "policy"),
    (["--config.decode.tau=1.5"], "tau"),
    (["--config.decode.k=0"], "config.decode.k"),
    (["--config.no_such_field=3"], "no_such_field"),
])
def test_bad_config_gives_one_line_error(tmp_path, capsys, overrides, message):
  rc, _, err = _main(capsys, tmp_path, *overrides)
  assert rc == 2
  assert message in err
  assert "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err


def test_malformed_prompts_file_names_the_line(tmp_path, capsys):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "ok"}\n{"prompt": \n')
  rc, _, err = _main(capsys, tmp_path / "out", f"--config.prompts_file={path}")
  assert rc == 2
  assert "p.jsonl:2" in err
  assert "Traceback" not in err


def test_unwritable_workdir_is_a_clear_error(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  rc, _, err = _main(capsys, blocker / "sub")
  assert rc == 2
  assert "workdir" in err and "Traceback" not in err


def test_user_prompts_file_runs_with_categories(tmp_path, capsys):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "copy copy copy copy", "category": "mine"}\n'
                  '{"prompt": "hello"}\n')
  rc, _, err = _main(capsys, tmp_path / "out", f"--config.prompts_file={path}",
                     "--config.job=benchmark", "--config.benchmark.repeats=1",
                     "--config.benchmark.timing_iters=2", "--config.benchmark.timing_rounds=1")
  assert rc == 0, err[-2000:]
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert {r["category"] for r in summary["per_category"]} == {"mine", "custom"}
  assert summary["compiles_after_warmup"] == 0


# ----------------------------------------------------------------------------
# Grouped config fields (decode.*, sampling.*, distill.train_steps) and their
# old flat names.


def test_every_moved_field_lives_in_its_group_only():
  config = config_defaults.base_config()
  for name, path in config_defaults.MOVED_FIELDS.items():
    group, leaf = path.split(".")
    assert leaf == name and name in config[group] and name not in config, path


def test_flat_flags_are_rewritten_with_one_note_each():
  notes = []
  argv = config_defaults.upgrade_flags(
      ["prog", "--config.k=3", "--config.temperature", "0.5", "--config.decode.k_max=4",
       "--config.sweep.drafter=('ngram',)", "--config.train_steps=9", "--config.kk=1",
       "--noconfig.matched_numerics", "--workdir=/tmp/k"], notes.append)
  assert argv == ["prog", "--config.decode.k=3", "--config.sampling.temperature", "0.5",
                  "--config.decode.k_max=4", "--config.sweep.decode.drafter=('ngram',)",
                  "--config.distill.train_steps=9", "--config.kk=1",
                  "--noconfig.decode.matched_numerics", "--workdir=/tmp/k"]
  assert notes == [
      "note: --config.k is now --config.decode.k (the flat name is deprecated)",
      "note: --config.temperature is now --config.sampling.temperature (the flat name is "
      "deprecated)",
      "note: --config.sweep.drafter is now --config.sweep.decode.drafter (the flat name is "
      "deprecated)",
      "note: --config.train_steps is now --config.distill.train_steps (the flat name is "
      "deprecated)",
      "note: --noconfig.matched_numerics is now --noconfig.decode.matched_numerics (the flat "
      "name is deprecated)"]


def test_flat_flag_still_sets_the_grouped_field(tmp_path, capsys):
  # k=0 is refused by the config check, before any weights load
  rc, _, err = _main(capsys, tmp_path, "--config.k=0")
  assert rc == 2
  assert err.strip().splitlines() == [
      "note: --config.k is now --config.decode.k (the flat name is deprecated)",
      "error: config.decode.k=0 must be an int >= 1"]


def test_a_flat_field_set_in_python_is_refused_by_name():
  config = tiny_config()
  config.k = 3   # a ConfigDict takes new keys, so nothing else would notice
  with pytest.raises(ValueError, match=r"^config.k is now config.decode.k"):
    runtime.validate_config(config)
  config = tiny_config()
  config.sweep = ml_collections.ConfigDict(dict(k=[1, 2]))
  with pytest.raises(ValueError, match=r"sweep field 'k' is now 'decode.k'"):
    sweep.sweep_fields(config)


@pytest.mark.parametrize("path,variant", [
    ("configs/tiny.py", None), ("configs/tiny.py", "sweep"), ("configs/smollm2.py", None),
    ("configs/smollm2_policies.py", None), ("configs/distill_smollm2.py", None),
    ("configs/feature_smollm2.py", None), ("configs/feature_smollm2.py", "compare"),
    ("configs/trees_smollm2.py", None), ("configs/trees_smollm2.py", "feature"),
    ("configs/trees_smollm2.py", "feature_sampling")])
def test_shipped_configs_validate_at_every_sweep_point(path, variant):
  """Every shipped config (and variant) passes the config check at each of
  its sweep points, so a typo in one fails here, not an hour into a run."""
  config = load_config(path, variant)
  fields = sweep.sweep_fields(config)
  points = sweep.grid_points(fields) if fields else [{}]
  for point in points:
    runtime.validate_config(sweep.point_config(config, point))


def test_trees_config_compares_chains_and_trees_at_equal_widths():
  config = load_config("configs/trees_smollm2.py", "feature")
  assert config.decode.drafter == "feature"
  widths = {}
  for shape in config.sweep.shape:
    nodes = shape["decode.tree_nodes"] or shape["decode.k"]
    widths.setdefault(nodes + 1, set()).add("tree" if shape["decode.tree_nodes"] else "chain")
  assert widths == {4: {"chain", "tree"}, 8: {"chain", "tree"}, 16: {"chain", "tree"}}
  sampling = load_config("configs/trees_smollm2.py", "feature_sampling")
  assert sampling.sampling.temperature == 1.0 and sampling.decode.rule == "rejection"
  sampled = {shape["decode.tree_nodes"] + 1 for shape in sampling.sweep.shape
             if shape.get("decode.tree_candidates") == "sampled"}
  assert sampled == {4, 8, 16}
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("configs/trees_smollm2.py", "fetaure")
