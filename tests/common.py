"""What many test modules share: the tiny models, their Generators, prompts,
the tiny config and the per-row statistics check.

Every decode-loop test module draws its Generators from ``generator()``, one
cached instance per static setup, so a setup compiles once per test session
whichever module asks first (params, prompts, seeds, K and warp settings are
traced values and never recompile).
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from specdec_jax import config_defaults
from specdec_jax.drafters import FeatureDrafter, HybridDrafter, ModelDrafter, NgramDrafter
from specdec_jax.generation import Generator
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft
from specdec_jax.models.transformer import Transformer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# XLA:CPU flag for the tiny models' compiles (set for the test processes and
# their subprocesses by conftest.py); ``real_model_env`` takes it out again.
TINY_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def real_model_env(env: dict) -> dict:
  """``env`` for a subprocess that runs the real model: XLA's optimisation
  passes and the newer fusion emitters back on (its compiles take half the
  time and its steps run up to 2.6x faster than with the tiny models' settings)."""
  return dict(env, JAX_DISABLE_MOST_OPTIMIZATIONS="0",
              XLA_FLAGS=env.get("XLA_FLAGS", "").replace(TINY_XLA_FLAGS, "").strip())

VOCAB = 259
TARGET = Transformer(ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, ffn_dim=128))
DRAFT = Transformer(ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=32, num_heads=2,
                                num_kv_heads=1, head_dim=16, ffn_dim=64))
# An EAGLE-style draft over the target's width, with a restricted head (its
# 200 token ids are drawn per seed in ``feature_params``).
FEATURE_DRAFT = FeatureDraft(ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=64,
                                         num_heads=4, num_kv_heads=2, head_dim=16,
                                         ffn_dim=96, tie_embeddings=False, head_size=200))

K_MAX = 5
MAX_NEW = 24
MAX_PROMPT = 16
LOOKUP = NgramDrafter(max_n=3, min_n=1)
DRAFTERS = {
    "plain": None,
    "ngram": LOOKUP,
    "model": ModelDrafter(DRAFT),
    "self": ModelDrafter(TARGET),           # the target drafting for itself
    "feature": FeatureDrafter(FEATURE_DRAFT),
    "ngram+model": HybridDrafter.wrap(LOOKUP, ModelDrafter(DRAFT), min_match=2),
    "ngram+feature": HybridDrafter.wrap(LOOKUP, FeatureDrafter(FEATURE_DRAFT), min_match=2),
}


@functools.lru_cache(maxsize=None)
def _init_fn(model, kwargs):
  return jax.jit(functools.partial(model.init_params, **dict(kwargs)))


def init(model, seed: int, **kwargs):
  """Random params of ``model`` from ``PRNGKey(seed)`` (one compile per model)."""
  return _init_fn(model, tuple(sorted(kwargs.items())))(jax.random.PRNGKey(seed))


def feature_params(seed: int, target_params, scale: float = 0.2):
  """A random FEATURE_DRAFT over the target's embedding; its 200 head ids are
  a random subset of the vocabulary."""
  params = init(FEATURE_DRAFT, seed, init_scale=scale)
  params["embed"] = target_params["embed"]
  ids = np.sort(np.random.default_rng(seed).choice(VOCAB, FEATURE_DRAFT.cfg.head_size,
                                                   replace=False))
  params["lm_head"]["token_ids"] = jnp.asarray(ids, jnp.int32)
  return params


def draft_params(kind: str, seed: int, target_params):
  """Params for drafter ``kind`` (seeded), given the target's."""
  if kind in ("plain",):
    return None
  if kind == "ngram":
    return {}
  if kind == "self":
    return target_params
  if kind.endswith("model"):
    return init(DRAFT, seed)
  return feature_params(seed, target_params)


@functools.lru_cache(maxsize=None)
def generator(kind: str, batch: int, rule: str = "rejection", policy: str = "fixed",
              eos: tuple = (), k_max: int = K_MAX, max_new: int = MAX_NEW,
              max_prompt: int = MAX_PROMPT) -> Generator:
  """The shared Generator for one static setup (``kind`` names DRAFTERS)."""
  drafter = DRAFTERS[kind]
  return Generator(TARGET, drafter, k_max=0 if drafter is None else k_max, rule=rule,
                   policy=policy, max_prompt_len=max_prompt, max_new_tokens=max_new,
                   batch_size=batch, eos_ids=eos)


