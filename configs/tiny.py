"""Tiny random target and draft with a byte tokenizer: runs in seconds on CPU.

  python -m specdec_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m specdec_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.job=benchmark --config.decode.drafter=model --config.decode.k=4
  python -m specdec_jax.main --config=configs/tiny.py:sweep --workdir=/tmp/tiny_sweep
"""

import ml_collections

from specdec_jax import config_defaults as common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """``configs/tiny.py:sweep`` adds a small K x drafter grid for job=sweep."""
  config = common.base_config()
  config.model = common.random_model(vocab_size=259, num_layers=2, d_model=64,
                                     num_heads=4, num_kv_heads=2, ffn_dim=128,
                                     init_seed=0)
  config.draft = common.random_model(vocab_size=259, num_layers=1, d_model=32,
                                     num_heads=2, num_kv_heads=1, ffn_dim=64,
                                     init_seed=1)
  config.tokenizer = "byte"
  config.decode.drafter = "ngram"
  config.max_prompt_len = 128
  config.max_new_tokens = 32
  config.prompts = "builtin"
  config.prompt_texts = (
      "Hello, world!",
      "The quick brown fox jumps over the lazy dog. The quick brown fox",
      "def add(a, b):\n    return a + b\n\ndef add(",
      "Speculative decoding drafts K tokens and verifies them in one call.",
  )
  if variant == "sweep":
    config.job = "sweep"
    config.sweep.decode = ml_collections.ConfigDict(dict(k=(1, 2, 4), drafter=("ngram", "model")))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/tiny.py; expected 'sweep'")
  return config
