"""Decoder models, KV cache, weight import and tokenizers."""

from specdec_jax.models.config import ModelConfig
from specdec_jax.models.kv_cache import KVCache, init_cache
from specdec_jax.models.transformer import Transformer

__all__ = ["ModelConfig", "KVCache", "init_cache", "Transformer"]
