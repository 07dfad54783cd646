"""Random-weight targets and drafts of real model shapes, for systems
measurements without the weights (an accelerator host often has neither a
network nor a copy of them): verify cost per width, draft cost, batch
scaling, compile counts. Random weights make acceptance meaningless, so the
variants use ``rule="synthetic"`` (each draft accepted with probability
``synthetic_acceptance``; NOT exact, and reported as such).

  python -m specdec_jax.main --config=configs/shapes.py --workdir=/tmp/shapes \\
      --config.job=benchmark                                    # SmolLM2-135M, float32
  python -m specdec_jax.main --config=configs/shapes.py:llama3_8b_1b --workdir=/tmp/8b \\
      --config.job=benchmark --config.decode.synthetic_acceptance=0.8  # bf16, accelerator

Variants (parameter counts are tested against the published models'):
  smollm2        SmolLM2-135M target (30 layers, d=576, 9/3 heads, vocab
                 49152, tied), a 2-layer draft of the same width; float32.
  llama3_1b      Llama-3.2-1B target (16 layers, d=2048, 32/8 heads, vocab
                 128256, tied), a 2-layer d=512 draft; bfloat16.
  llama3_8b_1b   Llama-3.1-8B target (32 layers, d=4096, 32/8 heads, head 128,
                 ffn 14336, untied) drafted by the Llama-3.2-1B shape; bfloat16.
Llama 3's RoPE frequency scaling is not modelled (it changes no shape or cost).
"""

import ml_collections

from specdec_jax import config_defaults

SMOLLM2_135M = dict(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                    head_dim=64, ffn_dim=1536, rope_theta=100000.0, tie_embeddings=True)
LLAMA3_1B = dict(vocab_size=128256, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8,
                 head_dim=64, ffn_dim=8192, rope_theta=500000.0, tie_embeddings=True)
LLAMA3_8B = dict(vocab_size=128256, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                 head_dim=128, ffn_dim=14336, rope_theta=500000.0, tie_embeddings=False)
SMALL_DRAFT = dict(num_layers=2, d_model=512, num_heads=8, num_kv_heads=2, head_dim=64,
                   ffn_dim=1536, rope_theta=500000.0, tie_embeddings=True)
VARIANTS = {
    # name: (target shape, draft shape, dtype)
    "smollm2": (SMOLLM2_135M, dict(SMOLLM2_135M, num_layers=2), "float32"),
    "llama3_1b": (LLAMA3_1B, dict(SMALL_DRAFT, vocab_size=128256), "bfloat16"),
    "llama3_8b_1b": (LLAMA3_8B, LLAMA3_1B, "bfloat16"),
}


def shaped_model(shape: dict, dtype: str, init_seed: int) -> ml_collections.ConfigDict:
  model = config_defaults.random_model(init_seed=init_seed, init_scale=0.05, **shape)
  model.dtype = dtype
  return model


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  variant = variant or "smollm2"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/shapes.py; "
                     f"expected one of {sorted(VARIANTS)}")
  target, draft, dtype = VARIANTS[variant]
  config = config_defaults.base_config()
  config.model = shaped_model(target, dtype, init_seed=0)
  config.draft = shaped_model(draft, dtype, init_seed=1)
  config.tokenizer = "byte"
  config.decode.drafter = "model"
  config.decode.rule = "synthetic"
  config.decode.synthetic_acceptance = 0.7
  config.decode.policy = "fixed"   # the auto policy would stop drafting a poor draft
  config.decode.k = 4
  config.max_prompt_len = 128
  config.max_new_tokens = 64
  config.prompt_texts = (
      "The quick brown fox jumps over the lazy dog.",
      "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
  )
  config.benchmark.repeats = 3
  return config
