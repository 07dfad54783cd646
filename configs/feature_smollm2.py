"""Train an EAGLE-style feature draft for SmolLM2-135M-Instruct, then use it.

The draft is one Llama block of the target's width that reads the target's
own hidden states (``distill.draft_kind='feature'``, see
specdec_jax/models/feature_draft.py), with the target's embedding and a
restricted head over the 8192 tokens the target emits most (the target's
head rows, frozen). It trains on the target's sampled completions (T=0.8,
up to 96 new tokens) of the prompt suite, every templated instruction and
600 instructions the target writes itself, two passes deep (the second
reads its own feature estimates, as drafts 2..K do), with the feature
regression weighted 5. The teacher pass stores the target's top-k and
hidden states with the samples (WORKDIR/data, reused on rerun).

Measured on the 2-core CPU (quiet machine, 2026-12-01), 76 min wall in all:
self-instruct 17 min (~8 min with the top-p bisection that landed after
it), sampling + teacher pass 40 min (1355 sequences, 117k completion + 68k
prompt tokens), 600 steps ~20 min at ~530 tokens/s. Held-out greedy K=4
(8 prompts, 58 tokens each): the draft alone 0.24 acceptance (1.33 tokens
per call) at step 300, 0.31 (1.49) at step 600; behind n-gram lookup
(``--config.decode.drafter=ngram+feature``) 0.45 (1.86), then 0.50 (1.98). Train
top-1 was still rising (0.59): more data and steps would help. On the
earlier 51k-token data the draft overfit (train top-1 0.72, acceptance 0.26).
Rerun on 2026-12-07 (the data resumed from a killed run, 600 steps at ~780
tokens/s): 0.317 (1.50), behind lookup 0.490 (1.98). Ablations on
2026-12-01: no input norms 0.25 (the token embedding is ~15x smaller than
the features and is drowned), then one pass and weight 1 0.24, then a
trained head and learning rate 1e-3 for 300 steps 0.19.

  python -m specdec_jax.main --config=configs/feature_smollm2.py \
      --workdir=/tmp/feature_smollm2
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/bench \
      --config.job=benchmark --config.decode.drafter=feature \
      --config.draft_checkpoint=/tmp/feature_smollm2

A killed run resumes from its last checkpoint when rerun with the same flags.

``configs/feature_smollm2.py:compare`` benchmarks the trained draft against
the n-gram drafter at K = 2 and 4 on the held-out prompts (job=sweep):

  python -m specdec_jax.main --config=configs/feature_smollm2.py:compare \
      --workdir=/tmp/feature_vs_ngram --config.draft_checkpoint=/tmp/feature_smollm2
"""

import os

import ml_collections

from specdec_jax import config_defaults


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "distill_smollm2.py"))
  config.decode.drafter = "feature"
  config.distill.train_steps = 600
  config.draft = config_defaults.random_model(
      vocab_size=49152, num_layers=1, d_model=576, num_heads=9, num_kv_heads=3,
      head_dim=64, ffn_dim=1536, rope_theta=100000.0, tie_embeddings=False, init_seed=1)
  d = config.distill
  d.draft_kind = "feature"
  d.head_size = 8192
  d.feature_loss_weight = 5.0
  d.unroll = 2
  d.init_layers = ""
  d.learning_rate = 2e-3
  d.warmup_steps = 50
  d.eval_every = 300
  # More, more varied on-policy data: every templated instruction, 600 the
  # target writes itself (Magpie), sampled 64 rows at a time.
  d.num_templated = 711
  d.num_self_instruct = 600
  d.gen_max_new_tokens = 96
  d.gen_batch_size = 64
  if variant == "compare":
    config.job = "sweep"
    config.prompts = "held_out"
    config.max_new_tokens = 64
    config.benchmark.repeats = 1
    config.sweep = ml_collections.ConfigDict()
    config.sweep.decode = ml_collections.ConfigDict(dict(
        drafter=("ngram", "feature", "ngram+feature"), k=(2, 4)))
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected 'compare'")
  return config
