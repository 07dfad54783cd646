"""Distil a draft for SmolLM2-135M-Instruct (job=distill), then use it.

The draft: 2 layers of width 256 (4 heads of 64, 1 KV head), the target's
token embeddings projected onto their top 256 principal directions (frozen),
and a restricted head over the 4096 tokens the target emits most (the head
rows start as the projected target head). It is trained on the target's own
sampled completions of the prompt suite and of templated instructions, with
the target's distributions over the prompts at half weight.

  python -m specdec_jax.main --config=configs/distill_smollm2.py \
      --workdir=/tmp/distill_smollm2 --config.train_steps=600
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/bench \
      --config.job=benchmark --config.drafter=model \
      --config.draft_checkpoint=/tmp/distill_smollm2

A killed run resumes from its last checkpoint when rerun with the same flags;
the generated data in WORKDIR/data is reused (only missing shards are made).

On a shared 2-core CPU the data is the bottleneck (sampling runs at ~5-25
tokens/s): with ~4k sampled tokens the draft overfits after ~20 epochs
(train top-1 0.9, held-out greedy acceptance ~0.13), so spend the time on
samples (num_templated) and keep train_steps near 20-25 epochs of the data.
"""

import os

import ml_collections

from specdec_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "smollm2.py"))
  config.job = "distill"
  config.drafter = "model"
  config.k = 4
  config.train_steps = 600
  config.draft = config_defaults.random_model(
      vocab_size=49152, num_layers=2, d_model=256, num_heads=4, num_kv_heads=1,
      head_dim=64, ffn_dim=768, rope_theta=100000.0, tie_embeddings=False, init_seed=1)
  d = config.distill
  d.prompts = "all"
  d.samples_per_prompt = 1
  d.num_templated = 240
  d.gen_temperature = 0.8
  d.gen_max_new_tokens = 128
  d.gen_batch_size = 8
  d.teacher_top_k = 32
  d.head_size = 4096
  d.init_from_target = True
  d.train_embedding = False
  d.loss = "kl+tv"
  d.batch_size = 8
  d.seq_len = 192
  d.prompt_loss_weight = 0.5
  d.learning_rate = 1e-3
  d.warmup_steps = 50
  d.checkpoint_every = 100
  d.log_every = 10
  d.eval_max_new_tokens = 64
  d.eval_every = 300
  return config