def make_prompts(seed: int, n: int = 5):
  """Ragged prompts (2..16 tokens); rows 1 and 3 repeat a short pattern, so
  that the n-gram lookup matches there."""
  rng = np.random.default_rng(seed)
  prompts = []
  for i, length in enumerate(rng.integers(2, 17, size=n)):
    if i in (1, 3):
      pattern = rng.integers(0, VOCAB, size=int(rng.integers(2, 5))).tolist()
      prompts.append((pattern * 16)[:max(int(length), 6)])
    else:
      prompts.append(rng.integers(0, VOCAB, size=int(length)).tolist())
  return prompts


def outputs(result):
  return [r.output_ids for r in result.rows]


def total_accepted(result) -> int:
  return sum(sum(r.accepted_per_step) for r in result.rows)


def check_stats(row, k_max: int = K_MAX):
  """A row's statistics are mutually consistent."""
  acc, reached = np.asarray(row.accepted_by_slot), np.asarray(row.reached_by_slot)
  assert len(acc) == len(reached) == k_max
  assert np.all(acc <= reached)
  assert np.all(np.diff(acc) <= 0) and np.all(np.diff(reached) <= 0)
  assert len(row.accepted_per_step) == len(row.proposed_per_step) == row.target_calls
  steps_acc = np.asarray(row.accepted_per_step)
  steps_prop = np.asarray(row.proposed_per_step)
  assert np.all(steps_acc >= 0) and np.all(steps_acc <= steps_prop)
  assert steps_acc.sum() == acc.sum()
  assert reached.sum() == np.minimum(steps_acc + 1, steps_prop).sum()
  # Every step commits n + 1 tokens except a last one cut by EOS / max_new.
  committed = steps_acc + 1
  assert len(row.output_ids) <= committed.sum()
  assert len(row.output_ids) > committed[:-1].sum()
  expected = np.asarray(row.expected_accept_by_slot)
  assert np.all(expected >= -1e-6) and np.all(expected <= reached + 1e-4)


def load_config(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file under the repository root."""
  full = REPO_ROOT / path
  spec = importlib.util.spec_from_file_location("config_" + full.stem, full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant is not None else module.get_config()


def tiny_config(variant: str = "", **changes) -> ml_collections.ConfigDict:
  """configs/tiny.py with dotted overrides: ``tiny_config(**{"draft.vocab_size": 9})``.
  A grouped field may be named on its own (``k=2`` sets ``decode.k``:
  ``config_defaults.MOVED_FIELDS``); a name the config lacks is a KeyError."""
  config = load_config("configs/tiny.py", variant)
  for key, value in changes.items():
    key = config_defaults.MOVED_FIELDS.get(key, key)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"tiny_config: the config has no field {key!r}")
    node[leaf] = value
  return config


def assert_close_in_float32(actual, expected, rtol: float = 1e-4, what: str = "values"):
  """|actual - expected| within float32 rounding relative to the values' size.

  Reassociated float32 sums (another batch shape, another kernel) differ by a
  few hundred ulps of the largest magnitude involved, so the bound is
  ``rtol * max|expected|`` (1e-4 is ~800 ulps); a real bug moves values by a
  sizeable fraction of that magnitude.
  """
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, (f"{what}: max |diff| {err:.3g} exceeds {rtol:g} x max|value| "
                               f"{scale:.3g}")


def run_cli(args, capsys) -> tuple[int, str, str]:
  """``python -m specdec_jax.main ARGS`` in this process: the same flag
  parsing and job entry, without a JAX start-up per call. Returns (exit
  code, stdout, stderr)."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from specdec_jax import main as main_lib  # pylint: disable=g-import-not-at-top

  def reset():
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)   # config_flags defines one flag per override

  reset()
  capsys.readouterr()
  code, argv = 0, sys.argv
  sys.argv = ["specdec", *args]    # config_flags reads its overrides from sys.argv
  try:
    main_lib._parse_flags(sys.argv)
    main_lib.main(["specdec"])
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
  finally:
    sys.argv = argv
    reset()
  out, err = capsys.readouterr()
  return code, out, err


def cache_copies(compiled_text: str, cache_shape) -> int:
  """Copies of a cache-shaped float32 buffer in a compiled program's HLO."""
  shape = "f32[" + ",".join(map(str, cache_shape)) + "]"
  return sum(1 for line in compiled_text.splitlines()
             if " copy(" in line and line.split("=", 1)[1].lstrip().startswith(shape))
