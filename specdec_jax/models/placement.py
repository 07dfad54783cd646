"""Host (numpy) weights -> device arrays, optionally straight into shards.

The weight importers build numpy trees; with a sharding pytree each device
receives only its own slice (``jax.make_array_from_callback``), so a model
larger than one device's memory never lands whole on one device. Without one
the arrays go to the default device exactly as ``jnp.asarray`` puts them.

``ShardingFn``: ``ModelConfig -> pytree of jax.sharding.Sharding`` shaped like
the params (``sharding.param_shardings`` makes one); loaders call it once they
know the config, before reading any tensor, so bad shardings fail early.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ShardingFn = Callable[[Any], Any]


def to_device(host: np.ndarray, dtype, sharding: jax.sharding.Sharding | None = None):
  """One array in ``dtype``, on the default device or split into ``sharding``."""
  if sharding is None:
    return jnp.asarray(host, dtype=dtype)
  host = np.asarray(host)
  return jax.make_array_from_callback(
      host.shape, sharding, lambda index: np.asarray(host[index], dtype=dtype))


def tree_to_device(tree, dtype, shardings=None):
  """``to_device`` over a params tree (``shardings``: same structure or None)."""
  if shardings is None:
    return jax.tree.map(lambda x: to_device(x, dtype), tree)
  return jax.tree.map(lambda x, s: to_device(x, dtype, s), tree, shardings)
