"""Builds models, drafter, tokenizer and generators from an experiment config.

All config checks happen here, before any weights load or anything compiles,
and raise ValueError naming the offending field.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from specdec_jax import config_defaults
from specdec_jax import decode
from specdec_jax import phase_timing
from specdec_jax import policies
from specdec_jax import sampling
from specdec_jax import tree
from specdec_jax import verify
from specdec_jax import drafters as drafters_lib
from specdec_jax.drafters import NgramDrafter
from specdec_jax.drafters.hybrid import check_min_match
from specdec_jax.generation import Generator, validate_synthetic_acceptance
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft, check_compatible
from specdec_jax.models.tokenizers import ByteTokenizer, Tokenizer
from specdec_jax.kernels import build as kernel_build
from specdec_jax.models.transformer import DEFAULT_MIN_WINDOW, LAYER_LOOPS, MATMULS, Transformer

JOBS = ("generate", "benchmark", "fidelity", "sweep", "trace", "diagnose", "distill")
MODEL_SOURCES = ("random", "gguf", "hf", "orbax", "smollm2")


def effective_k_max(config) -> int:
  d = config.decode
  if not drafters_lib.kind(d.drafter).speculative:
    return 0
  return int(d.k_max) if d.k_max else int(d.k)


def validate_lookup(config: ml_collections.ConfigDict, hybrid: bool) -> None:
  """The n-gram lookup's fields (and ``lookup_min_match`` for ngram+...),
  checked by the drafters' own checks."""
  d = config.decode
  try:
    lookup = NgramDrafter(max_n=d.ngram_max_n, min_n=d.ngram_min_n)
    if hybrid:
      check_min_match(lookup, d.lookup_min_match)
  except ValueError as e:
    raise ValueError(f"config.decode.{e}") from None


