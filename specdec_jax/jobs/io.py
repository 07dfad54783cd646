"""Workdir output: JSON files written atomically, JSONL appended durably.

On several hosts only process 0 writes (``is_writer``); the helpers are
no-ops elsewhere, so every host can run the same job code.
"""

import json
import os


def is_writer() -> bool:
  """True on process 0 (always, in a single-process run)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir and checks it is writable; ValueError otherwise."""
  if not workdir:
    raise ValueError("--workdir is required")
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    if not is_writer():
      return workdir
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {workdir} is not writable: {e.strerror}") from None
  return workdir


def write_json(path: str, obj) -> None:
  """Writes via a temporary file and rename: never a half-written file."""
  if not is_writer():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str, fix: str = ""):
  """The JSON value in ``path``; ValueError naming the file if it is damaged
  (``fix`` says what to do about it)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is damaged ({e}){'; ' + fix if fix else ''}") from None


def append_jsonl(path: str, obj) -> None:
  """Appends one line with a single write and fsyncs it before returning: an
  interrupted job leaves whole lines only (resumable jobs read them back)."""
  if not is_writer():
    return
  data = (json.dumps(obj, sort_keys=True, default=_default) + "\n").encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


def _default(obj):
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if hasattr(obj, "item"):
    return obj.item()
  raise TypeError(f"not JSON serialisable: {type(obj)}")
