"""Orbax params checkpoints: round trip, interrupted/damaged folders, mismatches."""

import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
import pytest

from specdec_jax.models import checkpoint
from specdec_jax.models import transformer
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=50, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2,
                  head_dim=4, ffn_dim=24, tie_embeddings=False)


@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig):
  return jax.jit(Transformer(cfg).init_params)(jax.random.PRNGKey(0))


def _assert_identical(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved(tmp_path):
  path = str(tmp_path / "ckpt")
  checkpoint.save_params(path, _params(CFG), CFG)
  return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_identical(tmp_path, dtype):
  cfg = dataclasses.replace(CFG, dtype=dtype)
  params = _params(cfg)
  path = checkpoint.save_params(str(tmp_path / "ckpt"), params, cfg)
  assert os.path.isabs(path) and os.path.isfile(os.path.join(path, checkpoint.MARKER))
  assert checkpoint.read_config(path) == cfg
  _assert_identical(checkpoint.restore_params(path, cfg), params)
  assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no temp folders left


def test_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoint.save_params("rel", _params(CFG), CFG)
  _assert_identical(checkpoint.restore_params("rel", CFG), _params(CFG))


def test_existing_destination_needs_force(saved):
  other = jax.tree.map(lambda x: x + 1, _params(CFG))
  with pytest.raises(ValueError, match="exists; pass force=True"):
    checkpoint.save_params(saved, other, CFG)
  checkpoint.save_params(saved, other, CFG, force=True)
  _assert_identical(checkpoint.restore_params(saved, CFG), other)


def test_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    checkpoint.restore_params(str(tmp_path / "nope"), CFG)


def test_marker_missing_is_refused(saved):
  os.remove(os.path.join(saved, checkpoint.MARKER))
  with pytest.raises(ValueError, match="incomplete: no COMPLETE marker"):
    checkpoint.restore_params(saved, CFG)


def _params_files(path):
  root = os.path.join(path, checkpoint.PARAMS_DIR)
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs)


def test_deleted_files_are_refused(saved):
  for f in _params_files(saved)[::2]:
    os.remove(f)
  with pytest.raises(ValueError, match="damaged: file .* is missing"):
    checkpoint.restore_params(saved, CFG)


def test_truncated_file_is_refused(saved):
  biggest = max(_params_files(saved), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with pytest.raises(ValueError, match="damaged: file .* bytes"):
    checkpoint.restore_params(saved, CFG)


def test_interrupted_save_leaves_nothing(tmp_path):
  def crash(folder):
    raise KeyboardInterrupt("simulated interrupt")
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save_params(str(tmp_path / "ckpt"), _params(CFG), CFG, write_extra=crash)
  assert os.listdir(tmp_path) == []


def test_mismatched_config_is_refused(saved):
  for change in (dict(num_layers=3), dict(dtype="bfloat16"), dict(tie_embeddings=True)):
    with pytest.raises(ValueError, match="different ModelConfig"):
      checkpoint.restore_params(saved, dataclasses.replace(CFG, **change))


def test_stored_shapes_checked_against_config(saved):
  # A config file edited by hand (marker rebuilt): the params no longer fit it.
  other = dataclasses.replace(CFG, ffn_dim=32)
  with open(os.path.join(saved, checkpoint.CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(other), f)
  with open(os.path.join(saved, checkpoint.MARKER), "w") as f:
    manifest = checkpoint._manifest(saved)
    manifest.pop(checkpoint.MARKER)
    json.dump(manifest, f)
  with pytest.raises(ValueError, match=r"mlp.*ModelConfig needs"):
    checkpoint.restore_params(saved, other)


def test_save_refuses_params_not_matching_config(tmp_path):
  with pytest.raises(ValueError, match="save_params"):
    checkpoint.save_params(str(tmp_path / "x"), _params(CFG),
                           dataclasses.replace(CFG, vocab_size=51))


@pytest.mark.slow
def test_smollm2_restores_from_its_cache(smollm2, smollm2_cache_dir):
  """The session's SmolLM2 was converted from the GGUF into this cache; a
  second load restores the same params and tokenizer from orbax, and both
  equal a direct GGUF import (one conversion of the 135M model in all). (The
  tokenizer's parity with transformers' is test_smollm2_reference's.)"""
  target, params, tok = smollm2
  start = time.perf_counter()
  cfg2, params2, tok2 = checkpoint.load_smollm2(smollm2_cache_dir)
  print(f"load_smollm2 from the cache: {time.perf_counter() - start:.1f}s")
  assert cfg2 == target.cfg
  _assert_identical(params2, transformer.stack_params(params, target.cfg))
  text = "<|im_start|>user\nDef 12 😀  x<|im_end|>"
  assert tok2.encode(text) == tok.encode(text) and len(tok.encode(text)) > 5
  assert tok2.eos_ids == (2, 0) and tok2.chat_template == tok.chat_template


def test_gguf_cache_is_built_restored_and_rebuilt_when_damaged(tmp_path, monkeypatch):
  """load_gguf_cached on a tiny GGUF: the first call converts and writes the
  entry, the second restores it without reading the GGUF, a damaged entry
  (marker removed) is converted again."""
  from test_gguf_import import write_gguf  # pylint: disable=g-import-not-at-top
  from specdec_jax.models import gguf_import  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, CFG, _params(CFG))
  conversions = []
  original = gguf_import.load_gguf
  monkeypatch.setattr(gguf_import, "load_gguf",
                      lambda *a, **k: conversions.append(a[0]) or original(*a, **k))
  cache = str(tmp_path / "cache")
  cfg, params, tok = checkpoint.load_gguf_cached(path, cache, "tiny")
  # (GGUF stores rms_eps as float32.)
  assert cfg == dataclasses.replace(CFG, rms_eps=cfg.rms_eps) and conversions == [path]
  _assert_identical(params, _params(CFG))
  entry = os.path.join(cache, "tiny")
  assert os.path.isfile(os.path.join(entry, checkpoint.MARKER))
  cfg2, params2, tok2 = checkpoint.load_gguf_cached(path, cache, "tiny")
  assert conversions == [path]            # restored, not converted
  _assert_identical(params2, params)
  assert tok2.encode("<t5><t7>") == tok.encode("<t5><t7>")
  os.remove(os.path.join(entry, checkpoint.MARKER))
  _, params3, _ = checkpoint.load_gguf_cached(path, cache, "tiny")
  assert conversions == [path, path]      # the damaged entry was rebuilt
  _assert_identical(params3, params)
  assert os.path.isfile(os.path.join(entry, checkpoint.MARKER))