def check_job(job: str) -> None:
  if job not in JOBS:
    raise ValueError(f"config.job={job!r}; expected one of {JOBS}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field a job reads; raises ValueError naming the field.
  ``build`` runs it (the config boundary): jobs need not."""
  check_job(config.job)
  config_defaults.check_no_moved_fields(config)
  d = config.decode
  try:   # these checks' messages start with the field's name
    drafter = drafters_lib.kind(d.drafter)
    verify.check_rule(d.rule)
    if d.rule == "synthetic":
      validate_synthetic_acceptance(d.synthetic_acceptance)
  except ValueError as e:
    raise ValueError(f"config.decode.{e}") from None
  try:
    policies.validate(d.policy, d.tau, d.budget)
  except ValueError as e:
    raise ValueError(f"config.decode: {e}") from None
  if not isinstance(d.matched_numerics, bool):
    raise ValueError(f"config.decode.matched_numerics={d.matched_numerics!r} must be True or False")
  if int(config.seed) != config.seed or not 0 <= config.seed < 2**32:
    raise ValueError(f"config.seed={config.seed} must be an int in [0, 2**32)")
  if int(d.k) != d.k or d.k < 1:
    raise ValueError(f"config.decode.k={d.k} must be an int >= 1")
  if d.k_max and d.k > d.k_max:
    raise ValueError(f"config.decode.k={d.k} is above config.decode.k_max={d.k_max}")
  for name in ("max_new_tokens", "max_prompt_len", "batch_size"):
    value = config[name]
    if int(value) != value or value < 1:
      raise ValueError(f"config.{name}={value} must be an int >= 1")
  try:
    sampling.validate(config.sampling.temperature, config.sampling.top_k, config.sampling.top_p)
  except ValueError as e:
    raise ValueError(f"config.sampling: {e}") from None
  if drafter.lookup:
    validate_lookup(config, hybrid=drafter.draft_model is not None)
  if d.tree_nodes:
    if d.matched_numerics:
      raise ValueError("config.decode.tree_nodes > 0 and matched_numerics=True do not combine")
    try:
      tree.check_setup(d.tree_nodes, d.tree_topk, effective_k_max(config),
                       drafter if drafter.speculative else None, d.rule, d.policy,
                       candidates=d.tree_candidates)
    except ValueError as e:
      raise ValueError(f"config.decode.{e}") from None
  for name in ("model", "draft"):
    source = config[name].source
    if source not in MODEL_SOURCES:
      raise ValueError(f"config.{name}.source={source!r}; expected one of {MODEL_SOURCES}")
    try:
      check_matmul(config[name])
    except ValueError as e:
      raise ValueError(f"config.{name}.{e}") from None


def cache_dir(config) -> str:
  path = config.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "specdec_jax")
  return os.path.abspath(path)


def layer_loop(model_config, sharded: bool) -> str:
  """The layer loop of a ``config.model``-style entry: "auto" unrolls the
  blocks (per-layer params, fused projections: no per-layer weight copy)
  unless the params are sharded over a mesh, where the stacked scan layout
  and its sharding rules apply."""
  loop = model_config.get("layer_loop", "auto")
  if loop not in ("auto",) + LAYER_LOOPS:
    raise ValueError(f"layer_loop={loop!r}; expected 'auto' or one of {LAYER_LOOPS}")
  if loop == "auto":
    return "scan" if sharded else "unrolled"
  if loop == "unrolled" and sharded:
    raise ValueError("layer_loop='unrolled' cannot be sharded over a mesh; use 'scan' or 'auto'")
  return loop


def check_matmul(model_config) -> str:
  """The entry's ``matmul`` setting, refused unless "auto", "xla" or "kernel"."""
  choice = model_config.get("matmul", "auto")
  if choice not in ("auto",) + MATMULS:
    raise ValueError(f"matmul={choice!r}; expected 'auto' or one of {MATMULS}")
  return choice


def matmul(model_config, loop: str, dtype: str) -> str:
  """How a model loaded from a ``config.model``-style entry runs its weight
  products: "auto" takes the CPU kernel (``kernels/cpu_matmul.py``) for an
  unrolled float32 model (``dtype``: the loaded model's) on the CPU when it
  builds, XLA's dot otherwise; "kernel" insists."""
  choice = check_matmul(model_config)
  if choice == "xla":
    return "xla"
  fits = loop == "unrolled" and jax.default_backend() == "cpu" and dtype == "float32"
  if choice == "kernel":
    if not fits:
      raise ValueError("matmul='kernel' needs layer_loop 'unrolled' (or 'auto', unsharded), "
                       f"a float32 model (this one is {dtype}) and the CPU backend")
    if not kernel_build.available():
      raise ValueError(f"matmul='kernel': {kernel_build.why_unavailable()}")
    return "kernel"
  return "kernel" if fits and kernel_build.available() else "xla"


def default_decoder(cfg: ModelConfig, **fields) -> Transformer:
  """The Transformer a single-device run decodes ``cfg`` with by default
  (``layer_loop="auto"`` and ``matmul="auto"``: unrolled, on the CPU kernel
  where it applies); ``fields`` override (``min_window``, ...). For scripts
  and tests that build models without a config."""
  entry = ml_collections.ConfigDict(dict(matmul="auto"))
  return Transformer(cfg, "unrolled", matmul=matmul(entry, "unrolled", cfg.dtype), **fields)


def random_model_config(model_config) -> ModelConfig:
  """The ModelConfig of a ``source="random"`` config entry (no weights made)."""
  return ModelConfig(
      vocab_size=model_config.vocab_size, num_layers=model_config.num_layers,
      d_model=model_config.d_model, num_heads=model_config.num_heads,
      num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
      ffn_dim=model_config.ffn_dim, rope_theta=float(model_config.rope_theta),
      tie_embeddings=model_config.tie_embeddings, qkv_bias=model_config.qkv_bias,
      dtype=model_config.dtype)


def _random_model(model_config, sharding_fn=None):
  cfg = random_model_config(model_config)
  init = functools.partial(Transformer(cfg).init_params,
                           init_scale=model_config.get("init_scale", 0.2),
                           logit_scale=model_config.get("logit_scale", 4.0))
  if sharding_fn is None:
    params = jax.jit(init)(jax.random.PRNGKey(model_config.init_seed))
  else:  # initialised in place, shard by shard (same values: partitionable RNG)
    params = jax.jit(init, out_shardings=sharding_fn(cfg))(
        jax.random.PRNGKey(model_config.init_seed))
  return cfg, params, None


def _load_stacked(model_config, config, sharding_fn):
  """(ModelConfig, stacked params, tokenizer or None) from the entry's source."""
  source = model_config.source
  if source == "random":
    return _random_model(model_config, sharding_fn)
  dtype = model_config.get("dtype", "float32")
  if source == "smollm2":
    from specdec_jax.models import checkpoint
    return checkpoint.load_smollm2(cache_dir(config), dtype=dtype, sharding_fn=sharding_fn)
  if source == "gguf":
    from specdec_jax.models import gguf_import
    from specdec_jax.models import tokenizers
    cfg, params, info = gguf_import.load_gguf(model_config.path, dtype=dtype,
                                              sharding_fn=sharding_fn)
    return cfg, params, tokenizers.load_tokenizer_from_gguf(info)
  if source == "hf":
    from specdec_jax.models import hf_import
    return hf_import.load_hf_dir(model_config.path, dtype=dtype, sharding_fn=sharding_fn)
  if source == "orbax":
    from specdec_jax.models import checkpoint
    path = os.path.abspath(model_config.path)
    cfg = checkpoint.read_config(path)
    shardings = sharding_fn(cfg) if sharding_fn is not None else None
    return cfg, checkpoint.restore_params(path, cfg, shardings), None
  raise ValueError(f"unknown model source {source!r}; expected one of {MODEL_SOURCES}")


def load_model(model_config, config, sharding_fn=None) -> tuple[Transformer, Any, Tokenizer | None]:
  """(model, params in the model's layout, tokenizer or None) for one
  ``config.model``-style entry.

  ``sharding_fn``: optional ``ModelConfig -> params sharding pytree``; the
  params are then loaded straight into their shards (and stay stacked).
  """
  loop = layer_loop(model_config, sharded=sharding_fn is not None)
  check_matmul(model_config)
  cfg, params, tokenizer = _load_stacked(model_config, config, sharding_fn)
  model = Transformer(cfg, loop, model_config.get("min_window", DEFAULT_MIN_WINDOW),
                      matmul(model_config, loop, cfg.dtype))
  return model, model.prepare_params(params), tokenizer


@dataclasses.dataclass
class Runtime:
  """Everything a job needs, built once per process."""

  config: ml_collections.ConfigDict
  target: Transformer
  target_params: Any
  tokenizer: Tokenizer
  drafter: Any
  draft_params: Any
  shardings: Any = None   # sharding.GenerationShardings when config.mesh applies

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return tuple(self.tokenizer.eos_ids)

  def generator(self, *, baseline: bool = False, **overrides) -> Generator:
    """A Generator for the config (``baseline=True``: plain decoding, K=0;
    with ``matched_numerics`` both verify at the one width k_max + 1)."""
    c, d = self.config, self.config.decode
    kwargs = dict(
        k_max=0 if baseline else effective_k_max(c), rule=d.rule, policy=d.policy,
        max_prompt_len=c.max_prompt_len, max_new_tokens=c.max_new_tokens,
        batch_size=c.batch_size, eos_ids=self.eos_ids,
        typical_epsilon=d.typical_epsilon, typical_alpha=d.typical_alpha)
    if d.matched_numerics:
      kwargs["verify_widths"] = decode.matched_verify_widths(effective_k_max(c))
    if d.tree_nodes and not baseline:
      kwargs.update(tree_nodes=int(d.tree_nodes), tree_topk=int(d.tree_topk),
                    tree_candidates=str(d.tree_candidates))
    kwargs.update(overrides)
    drafter = None if kwargs["k_max"] == 0 else self.drafter
    if self.shardings is not None:
      kwargs.setdefault("shardings", self.shardings)
    return Generator(self.target, drafter, **kwargs)

  def run_kwargs(self, baseline: bool = False) -> dict:
    """Run-time settings from the config for Generator.generate."""
    d = self.config.decode
    kwargs = dict(**self.config.sampling, tau=d.tau, budget=d.budget)
    if not baseline and self.drafter is not None:
      kwargs["k"] = d.k
      if d.rule == "synthetic":
        kwargs["synthetic_acceptance"] = d.synthetic_acceptance
    return kwargs

  def measure_costs(self, generator: Generator, prompt_ids, log=None):
    """The costs the auto policy weighs (``phase_timing.measure_policy_costs``) on this
    machine, for ``config.decode.policy == "auto"``; None otherwise (and for plain
    decoding). Costs one compile of each phase and a few timed calls."""
    c = self.config
    if c.decode.policy != "auto" or generator.k_max == 0:
      return None
    costs = phase_timing.measure_policy_costs(
        generator, self.target_params, self.draft_params, prompt_ids, k=c.decode.k,
        **c.sampling)
    if jax.process_count() > 1:
      # every process times its own calls; the compiled loop needs one value
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      costs = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(costs))
    if log is not None:
      widths = ", ".join(f"{w}: {float(v):.2f}" for w, v in
                         zip(generator.verify_widths, costs.verify_W))
      log(f"auto policy: measured verify cost by width {{{widths}}} steps, "
          f"draft cost c={float(costs.draft):.3f} steps per token")
    return costs

  def encode_prompt(self, prompt) -> list[int]:
    """Token ids for a prompt (str, or a Prompt with messages)."""
    messages = getattr(prompt, "messages", None)
    if isinstance(prompt, str):
      messages = [{"role": "user", "content": prompt}]
      text = prompt
    else:
      text = prompt.text()
    if self.config.chat:
      text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
      return self.tokenizer.encode(text)
    return self.tokenizer.encode(text, add_bos=self.tokenizer.bos_id is not None)


