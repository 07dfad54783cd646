"""Counts XLA backend compilations per jitted function name."""

import collections
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_counts = collections.Counter()
_lock = threading.Lock()
_installed = False


def _listener(event, duration, **kwargs):
  del duration
  if event == _EVENT:
    with _lock:
      _counts[kwargs.get("fun_name", "?")] += 1


def install() -> None:
  """Registers the listener once per process."""
  global _installed
  if not _installed:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _installed = True


def count(name_contains: str = "") -> int:
  """Compilations so far of functions whose name contains ``name_contains``."""
  install()
  with _lock:
    return sum(n for name, n in _counts.items() if name_contains in name)


def loop_compiles() -> int:
  """Compilations so far of the decode loop (``generation.LOOP``, the name
  the Generator gives the jitted loop, so renaming code cannot make a
  "0 recompiles" check count nothing)."""
  from specdec_jax import generation  # pylint: disable=g-import-not-at-top  (imports this module)
  return count(generation.LOOP)


def snapshot() -> dict[str, int]:
  with _lock:
    return dict(_counts)
