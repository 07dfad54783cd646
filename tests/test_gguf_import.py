"""GGUF import: tiny files written with gguf.GGUFWriter, and damaged files."""

import dataclasses
import os

import gguf
import jax
import numpy as np
import pytest

from specdec_jax.models import checkpoint
from specdec_jax.models import gguf_import
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, ffn_dim=48, rope_theta=5e4, rms_eps=1e-6,
                  tie_embeddings=False)


def llama_cpp_permute(w_OI, n_heads):
  """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (written out
  independently of the importer so that a wrong inverse fails the test)."""
  out_dim, in_dim = w_OI.shape
  head_dim = out_dim // n_heads
  out = np.empty_like(w_OI)
  for h in range(n_heads):
    block = w_OI[h * head_dim:(h + 1) * head_dim]
    first, second = block[:head_dim // 2], block[head_dim // 2:]
    out[h * head_dim:(h + 1) * head_dim:2] = first   # interleave the two halves
    out[h * head_dim + 1:(h + 1) * head_dim:2] = second
  return out


def write_gguf(path, cfg, params, arch="llama", skip=(), qtype=None, ffn_meta=None):
  """Writes params (our layout) as a llama.cpp-style GGUF file."""
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(128)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(ffn_meta or cfg.ffn_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
  w.add_token_types([3] * 3 + [1] * (cfg.vocab_size - 3))
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)

  tensors = {}
  np32 = lambda x: np.asarray(x, np.float32)
  layers = params["layers"]
  names = {"attn_q": ("attn", "q"), "attn_k": ("attn", "k"), "attn_v": ("attn", "v"),
           "attn_output": ("attn", "o"), "ffn_gate": ("mlp", "gate"),
           "ffn_up": ("mlp", "up"), "ffn_down": ("mlp", "down")}
  for i in range(cfg.num_layers):
    tensors[f"blk.{i}.attn_norm.weight"] = np32(layers["attn_norm"]["scale"][i])
    tensors[f"blk.{i}.ffn_norm.weight"] = np32(layers["mlp_norm"]["scale"][i])
    for name, (group, sub) in names.items():
      w_OI = np32(layers[group][sub]["kernel"][i]).T
      if name == "attn_q":
        w_OI = llama_cpp_permute(w_OI, cfg.num_heads)
      elif name == "attn_k":
        w_OI = llama_cpp_permute(w_OI, cfg.num_kv_heads)
      tensors[f"blk.{i}.{name}.weight"] = w_OI
  tensors["token_embd.weight"] = np32(params["embed"]["embedding"])
  tensors["output_norm.weight"] = np32(params["final_norm"]["scale"])
  if "lm_head" in params:
    tensors["output.weight"] = np32(params["lm_head"]["kernel"]).T
  for name, arr in tensors.items():
    if name in skip:
      continue
    if qtype is not None and arr.ndim == 2 and arr.shape[1] % 32 == 0:  # block size
      w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, np.ascontiguousarray(arr))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="session")
def tiny_params():
  return jax.jit(Transformer(CFG).init_params)(jax.random.PRNGKey(3))


def _assert_trees_close(a, b, atol=0.0):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_roundtrip(tmp_path, tiny_params, tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  params = dict(tiny_params)
  if tie:
    params.pop("lm_head")
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, cfg, params)
  calls = []
  got_cfg, got, info = gguf_import.load_gguf(path, progress=lambda *a: calls.append(a))
  assert calls == [(i + 1, cfg.num_layers) for i in range(cfg.num_layers)]
  # GGUF stores eps as float32 (transformers reads the same rounded value).
  assert got_cfg == dataclasses.replace(cfg, rms_eps=float(np.float32(cfg.rms_eps)))
  _assert_trees_close(got, params)
  assert info.bos_id == 1 and info.eos_id == 2 and len(info.tokens) == cfg.vocab_size
  # Same model, same logits (catches a q/k layout error even if params were
  # compared in a way that hid it).
  tokens = np.arange(10, dtype=np.int32)[None] % cfg.vocab_size
  pos = np.arange(10, dtype=np.int32)[None]
  model = Transformer(cfg)
  ref, _ = model.apply(params, tokens, pos, model.init_cache(1, 12))
  out, _ = model.apply(got, tokens, pos, model.init_cache(1, 12))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_conversion_progress_lines_with_eta():
  lines = []
  progress = checkpoint.ConversionProgress("tiny", lines.append)
  for done in range(1, 31):
    progress(done, 30)
  assert len(lines) == 4, lines        # about every quarter, and the last layer
  assert lines[-1].startswith("tiny: converting the GGUF (first run only): layer 30/30")
  assert all("ETA" in line for line in lines)


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.random.RandomState(0).randn(4 * 8, 5).astype(np.float32)
  np.testing.assert_array_equal(gguf_import.unpermute_qk(llama_cpp_permute(w, 4), 4), w)
  np.testing.assert_array_equal(gguf_import.permute_qk(w, 4), llama_cpp_permute(w, 4))


