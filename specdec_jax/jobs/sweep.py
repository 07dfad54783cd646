"""Sweep job: run one benchmark per point of a grid of config values.

The grid comes from ``config.sweep``, which maps config field names to lists
of values. Nested fields are written either as nested ConfigDicts
(``sweep.decode = ConfigDict(dict(k=[1, 2, 4, 8], drafter=['ngram', 'model']))``
means ``decode.k`` and ``decode.drafter``) or as dotted keys in a
``ConfigDict(allow_dotted_keys=True)``.

The grid is the cartesian product of the lists. Fields are ordered by name
(the first varies slowest) and values in list order, so the order is
deterministic.

Every finished point is appended at once to ``workdir/results.jsonl`` as one
line ``{"point": {...}, "point_key": "...", **summary}`` (written with a
single ``write`` and fsynced). A rerun resumes: points whose ``point_key`` is
already in the file are skipped, and a torn last line left by a kill is cut
away. The key depends only on the swept values, so use a fresh workdir after
changing anything else in the config.

A point whose ``run_point`` raises is logged and not written, the other points
still run, and ``run_sweep`` raises at the end; a rerun retries it.
"""

import itertools
import json
import math
import os
import time
import traceback

import ml_collections

from specdec_jax import config_defaults
from specdec_jax.jobs import io

RESULTS_FILE = "results.jsonl"
SPEEDUP_PLOT = "speedup_vs_k.png"
ACCEPTANCE_PLOT = "acceptance_by_position.png"
WIDTH_PLOT = "tokens_per_call_vs_width.png"
TABLE_METRICS = ("speedup", "predicted_speedup", "acceptance_rate", "mean_tokens_per_call")
# Names (last dotted component) of a swept field that holds the draft length.
K_FIELD_NAMES = ("k", "k_max")


def run_sweep(config, workdir: str, run_point, log=print) -> list:
  """Runs ``run_point`` at every grid point not already in results.jsonl.

  Args:
    config: ml_collections.ConfigDict with a ``sweep`` field (see module doc).
    workdir: folder for results.jsonl and the plots; created if missing.
    run_point: point_config -> summary dict (JSON-serialisable values; numpy
      and jax scalars/arrays are converted, non-finite floats become null).
      point_config is a copy of ``config`` with the point's values set and
      ``sweep`` emptied.
    log: callable taking one string, for progress lines.

  Returns:
    The result rows of all grid points that have one, in grid order
    (including rows from earlier runs).

  Raises:
    ValueError: invalid sweep (unknown field, empty or non-list values,
      duplicate values, value of the wrong type) or unwritable workdir; raised
      before any point runs.
    RuntimeError: at the end, if some points failed.
  """
  fields = sweep_fields(config)
  points = grid_points(fields)
  for point in points:
    point_config(config, point)  # Type errors surface now, not mid-sweep.
  path = _prepare_workdir(workdir)
  rows_by_key = load_results(path, log)

  todo = [p for p in points if point_key(p) not in rows_by_key]
  names = ", ".join(name for name, _ in fields) or "(no fields)"
  log(f"sweep over {names}: {len(points)} points, {len(points) - len(todo)} already done, "
      f"{len(todo)} to run; results in {path}")
  failures = _run_points(config, points, rows_by_key, path, run_point, log)

  rows = [rows_by_key[point_key(p)] for p in points if point_key(p) in rows_by_key]
  log(summary_table(rows))
  write_plots(rows, workdir, log)
  if failures:
    raise RuntimeError(
        f"{len(failures)} of {len(points)} sweep points failed ({'; '.join(failures)}); "
        "rerun the sweep to retry them")
  return rows


