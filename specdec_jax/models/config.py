"""Static description of a Llama-family decoder."""

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a decoder; hashable so it can be a static jit argument.

  Llama, Mistral, SmolLM2 and Qwen2 (``qkv_bias=True``) all fit this shape.
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  dtype: str = "float32"
  # 0: the output head covers the whole vocabulary. N > 0: a restricted head
  # (a draft's) with N outputs for the token ids in params["lm_head"]
  # ["token_ids"]; ``Transformer.apply`` spreads them into full-vocabulary
  # logits that are -inf (probability 0) elsewhere. Needs an untied head.
  head_size: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads",
                 "num_kv_heads", "head_dim", "ffn_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not divisible by "
          f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
    if self.rope_theta <= 0 or self.rms_eps <= 0:
      raise ValueError("ModelConfig.rope_theta and rms_eps must be positive")
    if not isinstance(self.head_size, int) or not 0 <= self.head_size <= self.vocab_size:
      raise ValueError(f"ModelConfig.head_size={self.head_size!r} must be an int in "
                       f"[0, vocab_size={self.vocab_size}] (0: full vocabulary)")
    if self.head_size and self.tie_embeddings:
      raise ValueError("ModelConfig.head_size > 0 (a restricted head) needs "
                       "tie_embeddings=False")

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def num_params(self) -> int:
    d, h = self.d_model, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * d * self.ffn_dim
    head = 0 if self.tie_embeddings else d * (self.head_size or self.vocab_size)
    return self.vocab_size * d + self.num_layers * (attn + mlp + 2 * d) + d + head
