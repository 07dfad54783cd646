"""Multi-host runs: one process per host, all running the same command.

With ``config.distributed=True`` every process calls
``jax.distributed.initialize()`` before anything touches a device; after it
``jax.devices()`` lists the devices of all hosts and the mesh (sharding.py)
spans them, so one compiled generate function runs on the whole pod.

On Cloud TPU (and SLURM, Open MPI, Kubernetes) the coordinator, process
count and process id are detected. Elsewhere set ``JAX_COORDINATOR_ADDRESS``
(read by JAX) plus ``SPECDEC_NUM_PROCESSES`` and ``SPECDEC_PROCESS_ID``.

How prompts are split: every process reads the same prompt list (it is small
and identical, so all processes agree on batches and prompt-length buckets,
which keeps the compiled shapes equal everywhere) and packs the same global
batch of ``config.batch_size`` rows. Rows are sharded over the ``data`` axis
and each process feeds only the rows that live on its own devices
(``process_rows``: with the default device order process p owns the p-th
contiguous block of every global batch); nothing else is copied to its
devices. The per-row results are gathered to every process after the loop,
and only process 0 writes files and logs (``is_writer``).
"""

import os

import jax
import numpy as np

_initialized = False


def initialize(config) -> bool:
  """``jax.distributed.initialize()`` once, when ``config.distributed``.

  Must run before anything touches a device. Returns whether it ran.
  """
  global _initialized
  if not config.get("distributed", False) or _initialized:
    return False
  kwargs = {}
  if os.environ.get("SPECDEC_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["SPECDEC_NUM_PROCESSES"])
    kwargs["process_id"] = int(os.environ["SPECDEC_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  _initialized = True
  return True


def is_writer() -> bool:
  """Only process 0 writes results and logs."""
  return jax.process_index() == 0


def process_rows(batch_size: int, batch_sharding: jax.sharding.Sharding) -> list[int]:
  """Rows of a global [batch_size] batch that this process's devices hold."""
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return sorted(rows)


def process_prompts(num_prompts: int, batch_size: int,
                    batch_sharding: jax.sharding.Sharding) -> list[int]:
  """Indices of the prompts this process feeds, over all global batches."""
  rows = np.asarray(process_rows(batch_size, batch_sharding))
  mine = [start + rows for start in range(0, num_prompts, batch_size)]
  flat = np.concatenate(mine) if mine else np.zeros(0, int)
  return flat[flat < num_prompts].tolist()