def _run_points(config, points, rows_by_key, path, run_point, log) -> list:
  """Runs the points missing from rows_by_key; returns labels of failures."""
  total = len(points)
  remaining = sum(point_key(p) not in rows_by_key for p in points)
  durations, failures = [], []
  for index, point in enumerate(points, start=1):
    key = point_key(point)
    if key in rows_by_key:
      continue
    label = point_label(point)
    remaining -= 1
    start = time.perf_counter()
    try:
      summary = run_point(point_config(config, point))
    except Exception as e:  # One bad point should not end a long sweep.
      log(f"[{index}/{total}] {label} ... FAILED after {time.perf_counter() - start:.1f}s: "
          f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
      failures.append(label)
      continue
    elapsed = time.perf_counter() - start
    durations.append(elapsed)
    row = make_row(point, summary)
    io.append_jsonl(path, row)
    rows_by_key[key] = row
    eta = sum(durations) / len(durations) * remaining
    log(f"[{index}/{total}] {label} ... done in {elapsed:.1f}s, ETA {format_duration(eta)}")
  return failures


# ----------------------------------------------------------------------------
# The grid.


def sweep_fields(config) -> list:
  """Validated [(dotted field name, list of values)], sorted by name."""
  if "sweep" not in config:
    raise ValueError("config has no 'sweep' field; add e.g. "
                     "config.sweep.decode = ConfigDict(dict(k=[1, 2, 4]))")
  fields = sorted(_flatten(config.sweep or {}, prefix=""))
  for name, values in fields:
    if name == "sweep" or name.startswith("sweep."):
      raise ValueError(f"cannot sweep over {name!r}")
    if not isinstance(values, (list, tuple)):
      raise ValueError(f"sweep.{name} must be a list of values, got {values!r}")
    if not values:
      raise ValueError(f"sweep.{name} is an empty list")
    if _is_joint(values):
      # A joint axis: each value sets several fields at once; its name is a label.
      for value in values:
        for field in value:
          _check_field_exists(config, field)
    else:
      _check_field_exists(config, name)
    keys = [_json_key(v, name) for v in values]
    if len(set(keys)) != len(keys):
      raise ValueError(f"sweep.{name} has duplicate values: {list(values)}")
  return [(name, list(values)) for name, values in fields]


def _flatten(node, prefix: str):
  """Yields (dotted name, leaf value) of a nested ConfigDict / dict."""
  for key, value in node.items():
    name = f"{prefix}{key}"
    if _is_mapping(value):
      yield from _flatten(value, prefix=f"{name}.")
    else:
      yield name, value


def _is_joint(values) -> bool:
  """A swept list of dicts ({field: value, ...}): fields that change together
  (e.g. ``sweep.shape = ({"k": 7}, {"k": 4, "tree_nodes": 7})``)."""
  return all(_is_mapping(v) for v in values)


def _is_mapping(value) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _check_field_exists(config, name: str) -> None:
  """Raises ValueError naming the field when ``name`` is not in config."""
  if name in config_defaults.MOVED_FIELDS and name not in config:
    raise ValueError(f"sweep field {name!r} is now {config_defaults.MOVED_FIELDS[name]!r}")
  node = config
  parts = name.split(".")
  for depth, part in enumerate(parts):
    if not _is_mapping(node) or part not in node:
      parent = ".".join(parts[:depth]) or "config"
      known = sorted(node.keys()) if _is_mapping(node) else []
      raise ValueError(
          f"unknown sweep field {name!r}: {parent} has no field {part!r} "
          f"(fields there: {known})")
    node = node[part]


def grid_points(fields: list) -> list:
  """Cartesian product of the value lists, as [{name: value}]."""
  names = [name for name, _ in fields]
  return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in fields))]


def point_key(point: dict) -> str:
  """Stable string identifying a point (canonical JSON)."""
  return json.dumps(point, sort_keys=True, separators=(",", ":"))


def _json_key(value, name: str) -> str:
  try:
    return json.dumps(value, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"sweep.{name} value {value!r} is not JSON-serialisable: {e}") from None


def point_label(point: dict) -> str:
  """Human-readable 'k=4 drafter=ngram'."""
  return " ".join(f"{name}={value}" for name, value in point.items()) or "(base config)"


def point_config(config, point: dict):
  """Copy of config with the point's values set and ``sweep`` emptied."""
  cfg = ml_collections.ConfigDict(config) if isinstance(
      config, ml_collections.FrozenConfigDict) else config
  cfg = cfg.copy_and_resolve_references()
  settings = {}
  for name, value in point.items():
    settings.update(dict(value) if _is_mapping(value) else {name: value})
  for name, value in settings.items():
    *parents, leaf = name.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ValueError(f"cannot set {name}={value!r}: {e}") from None
  cfg.sweep = ml_collections.ConfigDict()
  return cfg


# ----------------------------------------------------------------------------
# results.jsonl


