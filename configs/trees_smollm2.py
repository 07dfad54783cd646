"""Draft trees vs chains at the same verify width on SmolLM2 (job=sweep).

One joint sweep axis, ``shape``: at verify widths 4, 8 and 16, a chain of
K = width - 1 drafts against a tree of N = width - 1 nodes (depth
k = (N + 1) // 2, more branches as the width grows), greedy, policy fixed,
on the held-out prompts. Each point appends a benchmark summary
(tokens_per_call, speedup, acceptance by depth) to results.jsonl; the sweep
ends with a table and tokens_per_call_vs_width.png.

The default drafter is n-gram lookup; the ``feature`` variant uses a
distilled EAGLE-style feature draft (configs/feature_smollm2.py), which
always has candidates, so its trees have branches at every step. The
``feature_sampling`` variant samples (temperature 1, rule rejection) and
adds, at each width, a tree whose candidates are drawn from the draft's q
(``decode.tree_candidates="sampled"``, Sequoia-style) next to the top-k
tree; width 8 runs first:

  python -m specdec_jax.main --config=configs/trees_smollm2.py --workdir=runs/trees
  python -m specdec_jax.main --config=configs/trees_smollm2.py:feature \
      --workdir=runs/trees_feature --config.draft_checkpoint=/tmp/feature_smollm2
  python -m specdec_jax.main --config=configs/trees_smollm2.py:feature_sampling \
      --workdir=runs/trees_sampling --config.draft_checkpoint=/tmp/feature_smollm2
"""

VARIANTS = ("", "feature", "feature_sampling")

import os

import ml_collections

from specdec_jax import config_defaults


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "smollm2.py"))
  config.job = "sweep"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
  # The feature variants need --config.draft_checkpoint.
  config.decode.drafter = "ngram" if variant == "" else "feature"
  sampling = variant == "feature_sampling"
  if sampling:
    config.sampling.temperature = 1.0
    config.decode.rule = "rejection"
  config.decode.policy = "fixed"
  config.prompts = "held_out"
  config.benchmark.repeats = 1
  shapes = []
  widths = ((8, 3), (4, 2), (16, 4)) if sampling else ((4, 2), (8, 3), (16, 4))
  for width, topk in widths:
    nodes = width - 1
    shapes.append({"decode.k": nodes, "decode.tree_nodes": 0})
    for candidates in (("topk", "sampled") if sampling else ("topk",)):
      shapes.append({"decode.k": (nodes + 1) // 2, "decode.tree_nodes": nodes,
                     "decode.tree_topk": topk, "decode.tree_candidates": candidates})
  config.sweep = ml_collections.ConfigDict()
  config.sweep.shape = tuple(shapes)
  return config
