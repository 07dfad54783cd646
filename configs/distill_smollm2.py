"""Distil a draft for SmolLM2-135M-Instruct (job=distill), then use it.

The draft: 2 layers of width 256 (4 heads of 64, 1 KV head), the target's
token embeddings projected onto their top 256 principal directions (frozen),
and a restricted head over the 4096 tokens the target emits most (the head
rows start as the projected target head). It is trained on the target's own
sampled completions of the prompt suite and of templated instructions, with
the target's distributions over the prompts at half weight.

  python -m specdec_jax.main --config=configs/distill_smollm2.py \
      --workdir=/tmp/distill_smollm2
  python -m specdec_jax.main --config=configs/smollm2.py --workdir=/tmp/bench \
      --config.job=benchmark --config.decode.drafter=model \
      --config.draft_checkpoint=/tmp/distill_smollm2

A killed run resumes from its last checkpoint when rerun with the same flags;
the generated data in WORKDIR/data is reused (only missing shards are made).

On a 2-core CPU the data is the bottleneck: these defaults sample 484
completions (51k tokens) at ~57 tokens/s in ~17 min, then train 800 steps
(~13 epochs) in ~6 min. Measured (quiet machine): held-out greedy K=4
acceptance 0.004 untrained, 0.21 after training (0.13 with 4k sampled tokens;
a 576-wide draft copying target layers 0-1 reached 0.23 at c ~0.09). More
samples (num_templated) help more than more steps: the draft overfits (train
top-1 0.68 vs held-out ~0.2).
"""

import os

import ml_collections

from specdec_jax import config_defaults


def get_config() -> ml_collections.ConfigDict:
  config = config_defaults.config_from_file(
      os.path.join(os.path.dirname(__file__), "smollm2.py"))
  config.job = "distill"
  config.decode.drafter = "model"
  config.decode.k = 4
  config.distill.train_steps = 800
  config.draft = config_defaults.random_model(
      vocab_size=49152, num_layers=2, d_model=256, num_heads=4, num_kv_heads=1,
      head_dim=64, ffn_dim=768, rope_theta=100000.0, tie_embeddings=False, init_seed=1)
  d = config.distill
  d.prompts = "all"
  d.samples_per_prompt = 1
  d.num_templated = 440
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