def _prepare_workdir(workdir: str) -> str:
  """Creates workdir and checks it is writable; returns the results path."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
    if os.path.exists(path):
      open(path, "r+b").close()
  except OSError as e:
    raise ValueError(f"sweep workdir {workdir!r} is not writable: {e}") from None
  return path


def load_results(path: str, log=print) -> dict:
  """Reads results.jsonl into {point_key: row}, repairing a torn last line.

  A last line without its newline is what a kill in the middle of a write
  leaves; it is cut off (the file is truncated after the last complete line)
  and its point runs again. Any other invalid line is an error.
  """
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    data = f.read()
  complete = data.rfind(b"\n") + 1
  if complete < len(data):
    log(f"{path}: removing a torn last line ({len(data) - complete} bytes) "
        "left by an interrupted run")
    _truncate(path, complete)
  rows = {}
  for line_no, line in enumerate(data[:complete].split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      raise ValueError(f"{path}:{line_no} is not valid JSON; fix or delete that line") from None
    if not isinstance(row, dict) or not isinstance(row.get("point_key"), str):
      raise ValueError(f"{path}:{line_no} is not a sweep result row (no 'point_key')")
    rows.setdefault(row["point_key"], row)
  return rows


def _truncate(path: str, size: int) -> None:
  with open(path, "r+b") as f:
    f.truncate(size)
    f.flush()
    os.fsync(f.fileno())


def make_row(point: dict, summary: dict) -> dict:
  """The JSON row for one point; 'point' and 'point_key' win over summary keys."""
  if not isinstance(summary, dict):
    raise TypeError(f"run_point must return a dict, got {type(summary).__name__}")
  row = {"point": dict(point), "point_key": point_key(point)}
  row.update({k: v for k, v in summary.items() if k not in row})
  return to_jsonable(row)


def to_jsonable(value):
  """Plain JSON types: arrays/scalars via .tolist(), NaN/inf -> None."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, float):
    return float(value) if math.isfinite(value) else None
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, ml_collections.ConfigDict):
    return to_jsonable(value.to_dict())
  if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
    return to_jsonable(value.tolist())
  return str(value)


# ----------------------------------------------------------------------------
# Reporting.


def format_duration(seconds: float) -> str:
  """'37s', '4m05s' or '2h03m'."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary_table(rows: list) -> str:
  """Fixed-width table: swept fields, then TABLE_METRICS; '-' where missing."""
  if not rows:
    return "(no sweep results)"
  fields = list(dict.fromkeys(name for row in rows for name in row.get("point", {})))
  header = fields + list(TABLE_METRICS)
  body = [[_point_cell(row.get("point", {}), f) for f in fields]
          + [_cell(row.get(m)) for m in TABLE_METRICS] for row in rows]
  widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
  lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
  return "\n".join(line.rstrip() for line in lines)


def _point_cell(point: dict, field: str) -> str:
  """A swept value, shown as given (not rounded); a joint one as k=v,k=v."""
  if field not in point:
    return "-"
  value = point[field]
  if _is_mapping(value):
    return ",".join(f"{k}={v}" for k, v in value.items())
  return str(value)


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def _number(value):
  """value as a float if it is a real number (not bool), else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def write_plots(rows: list, workdir: str, log=print) -> list:
  """Writes the PNG plots it has data for; returns their paths. Never raises."""
  written = []
  for name, plot in ((SPEEDUP_PLOT, _plot_speedup_vs_k),
                     (ACCEPTANCE_PLOT, _plot_acceptance_by_position),
                     (WIDTH_PLOT, _plot_tokens_per_call_vs_width)):
    path = os.path.join(workdir, name)
    try:
      skipped = plot(rows, path)
    except Exception as e:  # A plotting problem must not lose a finished sweep.
      skipped = f"plotting failed: {type(e).__name__}: {e}"
    if skipped:
      log(f"skipping {name}: {skipped}")
    else:
      log(f"wrote {path}")
      written.append(path)
  return written


def _k_of(row: dict) -> tuple:
  """(K, name of the swept K field or None) for a row; K is None if unknown."""
  for name, value in row.get("point", {}).items():
    if name.split(".")[-1] in K_FIELD_NAMES and _number(value) is not None:
      return _number(value), name
  return _number(row.get("k")), None


