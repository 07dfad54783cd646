"""Hugging Face model folders (config.json + safetensors) -> (ModelConfig, params).

Supports LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (qkv bias).
Weights are read with ``safetensors`` in numpy mode (no torch at run time);
pickle checkpoints (pytorch_model.bin, *.pt) are refused, never opened.
HF q/k weights are already in the half-split RoPE layout: no permutation.
HF linear weights are [out, in]; our kernels are [in, out].
"""

import contextlib
import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from specdec_jax.models import placement
from specdec_jax.models import tokenizers as tokenizers_lib
from specdec_jax.models.config import ModelConfig

_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
          "Qwen2ForCausalLM": "qwen2"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _read_config_json(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{path!r} is missing: not a Hugging Face model folder")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON: {e}") from e


def config_from_hf(hf: dict, dtype: str = "float32", source: str = "config.json",
                   has_lm_head: bool | None = None) -> ModelConfig:
  """ModelConfig from a parsed config.json; ValueError for unsupported features."""
  archs = hf.get("architectures") or []
  arch = next((_ARCHS[a] for a in archs if a in _ARCHS), None)
  if arch is None:
    raise ValueError(f"{source}: architecture {archs or hf.get('model_type')!r} is not "
                     f"supported (expected one of {sorted(_ARCHS)})")
  try:
    d_model = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    fields = dict(
        num_layers=int(hf["num_hidden_layers"]), ffn_dim=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]))
  except KeyError as e:
    raise ValueError(f"{source}: required key {e.args[0]!r} is missing") from e
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
  if hf.get("mlp_bias") or (arch != "qwen2" and hf.get("attention_bias")):
    raise ValueError(f"{source}: attention_bias/mlp_bias (biases on o/mlp) are not supported")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise ValueError(f"{source}: RoPE scaling {rope_type!r} is not supported")
  window = hf.get("sliding_window")
  if window and (arch == "mistral" or hf.get("use_sliding_window")):
    logging.warning("%s: sliding_window=%s is ignored (full attention); outputs match "
                    "only for sequences up to the window", source, window)
  tie = hf.get("tie_word_embeddings")
  if tie is None:
    tie = not has_lm_head if has_lm_head is not None else True
  return ModelConfig(
      d_model=d_model, num_heads=num_heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
      head_dim=int(hf.get("head_dim") or d_model // num_heads),
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(tie), qkv_bias=arch == "qwen2", dtype=dtype, **fields)


def _weight_files(folder: str) -> dict:
  """Tensor name -> safetensors file path."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index!r} is not a valid safetensors index: {e}") from e
    files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not os.path.isfile(shard):
        raise ValueError(f"{shard!r} listed in {index!r} is missing")
    return files
  shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if not shards:
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
      raise ValueError(
          f"{folder!r} holds only pickle checkpoints {pickles}; they can run arbitrary "
          "code when loaded and are refused. Convert them to safetensors, e.g. "
          "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
          "safe_serialization=True), in a trusted environment")
    raise ValueError(f"{folder!r} has no *.safetensors weights")
  if len(shards) > 1:
    raise ValueError(f"{folder!r} has several safetensors files {shards} but no "
                     "model.safetensors.index.json")
  path = os.path.join(folder, shards[0])
  return {name: path for name in _safe_keys(path)}


def _safe_keys(path: str) -> list:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework="np") as f:
      return list(f.keys())
  except Exception as e:
    raise ValueError(f"{path!r} is truncated or not a safetensors file: {e}") from e


def _read_bf16(path: str, name: str) -> np.ndarray:
  """numpy cannot name bfloat16, so safetensors' numpy mode refuses it; read the
  raw bytes at the header's offsets instead."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_len))[name]
    start, end = entry["data_offsets"]
    f.seek(8 + header_len + start)
    raw = f.read(end - start)
  return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(entry["shape"])


class _Reader:
  """Opens each safetensors file once; returns float32 numpy arrays."""

  def __init__(self, files: dict, stack: contextlib.ExitStack):
    self.files, self._stack, self._handles = files, stack, {}

  def get(self, name: str, shape: tuple) -> np.ndarray:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    path = self.files.get(name)
    if path is None:
      raise ValueError(f"tensor {name!r} is missing from the safetensors files")
    try:
      if path not in self._handles:
        self._handles[path] = self._stack.enter_context(safe_open(path, framework="np"))
      handle = self._handles[path]
      if handle.get_slice(name).get_dtype() == "BF16":
        arr = _read_bf16(path, name)
      else:
        arr = handle.get_tensor(name)
    except Exception as e:
      raise ValueError(f"{path!r}: cannot read tensor {name!r} (truncated or corrupt "
                       f"file?): {type(e).__name__}: {e}") from e
    if tuple(arr.shape) != shape:
      raise ValueError(f"{path!r}: tensor {name!r} has shape {tuple(arr.shape)}, "
                       f"config.json implies {shape}")
    return np.asarray(arr, dtype=np.float32)


def load_hf_dir(path: str, dtype: str = "float32", sharding_fn=None):
  """Loads a Hugging Face causal-LM folder.

  Args:
    path: folder with config.json, *.safetensors (single or sharded with
      model.safetensors.index.json) and optionally tokenizer.json /
      tokenizer.model.
    dtype: params dtype ("float32", "bfloat16", "float16").
    sharding_fn: optional ``ModelConfig -> params sharding pytree``; params
      then go from host memory straight into their shards (placement.py).

  Returns:
    (ModelConfig, params in the layout of transformer.py, Tokenizer or None).

  Raises:
    ValueError naming the file and the problem.
  """
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise ValueError(f"model folder {folder!r} does not exist")
  hf = _read_config_json(folder)
  files = _weight_files(folder)
  cfg = config_from_hf(hf, dtype, os.path.join(folder, "config.json"),
                       has_lm_head="lm_head.weight" in files)
  d, f, hd, n, g = (cfg.d_model, cfg.ffn_dim, cfg.head_dim, cfg.num_heads,
                    cfg.num_kv_heads)
  to_jnp = lambda x: jnp.asarray(x, dtype=cfg.jnp_dtype)
  shardings = sharding_fn(cfg) if sharding_fn is not None else None
  if shardings is not None:
    to_jnp = lambda x: x  # numpy until placed shard by shard below

  per_layer = {  # our path -> (HF suffix, HF [out, in] shape)
      ("attn_norm", "scale"): ("input_layernorm.weight", (d,)),
      ("attn", "q", "kernel"): ("self_attn.q_proj.weight", (n * hd, d)),
      ("attn", "k", "kernel"): ("self_attn.k_proj.weight", (g * hd, d)),
      ("attn", "v", "kernel"): ("self_attn.v_proj.weight", (g * hd, d)),
      ("attn", "o", "kernel"): ("self_attn.o_proj.weight", (d, n * hd)),
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight", (d,)),
      ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", (f, d)),
      ("mlp", "up", "kernel"): ("mlp.up_proj.weight", (f, d)),
      ("mlp", "down", "kernel"): ("mlp.down_proj.weight", (d, f)),
  }
  if cfg.qkv_bias:
    for name, width in (("q", n * hd), ("k", g * hd), ("v", g * hd)):
      per_layer[("attn", name, "bias")] = (f"self_attn.{name}_proj.bias", (width,))

  used = set()
  with contextlib.ExitStack() as stack:
    reader = _Reader(files, stack)

    def get(name, shape):
      used.add(name)
      return reader.get(name, shape)

    layers = {}
    for key, (suffix, shape) in per_layer.items():
      arrs = [get(f"model.layers.{i}.{suffix}", shape) for i in range(cfg.num_layers)]
      stacked = np.stack([a if a.ndim == 1 else a.T for a in arrs])
      node = layers
      for part in key[:-1]:
        node = node.setdefault(part, {})
      node[key[-1]] = to_jnp(stacked)
    params = {
        "embed": {"embedding": to_jnp(get("model.embed_tokens.weight", (cfg.vocab_size, d)))},
        "layers": layers,
        "final_norm": {"scale": to_jnp(get("model.norm.weight", (d,)))},
    }
    if not cfg.tie_embeddings:
      params["lm_head"] = {"kernel": to_jnp(get("lm_head.weight", (cfg.vocab_size, d)).T)}
  unused = sorted(k for k in set(files) - used
                  if not k.endswith("rotary_emb.inv_freq") and k != "lm_head.weight")
  if unused:
    raise ValueError(f"{folder!r}: tensors not used by this model (unsupported "
                     f"features or more layers than config.json says): {unused[:8]}")
  if shardings is not None:
    params = placement.tree_to_device(params, cfg.jnp_dtype, shardings)
  return cfg, params, tokenizers_lib.load_tokenizer_from_hf_dir(folder)
