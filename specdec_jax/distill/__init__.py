"""Distilling a draft from a target (``job=distill``): a small Transformer
(``draft_kind='model'``) or an EAGLE-style block over the target's hidden
states (``draft_kind='feature'``).

Modules, in data-flow order:
  instructions  templated instructions that widen the prompt mix
  data          on-policy samples from the target, the target's top-k
                distributions over them (cached in WORKDIR/data), the
                target's features (feature drafts), batches
  model         the draft's ModelConfig, restricted-head token choice, init
  losses        forward KL and total variation against the target
  checkpoints   orbax CheckpointManager state; ``restore_latest_draft``
  train         optimiser, jitted train step (feature drafts: distillation +
                feature regression, unrolled), the resumable training loop
  evaluate      greedy acceptance of the draft on held-out prompts
"""
