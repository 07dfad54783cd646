"""The memory roofline of a decode step, measured on this machine.

A decode step must read every weight once and the KV cache it attends, so
its time is at least (bytes read) / (memory bandwidth). The bandwidth is
measured in the same run (a numpy matrix-vector product over a matrix far
larger than the caches; this machine's figure swung from 16 to 6 GB/s
within an hour, so a constant would mislead), as the median of alternating
repeats.
"""

import time

import jax
import numpy as np

from specdec_jax.models.config import ModelConfig

_MATRIX_BYTES = 256 * 2**20


def measure_bandwidth(repeats: int = 9) -> float:
  """Bytes per second a float32 matrix-vector product streams (median)."""
  cols = 4096
  rows = _MATRIX_BYTES // (4 * cols)
  matrix = np.random.default_rng(0).random((rows, cols), dtype=np.float32)
  vector = np.ones(cols, np.float32)
  matrix @ vector   # page the matrix in
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    matrix @ vector
    times.append(time.perf_counter() - t0)
  return matrix.nbytes / float(np.median(times))


def param_bytes(params) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(params)))


def cache_bytes(cfg: ModelConfig, batch_size: int, num_slots: int) -> int:
  """Keys and values a step's attention reads: every layer, every slot."""
  itemsize = np.dtype(cfg.jnp_dtype).itemsize
  return 2 * cfg.num_layers * batch_size * num_slots * cfg.num_kv_heads * cfg.head_dim * itemsize


def step_bytes(cfg: ModelConfig, params, batch_size: int, num_slots: int) -> int:
  """Bytes one decode step must read: the weights and the KV cache."""
  return param_bytes(params) + cache_bytes(cfg, batch_size, num_slots)
