"""Config defaults shared by every experiment file in configs/ (``base_config``)."""

import ml_collections


def random_model(*, vocab_size, num_layers, d_model, num_heads, num_kv_heads,
                 ffn_dim, head_dim=16, init_seed=0, tie_embeddings=True,
                 qkv_bias=False, rope_theta=10000.0, init_scale=0.2,
                 logit_scale=4.0) -> ml_collections.ConfigDict:
  """A randomly initialised decoder (source='random')."""
  return ml_collections.ConfigDict(dict(
      source="random", path="", vocab_size=vocab_size, num_layers=num_layers,
      d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, ffn_dim=ffn_dim, tie_embeddings=tie_embeddings,
      qkv_bias=qkv_bias, rope_theta=rope_theta, init_seed=init_seed,
      init_scale=init_scale, logit_scale=logit_scale, dtype="float32"))


def base_config() -> ml_collections.ConfigDict:
  """Every field a job reads, with defaults; experiment files override."""
  c = ml_collections.ConfigDict()
  c.job = "generate"            # generate | benchmark | fidelity | sweep | trace | diagnose | distill
  c.seed = 0                    # base request seed (row i uses seed + i)
  c.model = random_model(vocab_size=259, num_layers=2, d_model=64, num_heads=4,
                         num_kv_heads=2, ffn_dim=128)
  c.draft = random_model(vocab_size=259, num_layers=1, d_model=32, num_heads=2,
                         num_kv_heads=1, ffn_dim=64, init_seed=1)
  c.draft_checkpoint = ""       # a distill workdir: its latest checkpoint is the draft
  c.tokenizer = "byte"          # byte | model (the tokenizer shipped with the weights)
  c.chat = False                # wrap prompts with the tokenizer's chat template
  c.cache_dir = ""              # converted-weights cache (default ~/.cache/specdec_jax)

  c.drafter = "ngram"           # none | model | ngram
  c.k = 4                       # draft length
  c.k_max = 0                   # static draft slots; 0 means k
  c.rule = "rejection"          # rejection | coupled | typical (temperature > 0)
  c.typical_epsilon = 0.09
  c.typical_alpha = 0.3
  c.policy = "fixed"            # fixed | threshold | adaptive | budget
  c.tau = 0.5                   # threshold policy: stop below this draft confidence
  c.budget = 8                  # budget policy: draft tokens per step for the batch
  c.ngram_max_n = 3
  c.ngram_min_n = 1

  c.temperature = 0.0           # 0 = greedy
  c.top_k = 0
  c.top_p = 1.0
  c.max_new_tokens = 32
  c.max_prompt_len = 256
  c.batch_size = 1

  c.prompts = "builtin"         # builtin | all | a category | comma list of categories
  c.prompts_file = ""           # JSONL of {"prompt": ..., "category": ...}
  c.prompt_texts = ("Hello, world!",)
  c.max_prompts = 0             # 0 = all selected prompts

  c.benchmark = ml_collections.ConfigDict(dict(repeats=3, warmup=1, timing_iters=10))
  c.fidelity = ml_collections.ConfigDict(dict(
      num_samples=20000, num_tokens=3, vocab_size=6, batch_size=2000, alpha=0.01,
      logit_scale=1.5))
  c.sweep = ml_collections.ConfigDict()
  return c


def config_from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of another config file (for configs that extend one)."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
