"""Config defaults shared by every experiment file in configs/ (``base_config``)."""

import ml_collections


def random_model(*, vocab_size, num_layers, d_model, num_heads, num_kv_heads,
                 ffn_dim, head_dim=16, init_seed=0, tie_embeddings=True,
                 qkv_bias=False, rope_theta=10000.0, init_scale=0.2,
                 logit_scale=4.0) -> ml_collections.ConfigDict:
  """A randomly initialised decoder (source='random').

  ``layer_loop`` (for every source): "auto" | "scan" | "unrolled", how the
  blocks run (models/transformer.py); "auto" unrolls them unless the run is
  sharded over a mesh. ``min_window`` (every source): attention reads the
  smallest of min_window, 2 * min_window, ... cache slots that holds the
  text (``transformer.attention_windows``); 0 reads the whole cache.
  ``matmul`` (every source): "auto" | "xla" | "kernel", how the weight
  products run (``runtime.matmul``): "auto" takes the CPU kernel of
  kernels/cpu_matmul.py for an unrolled float32 model on the CPU.
  """
  return ml_collections.ConfigDict(dict(
      source="random", path="", vocab_size=vocab_size, num_layers=num_layers,
      d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, ffn_dim=ffn_dim, tie_embeddings=tie_embeddings,
      qkv_bias=qkv_bias, rope_theta=rope_theta, init_seed=init_seed,
      init_scale=init_scale, logit_scale=logit_scale, dtype="float32", layer_loop="auto",
      min_window=256, matmul="auto"))


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

  # Speculative decoding: what drafts, how many, how drafts are accepted.
  c.decode = ml_collections.ConfigDict(dict(
      drafter="ngram",          # none | model | feature | ngram | ngram+model | ngram+feature
      k=4,                      # draft length
      k_max=0,                  # static draft slots; 0 means k
      rule="rejection",         # rejection | coupled | typical (temperature > 0) | synthetic
      synthetic_acceptance=0.7,  # rule=synthetic (NOT exact, systems benchmarks): P(accept)
      # Numerics-matched mode: every target call, the plain baseline's too, runs
      # at the verify width k_max + 1, so speculative greedy equals plain greedy
      # bit for bit in bf16 (default: plain steps are 1 token wide; see
      # decode.matched_verify_widths).
      matched_numerics=False,
      typical_epsilon=0.09,
      typical_alpha=0.3,
      policy="auto",            # auto (never at a loss) | fixed | threshold | adaptive | budget
      tau=0.5,                  # threshold policy: stop below this draft confidence
      budget=8,                 # budget policy: draft tokens per step for the batch
      ngram_max_n=3,
      ngram_min_n=1,
      lookup_min_match=2,       # ngram+...: lookup drafts where >= this many tokens match
      # Draft trees (specdec_jax/tree.py): N nodes per row, depth <= k,
      # tree_topk branches; 0 drafts chains. Every drafter builds trees,
      # verified greedily, by rejection or coupled, with policy=fixed or auto.
      tree_nodes=0,
      tree_topk=2,
      # "topk": each node's top-k children (one-hot q); "sampled": drawn
      # from the draft's q without replacement and verified with it
      # (drafter=model or feature, rule=rejection, temperature > 0).
      tree_candidates="topk",
  ))
  # The target's sampling, for plain and speculative decoding alike.
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=0.0,          # 0 = greedy
      top_k=0,
      top_p=1.0,
  ))

  c.max_new_tokens = 32
  c.max_prompt_len = 256
  c.batch_size = 1

  # Sharding (specdec_jax/sharding.py): a ("data", "model") mesh over all devices.
  c.mesh = ""                   # "data=2,model=4"; -1 fills; "" = all on data (none on 1 device)
  c.sharding_rules = "batch=data,heads=model,kv_heads=model,mlp=model,vocab=model,embed=none"
  c.draft_sharding = "replicated"  # replicated | rules (the draft model's params)
  c.distributed = False         # multi-host: jax.distributed.initialize() first

  c.prompts = "builtin"         # builtin | all | a category | comma list of categories
  c.prompts_file = ""           # JSONL of {"prompt": ..., "category": ...}
  c.prompt_texts = ("Hello, world!",)
  c.max_prompts = 0             # 0 = all selected prompts

  c.benchmark = ml_collections.ConfigDict(dict(repeats=3, warmup=1, timing_iters=10,
                                                timing_rounds=5))
  c.fidelity = ml_collections.ConfigDict(dict(
      num_samples=20000, num_tokens=3, vocab_size=6, batch_size=2000, alpha=0.01,
      logit_scale=1.5, draft_noise=0.1,
      prompt=(0, 1, 2)))        # token ids < vocab_size; repeat n-grams for lookup drafts
  c.sweep = ml_collections.ConfigDict()
  c.distill = distill_defaults()
  return c