def _plot_speedup_vs_k(rows: list, path: str):
  """Measured speedup vs K per combination of the other fields; None if written."""
  series = {}
  for row in rows:
    k, k_field = _k_of(row)
    speedup = _number(row.get("speedup"))
    if k is None or speedup is None:
      continue
    others = {n: v for n, v in row.get("point", {}).items() if n != k_field}
    label = point_label(others) if others else "measured"
    series.setdefault(label, []).append((k, speedup, _number(row.get("predicted_speedup"))))
  if not series:
    return "no rows with numeric 'speedup' and 'k'"
  fig, ax = _new_axes()
  any_predicted = False
  for i, (label, points) in enumerate(series.items()):
    points.sort(key=lambda p: p[0])
    color = f"C{i % 10}"
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=label)
    predicted = [(p[0], p[2]) for p in points if p[2] is not None]
    if predicted:
      any_predicted = True
      ax.plot([p[0] for p in predicted], [p[1] for p in predicted], "--", color=color, alpha=0.7)
  if any_predicted:
    ax.plot([], [], "--", color="gray", label="predicted (dashed)")
  ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
  ax.set_xlabel("draft length K")
  ax.set_ylabel("speedup over plain decoding")
  ax.set_title("Speculative decoding speedup vs K")
  _finish(fig, ax, path, len(series))
  return None


def _plot_acceptance_by_position(rows: list, path: str):
  """Acceptance at each draft position, one line per point; None if written."""
  lines = []
  for row in rows:
    values = row.get("acceptance_by_position")
    if isinstance(values, list) and values:
      numbers = [_number(v) for v in values]
      lines.append((point_label(row.get("point", {})),
                    [math.nan if v is None else v for v in numbers]))
  if not lines:
    return "no rows with an 'acceptance_by_position' list"
  fig, ax = _new_axes()
  for i, (label, values) in enumerate(lines):
    marker = "os^D"[i // 10 % 4]  # Colours repeat after 10 lines; markers tell them apart.
    ax.plot(range(1, len(values) + 1), values, marker + "-", color=f"C{i % 10}", label=label)
  ax.set_xlabel("draft position (1 = first draft token)")
  ax.set_ylabel("acceptance rate")
  ax.set_ylim(0.0, 1.05)
  ax.set_title("Acceptance by draft position")
  _finish(fig, ax, path, len(lines))
  return None


def _plot_tokens_per_call_vs_width(rows: list, path: str):
  """Tokens per target call vs the widest verify width, chains vs trees
  (one line per draft shape); None if written."""
  series = {}
  for row in rows:
    width, tokens = _number(row.get("verify_width")), _number(row.get("tokens_per_call"))
    if width is None or tokens is None or "tree_nodes" not in row:
      continue
    label = (f"tree ({row.get('tree_candidates', 'topk')} candidates)"
             if row.get("tree_nodes") else "chain")
    series.setdefault(label, []).append((width, tokens))
  if len(series) < 2:
    return "needs rows of both chains and trees with 'verify_width' and 'tokens_per_call'"
  fig, ax = _new_axes()
  for i, (label, points) in enumerate(sorted(series.items())):
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i % 10}",
            label=label)
  ax.set_xlabel("verify width (tokens per target call)")
  ax.set_ylabel("committed tokens per target call")
  ax.set_title("Chains vs trees at the same verify width")
  _finish(fig, ax, path, len(series))
  return None


def _new_axes():
  # Figure without pyplot: no global backend or state; PNG output uses Agg.
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7.5, 4.8))
  return fig, fig.add_subplot()


def _finish(fig, ax, path: str, num_lines: int) -> None:
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small" if num_lines <= 8 else "x-small", ncol=1 if num_lines <= 8 else 2)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")


def run(config, workdir: str, log=print) -> list:
  """job=sweep: one benchmark (see jobs/benchmark.py) per grid point."""
  from specdec_jax import runtime
  from specdec_jax.jobs import benchmark

  if not sweep_fields(config):
    raise ValueError("config.job=sweep needs a non-empty config.sweep grid, e.g. "
                     "--config.sweep=... in the config file (sweep.decode.k=[1, 2, 4])")

  def run_point(point_config):
    rt = runtime.build(point_config)   # checks the point's config first
    summary, _ = benchmark.run_benchmark(point_config, rt, log=lambda msg: None)
    return summary

  rows = run_sweep(config, workdir, run_point, log=log)
  log(summary_table(rows))
  return rows