def test_q8_0_tensors_dequantized(tmp_path, tiny_params):
  path = str(tmp_path / "q8.gguf")
  write_gguf(path, CFG, tiny_params, qtype=gguf.GGMLQuantizationType.Q8_0)
  _, got, info = gguf_import.load_gguf(path)
  assert info.tensor_types["blk.0.ffn_up.weight"] == "Q8_0"
  emb = np.asarray(tiny_params["embed"]["embedding"], np.float32)
  expected = gguf.quants.dequantize(
      gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
      gguf.GGMLQuantizationType.Q8_0)
  np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]), expected)
  _assert_trees_close(got, tiny_params, atol=0.02)  # Q8_0 error is small


def test_bfloat16_dtype(tmp_path, tiny_params):
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, CFG, tiny_params)
  cfg, got, _ = gguf_import.load_gguf(path, dtype="bfloat16")
  assert cfg.dtype == "bfloat16"
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(got))


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    gguf_import.load_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("keep_bytes", [7, 1000, -100])
def test_truncated_file(tmp_path, tiny_params, keep_bytes):
  path = str(tmp_path / "tiny.gguf")
  write_gguf(path, CFG, tiny_params)
  data = open(path, "rb").read()
  cut = str(tmp_path / "cut.gguf")
  with open(cut, "wb") as f:
    f.write(data[:keep_bytes])
  with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|corrupt)"):
    gguf_import.load_gguf(cut)


@pytest.mark.slow
def test_truncated_real_file(tmp_path):
  src = gguf_import.smollm2_gguf_path()
  cut = str(tmp_path / "cut.gguf")
  with open(src, "rb") as f_in, open(cut, "wb") as f_out:
    f_out.write(f_in.read(os.path.getsize(src) // 2))
  with pytest.raises(ValueError, match="truncated"):
    gguf_import.load_gguf(cut)


def test_non_llama_architecture(tmp_path, tiny_params):
  path = str(tmp_path / "gpt2.gguf")
  write_gguf(path, CFG, tiny_params, arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture 'gpt2'"):
    gguf_import.load_gguf(path)


def test_missing_tensor(tmp_path, tiny_params):
  path = str(tmp_path / "m.gguf")
  write_gguf(path, CFG, tiny_params, skip=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match=r"m\.gguf.*'blk\.1\.ffn_up\.weight' is missing"):
    gguf_import.load_gguf(path)


def test_shape_disagrees_with_metadata(tmp_path, tiny_params):
  path = str(tmp_path / "s.gguf")
  write_gguf(path, CFG, tiny_params, ffn_meta=CFG.ffn_dim + 16)
  with pytest.raises(ValueError, match=r"s\.gguf.*has shape .* metadata implies"):
    gguf_import.load_gguf(path)


def test_smollm2_path_found():
  path = gguf_import.smollm2_gguf_path()
  assert path.endswith(gguf_import.SMOLLM2_FILE) and os.path.isfile(path)


@pytest.mark.slow
def test_smollm2_config(smollm2):
  target, params, tokenizer = smollm2
  cfg = target.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert (cfg.vocab_size, cfg.ffn_dim, cfg.head_dim) == (49152, 1536, 64)
  assert cfg.tie_embeddings and "lm_head" not in params
  assert cfg.rope_theta == 1e5 and abs(cfg.rms_eps - 1e-5) < 1e-9
  assert tokenizer.bos_id == 1 and tokenizer.eos_ids[0] == 2
  assert tokenizer.decode([2]) == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