def distill_defaults() -> ml_collections.ConfigDict:
  """job=distill settings (see specdec_jax/jobs/distill.py); the draft's shape
  is ``config.draft``."""
  return ml_collections.ConfigDict(dict(
      train_steps=200,          # optimisation steps
      # data: on-policy samples of the target, cached in WORKDIR/data
      prompts="all",            # suite selection for the data | builtin | "" (none)
      samples_per_prompt=2,     # samples (seeds) per suite prompt
      num_templated=32,         # templated instructions added (distill/instructions.py)
      num_self_instruct=0,      # instructions the target writes itself (Magpie-style)
      self_instruct_max_tokens=48,
      text_file="",             # optional plain text, trained on every position
      gen_temperature=0.8,
      gen_top_k=0,
      gen_top_p=1.0,
      gen_max_new_tokens=64,
      gen_batch_size=8,
      teacher_top_k=32,         # target distribution stored as its top-k
      teacher_batch_size=4,
      seed=0,                   # sampling seeds, draft init and batch order
      # draft
      draft_kind="model",       # model (a small Transformer) | feature (EAGLE-style:
                                # reads the target's hidden states; d_model = target's)
      head_size=0,              # > 0: restricted head over the N most frequent tokens
      init_from_target=False,   # start from the target's embeddings (projected), head
                                # rows and, for same-shape blocks, layers
      init_layers="",           # target layers copied into a same-width draft ("" = first L)
      train_embedding=False,    # an untied draft keeps the target's embeddings frozen
      # optimisation
      loss="kl+tv",             # kl | tv | kl+tv
      feature_loss_weight=1.0,  # feature draft: weight of smooth-L1(g, target feature)
      unroll=1,                 # feature draft: passes, each reading the last one's g
      feature_train_head=False, # feature draft: train its head rows (else the target's, frozen)
      batch_size=8,
      seq_len=128,              # training window: the last seq_len tokens of a sample
      prompt_loss_weight=0.0,   # weight of prompt positions (completions weigh 1)
      learning_rate=1e-3,
      warmup_steps=20,
      min_lr_ratio=0.1,
      weight_decay=0.01,
      clip_norm=1.0,
      checkpoint_every=50,
      keep_checkpoints=3,
      log_every=10,
      # held-out evaluation (greedy acceptance)
      eval_prompts="held_out",
      eval_max_prompts=0,       # 0 = all
      eval_k=4,
      eval_max_new_tokens=32,
      eval_batch_size=8,
      eval_every=0,             # 0 = only at the start and the end
      eval_at_start=True,
      eval_with_lookup=True,    # also measure the draft behind n-gram lookup (ngram+...)
  ))


# Fields that moved into a group (old flat name -> dotted name). The command
# line still takes the flat flags, with a one-line note (``upgrade_flags``);
# a config that sets a flat field is refused by name (``check_no_moved_fields``).
MOVED_FIELDS = {
    **{name: f"decode.{name}" for name in (
        "drafter", "k", "k_max", "rule", "synthetic_acceptance", "matched_numerics",
        "typical_epsilon", "typical_alpha", "policy", "tau", "budget", "ngram_max_n",
        "ngram_min_n", "lookup_min_match", "tree_nodes", "tree_topk")},
    **{name: f"sampling.{name}" for name in ("temperature", "top_k", "top_p")},
    "train_steps": "distill.train_steps",
}


def upgrade_flags(argv: list[str], warn) -> list[str]:
  """``--config.k=4`` -> ``--config.decode.k=4`` (and every MOVED_FIELDS
  name, also under ``--config.sweep.`` and as a negated boolean
  ``--noconfig.``), calling ``warn(line)`` once per flag rewritten."""
  upgraded = []
  for arg in argv:
    for prefix in ("--config.sweep.", "--config.", "--noconfig."):
      name, sep, value = arg[len(prefix):].partition("=")
      if arg.startswith(prefix) and name in MOVED_FIELDS:
        new = prefix + MOVED_FIELDS[name]
        warn(f"note: {prefix}{name} is now {new} (the flat name is deprecated)")
        arg = new + sep + value
        break
    upgraded.append(arg)
  return upgraded


def check_no_moved_fields(config: ml_collections.ConfigDict, where: str = "config") -> None:
  """Raises ValueError naming the first field set under its old flat name."""
  for name, path in MOVED_FIELDS.items():
    if name in config:
      raise ValueError(f"{where}.{name} is now {where}.{path}: set that field instead")


def config_from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config()`` of another config file (for configs that extend one)."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      "_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
