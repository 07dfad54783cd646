"""Builds and loads the CPU kernels (``cpu_kernels.cc``) as XLA FFI targets.

``available()`` compiles the library on first use on a machine (a C++
compiler, ``-O3 -march=native``, about 3 s; cached per source, compiler,
jax/jaxlib version and CPU under ``~/.cache/specdec_jax/kernels`` or
``$SPECDEC_KERNEL_CACHE``), loads it and registers its targets; it says
False, with the reason in ``why_unavailable()``, where that cannot be done
(no compiler: set ``CXX`` or install g++ / clang++), and everything then runs
on XLA. ``SPECDEC_DISABLE_KERNELS=1`` turns the kernels off.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jaxlib

# FFI target name -> the library's handler symbol.
TARGETS = {"specdec_rows_matmul": "SpecdecRowsMatmul",
           "specdec_decode_attention": "SpecdecDecodeAttention"}
_SOURCE = os.path.join(os.path.dirname(__file__), "cpu_kernels.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state = {"loaded": None, "why": ""}


def cache_dir() -> str:
  return os.environ.get("SPECDEC_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "specdec_jax", "kernels")


def compiler() -> str | None:
  """The C++ compiler command ($CXX, which may carry arguments, or the first
  of c++, g++, clang++ on the PATH), or None."""
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which(
      "clang++")


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU's model and feature flags."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _library_path(cxx: str) -> str:
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([
      source, " ".join(_FLAGS).encode(), cxx.encode(), jax.__version__.encode(),
      jaxlib.__version__.encode(), sys.platform.encode(),
      _cpu_signature().encode()])).hexdigest()[:16]
  return os.path.join(cache_dir(), f"cpu_kernels-{key}.so")


def _build(cxx: str, path: str) -> None:
  """Compiles the kernels into ``path`` (atomically: concurrent processes
  may build the same library)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [*shlex.split(cxx), *_FLAGS, "-I", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f"{' '.join(cmd)} failed: {e}") from None
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def available() -> bool:
  """Builds (first use on this machine), loads and registers the kernels;
  False, with the reason in ``why_unavailable()``, where it cannot."""
  with _lock:
    if _state["loaded"] is None:
      _state["loaded"] = _load()
    return _state["loaded"]


def why_unavailable() -> str:
  return _state["why"]


def _load() -> bool:
  if os.environ.get("SPECDEC_DISABLE_KERNELS"):
    _state["why"] = "SPECDEC_DISABLE_KERNELS is set"
    return False
  cxx = compiler()
  if cxx is None:
    _state["why"] = "no C++ compiler (set CXX, or install g++ or clang++)"
    return False
  path = _library_path(cxx)
  try:
    if not os.path.exists(path):
      _build(cxx, path)
    library = ctypes.CDLL(path)
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    _state["why"] = f"could not build or load {path}: {e}"
    logging.warning("specdec_jax: the CPU kernels are unavailable, using XLA: %s",
                    _state["why"])
    return False
  return True
