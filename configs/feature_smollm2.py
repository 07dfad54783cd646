"""Train an EAGLE-style feature draft for SmolLM2-135M-Instruct, then use it.

The draft is one Llama block of the target's width that reads the target's
own hidden states (``distill.draft_kind='feature'``, see
specdec_jax/models/feature_draft.py), with the target's embedding and a
restricted head over the 8192 tokens the target emits most (rows from the
target's head). It trains on the same on-policy data as
configs/distill_smollm2.py (the target's sampled completions; a workdir made
by that config is reused as is).

  python -m specdec_jax.main --config=configs/feature_smollm2.py \
      --workdir=/tmp/feature_smollm2
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/bench \
      --config.job=benchmark --config.drafter=feature \
      --config.draft_checkpoint=/tmp/feature_smollm2

A killed run resumes from its last checkpoint when rerun with the same flags.
"""

import os

import ml_collections

from specdec_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "distill_smollm2.py"))
  config.drafter = "feature"
  config.train_steps = 300
  config.draft = config_defaults.random_model(
      vocab_size=49152, num_layers=1, d_model=576, num_heads=9, num_kv_heads=3,
      head_dim=64, ffn_dim=1536, rope_theta=100000.0, tie_embeddings=False, init_seed=1)
  d = config.distill
  d.draft_kind = "feature"
  d.head_size = 8192
  d.feature_loss_weight = 1.0
  d.unroll = 1
  d.init_layers = ""
  d.learning_rate = 1e-3
  d.warmup_steps = 30
  d.eval_every = 100
  return config