def build_drafter(config, target: Transformer, sharding_fn=None,
                  target_params=None, sharded: bool | None = None) -> tuple[Any, Any]:
  """(drafter or None, draft params) for ``config.decode.drafter``.

  ``model`` and ``feature`` read ``config.draft_checkpoint`` (a distill
  workdir) when set; its draft kind must match. Without one, ``model`` loads
  ``config.draft`` and ``feature`` builds a random feature draft of
  ``config.draft.num_layers`` target-shaped blocks over the target's
  embedding (tests, smoke runs), which needs ``target_params``.
  ``ngram+model`` / ``ngram+feature`` wrap that draft in a HybridDrafter.
  """
  d = config.decode
  entry = drafters_lib.kind(d.drafter)
  lookup = NgramDrafter(max_n=d.ngram_max_n, min_n=d.ngram_min_n) if entry.lookup else None
  kind = entry.draft_model
  if kind is None:
    return drafters_lib.build(d.drafter, lookup=lookup), {}
  if sharded is None:
    sharded = sharding_fn is not None
  loop = layer_loop(config.draft, sharded)
  if config.draft_checkpoint:
    from specdec_jax.distill import checkpoints as distill_checkpoints
    draft_model, draft_params = distill_checkpoints.restore_latest_draft(
        config.draft_checkpoint)
    stored = "feature" if isinstance(draft_model, FeatureDraft) else "model"
    if stored != kind:
      suggestion = d.drafter.replace(kind, stored)
      raise ValueError(f"config.draft_checkpoint={config.draft_checkpoint!r} holds a "
                       f"{stored!r} draft; use --config.decode.drafter={suggestion}")
  elif kind == "feature":
    draft_model, draft_params = _random_feature_draft(config, target, target_params)
  else:
    draft_model, draft_params, _ = load_model(config.draft, config, sharding_fn)
  # Checkpoints and inits are stacked: the draft runs in its layer loop, on
  # the CPU kernels where they apply (a feature draft too).
  products = matmul(config.draft, loop, draft_model.cfg.dtype)
  if isinstance(draft_model, Transformer):
    draft_model = dataclasses.replace(
        draft_model, layer_loop=loop, matmul=products,
        min_window=config.draft.get("min_window", DEFAULT_MIN_WINDOW))
  else:
    draft_model = dataclasses.replace(draft_model, layer_loop=loop, matmul=products)
  draft_params = draft_model.prepare_params(draft_params)
  if isinstance(draft_model, FeatureDraft):
    check_compatible(draft_model.cfg, target.cfg)
  drafter = drafters_lib.build(d.drafter, lookup=lookup, draft_model=draft_model,
                               min_match=int(d.lookup_min_match))
  drafters_lib.check_vocabulary(drafter, target.cfg.vocab_size)
  return drafter, draft_params


