"""A random target with SmolLM2-135M's shape (30 layers, d=576, 9/3 heads,
vocab 49152) and a random 2-layer draft of the same width: for measuring
speed and compile time without real weights (acceptance is meaningless).

  python -m specdec_jax.main --config=configs/random_smollm2_shape.py --workdir=/tmp/r30 \
      --config.job=benchmark --config.drafter=model
"""

import ml_collections

from specdec_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.base_config()
  shape = dict(vocab_size=49152, d_model=576, num_heads=9, num_kv_heads=3, head_dim=64,
               ffn_dim=1536, rope_theta=100000.0, init_scale=0.05)
  config.model = config_defaults.random_model(num_layers=30, init_seed=0, **shape)
  config.draft = config_defaults.random_model(num_layers=2, init_seed=1, **shape)
  config.tokenizer = "byte"
  config.drafter = "model"
  config.k = 4
  config.max_prompt_len = 128
  config.max_new_tokens = 64
  config.prompt_texts = (
      "The quick brown fox jumps over the lazy dog.",
      "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
  )
  config.benchmark.repeats = 3
  return config
