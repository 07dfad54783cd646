"""A CPU matmul for the few rows a decode step multiplies: ``x @ w.T``.

A decode step multiplies 1..8 rows (a plain step: the batch; a verify pass:
K + 1 tokens per row) by every weight of the model, so its cost is reading
the weights. XLA:CPU streams them at the memory's speed for one row and at
about two thirds of it from two rows on (its matrix-matrix path), which is
what made a verify pass of 5 tokens cost ~1.6 plain steps on the CPU this
project is measured on. ``rows_matmul.cc`` streams each weight row once
for up to ``MAX_ROWS`` rows of x; ``benchmarks/matmul_width.py --forms=dot,kernel``
measures both.

Use: ``Transformer(cfg, "unrolled", matmul="kernel")`` stores its kernels
[out, in] (``prepare_params``; checkpoints keep [in, out]) and calls
``dense_t``, which takes the kernel for up to ``MAX_ROWS`` float32 rows on the
CPU and ``x @ w.T`` otherwise (prefill, large batches, other platforms, other
dtypes). ``available()`` builds the kernel on first use (a C++ compiler,
``-O3 -march=native``, about 2 s; the library is cached per machine and
source under ``~/.cache/specdec_jax/kernels`` or ``$SPECDEC_KERNEL_CACHE``)
and says whether it loaded; without a compiler everything runs on XLA.

Numerics: the kernel sums each output in the same order whatever the number
of rows (see the .cc), so a verify pass's logits for a row equal a plain
step's bit for bit; against XLA's dot it differs by float32 reassociation.
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
import jax.numpy as jnp
import jaxlib

MAX_ROWS = 8          # the kernel's M range (1..MAX_ROWS)
TARGET_NAME = "specdec_rows_matmul"
_SOURCE = os.path.join(os.path.dirname(__file__), "rows_matmul.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state = {"loaded": None, "why": ""}


def cache_dir() -> str:
  return os.environ.get("SPECDEC_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "specdec_jax", "kernels")


def _compiler() -> str | None:
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
  return os.path.join(cache_dir(), f"rows_matmul-{key}.so")


def _build(cxx: str, path: str) -> None:
  """Compiles the kernel into ``path`` (atomically: concurrent processes
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
  """Builds (first use on this machine), loads and registers the kernel;
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
  cxx = _compiler()
  if cxx is None:
    _state["why"] = "no C++ compiler (set CXX, or install g++ or clang++)"
    return False
  path = _library_path(cxx)
  try:
    if not os.path.exists(path):
      _build(cxx, path)
    library = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(TARGET_NAME, jax.ffi.pycapsule(library.SpecdecRowsMatmul),
                                platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    _state["why"] = f"could not build or load {path}: {e}"
    logging.warning("specdec_jax: the CPU matmul kernel is unavailable, using XLA's dot: %s",
                    _state["why"])
    return False
  return True


def _kernel_call(x_MD: jax.Array, w_ND: jax.Array) -> jax.Array:
  if not available():   # (traced for every platform: lax.platform_dependent)
    return x_MD @ w_ND.T
  return jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((x_MD.shape[0], w_ND.shape[0]),
                                                            jnp.float32))(x_MD, w_ND)


@jax.custom_vjp
def rows_matmul(x_MD: jax.Array, w_ND: jax.Array) -> jax.Array:
  """``x_MD @ w_ND.T`` (float32, 1 <= M <= MAX_ROWS) by the kernel on the
  CPU (where it builds) and by XLA elsewhere; differentiable (the backward
  pass is XLA's)."""
  return jax.lax.platform_dependent(x_MD, w_ND, cpu=_kernel_call,
                                    default=lambda x, w: x @ w.T)


def _rows_matmul_fwd(x_MD, w_ND):
  return rows_matmul(x_MD, w_ND), (x_MD, w_ND)


def _rows_matmul_bwd(residuals, dy_MN):
  x_MD, w_ND = residuals
  return dy_MN @ w_ND, dy_MN.T @ x_MD


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def dense_t(x: jax.Array, w_ND: jax.Array, preferred_element_type=None) -> jax.Array:
  """``x @ w_ND.T`` over x's last axis: the kernel where it applies (float32,
  at most MAX_ROWS rows in all, the kernel loaded), XLA's dot otherwise,
  accumulating in ``preferred_element_type`` as ``jnp.einsum`` does."""
  rows = x.size // x.shape[-1] if x.shape[-1] else 0
  if (x.dtype != jnp.float32 or w_ND.dtype != jnp.float32 or not 1 <= rows <= MAX_ROWS
      or not available()):
    return jnp.einsum("...d,nd->...n", x, w_ND.astype(x.dtype),
                      preferred_element_type=preferred_element_type)
  y_MN = rows_matmul(x.reshape(rows, x.shape[-1]), w_ND)
  return y_MN.reshape(x.shape[:-1] + (w_ND.shape[0],))