def _random_feature_draft(config, target: Transformer, target_params):
  """A random feature draft: ``config.draft.num_layers`` blocks of the target's
  shapes, a full untied head, the target's embedding."""
  if target_params is None:
    raise ValueError("a random feature draft needs the target's params (its embedding)")
  cfg = dataclasses.replace(target.cfg, num_layers=int(config.draft.num_layers),
                            tie_embeddings=False, head_size=0)
  model = FeatureDraft(cfg)
  params = jax.jit(functools.partial(model.init_params,
                                     init_scale=config.draft.get("init_scale", 0.2)))(
      jax.random.PRNGKey(config.draft.init_seed))
  params["embed"] = target_params["embed"]
  return model, params


def build(config: ml_collections.ConfigDict, with_drafter: bool = True) -> Runtime:
  """Validates the config, loads the target, tokenizer and drafter."""
  validate_config(config)
  from specdec_jax import sharding  # pylint: disable=g-import-not-at-top
  setup = sharding.RuntimeSharding.from_config(config)  # None: single device
  target, target_params, tokenizer = load_model(
      config.model, config, setup and setup.param_fn("target"))
  if config.tokenizer == "byte" or tokenizer is None:
    if config.tokenizer != "byte":
      raise ValueError(f"config.tokenizer={config.tokenizer!r} but the model source "
                       f"{config.model.source!r} ships no tokenizer")
    tokenizer = ByteTokenizer()
  if tokenizer.vocab_size > target.cfg.vocab_size:
    raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size {target.cfg.vocab_size}")
  drafter, draft_params = (build_drafter(config, target, setup and setup.param_fn("draft"),
                                         target_params, sharded=setup is not None)
                           if with_drafter else (None, {}))
  shardings = setup and setup.generation(target, drafter)
  return Runtime(config=config, target=target, target_params=target_params,
                 tokenizer=tokenizer, drafter=drafter, draft_params=draft_params,
                 shardings=shardings)


def load_prompt_list(config) -> list:
  """The prompts a job runs: the config's built-in texts, or the suite/file."""
  if config.prompts_file or config.prompts != "builtin":
    from specdec_jax import prompts as prompts_lib
    selected = prompts_lib.load_prompts(config.prompts if config.prompts != "builtin" else "all",
                                        config.prompts_file or None)
  else:
    selected = list(config.prompt_texts)
  if config.max_prompts:
    selected = selected[:config.max_prompts]
  return selected
