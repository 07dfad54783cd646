"""Counts XLA backend compilations per jitted function name."""

import collections
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
# The name the Generator jits its whole-generation loop under: its compiles
# are what "no recompiles" counts (``loop_compiles``).
LOOP = "generate_loop"
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
  """Compilations so far of the decode loop (``LOOP``: the Generator names
  the jitted loop by it, so renaming code cannot make a "0 recompiles"
  check count nothing)."""
  return count(LOOP)


def snapshot() -> dict[str, int]:
  with _lock:
    return dict(_counts)
