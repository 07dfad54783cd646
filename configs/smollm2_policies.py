"""Draft-length policies compared on SmolLM2 (job=sweep).

Grid: the four policies x both drafters (n-gram, and a model drafter — a
distilled one via --config.draft_checkpoint=WORKDIR, else the random
plumbing draft), K_max 8, on copy-heavy and open-ended prompt categories.
Each point appends a benchmark summary (speedup, acceptance, effective-K
histogram, wasted draft tokens per committed token) to results.jsonl, and the
sweep ends with a table and plots.

  python -m specdec_jax.main --config=configs/smollm2_policies.py --workdir=runs/policies
  # the threshold policy at several tau:
  python -m specdec_jax.main --config=configs/smollm2_policies.py:tau --workdir=runs/tau
"""

import os

import ml_collections

from specdec_jax import config_defaults


def get_config(variant: str = "policies") -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "smollm2.py"))
  config.job = "sweep"
  config.decode.k = 8
  config.decode.k_max = 8
  config.decode.budget = 4
  config.decode.tau = 0.5
  config.prompts = "rewrite,code,qa"
  config.max_prompts = 9
  config.benchmark.repeats = 1
  config.sweep = ml_collections.ConfigDict()
  if variant == "tau":
    config.decode.policy = "threshold"
    config.decode.drafter = "model"
    config.sweep.decode = ml_collections.ConfigDict(dict(tau=(0.1, 0.3, 0.5, 0.7, 0.9)))
  elif variant == "policies":
    config.sweep.decode = ml_collections.ConfigDict(dict(
        policy=("fixed", "threshold", "adaptive", "budget"), drafter=("ngram", "model")))
  else:
    raise ValueError(f"unknown variant {variant!r}; expected 'policies' or 'tau'")
  return config
