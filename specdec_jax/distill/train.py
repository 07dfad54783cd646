"""The resumable distillation loop: optimiser, jitted step, checkpoints, logs.

Resuming reproduces an uninterrupted run: params and optimiser state come
back from the latest checkpoint, and the batch of every step is a pure
function of (seed, step) (``data.batch_indices``), so there is no loader
state to lose.
"""

import copy
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specdec_jax.distill import checkpoints
from specdec_jax.jobs import io
from specdec_jax.distill import losses
from specdec_jax.distill.data import TrainData
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft


def frozen_paths(draft_cfg: ModelConfig, d) -> list[tuple[str, ...]]:
  """Params not trained: head token ids, and the target's embeddings.

  The embedding is frozen only when it came from the target
  (``init_from_target``) and ``train_embedding`` is off, and always for a
  feature draft (it is the target's table), whose head (the target's rows)
  is frozen too unless ``feature_train_head``; a tied embedding is the head
  too, so it is always trained.
  """
  paths = []
  if draft_cfg.head_size:
    paths.append(("lm_head", "token_ids"))
  if d.draft_kind == checkpoints.FEATURE:   # it embeds with the target's table
    paths.append(("embed",))
    if not d.feature_train_head:   # the target's head rows: g must live in its space
      paths.append(("lm_head", "kernel"))
  elif d.init_from_target and not d.train_embedding and not draft_cfg.tie_embeddings:
    paths.append(("embed",))
  return paths


def partition(params: dict, paths) -> tuple[dict, dict]:
  """(trainable, frozen): nested dicts with the ``paths`` moved to frozen."""
  trainable, frozen = copy.copy(params), {}
  for path in paths:
    src, dst = trainable, frozen
    for key in path[:-1]:
      src[key] = copy.copy(src[key])
      src, dst = src[key], dst.setdefault(key, {})
    dst[path[-1]] = src.pop(path[-1])
  return trainable, frozen


def merge(a: dict, b: dict) -> dict:
  """Recursive union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for key, value in b.items():
    out[key] = merge(out[key], value) if key in out else value
  return out


def _schedule(d, total_steps: int):
  warmup = min(int(d.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=d.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=d.learning_rate * d.min_lr_ratio)


def make_optimizer(d, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay, after global-norm clipping.

  Norm scales are not weight-decayed. ``d``: the ``config.distill`` settings
  (or an ``OptimizerSettings``).
  """
  decay_mask = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: "scale" not in jax.tree_util.keystr(path), tree)
  return optax.chain(optax.clip_by_global_norm(d.clip_norm),
                     optax.adamw(_schedule(d, total_steps), weight_decay=d.weight_decay,
                                 mask=decay_mask))


def make_train_step(model, optimizer, loss_kind: str, feature_loss_weight: float = 1.0,
                    unroll: int = 1):
  """Jitted (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

  ``model`` is a Transformer draft, or a FeatureDraft (``feature_loss_weight``
  and ``unroll`` apply to it, see ``feature_loss``).
  """
  losses.total_loss(loss_kind, {"kl": 0.0, "tv": 0.0})  # validates the name

  def loss_fn(trainable, frozen, batch):
    if isinstance(model, FeatureDraft):
      return feature_loss(model, merge(trainable, frozen), batch, loss_kind,
                          feature_loss_weight, unroll)
    tokens_BT = batch["tokens_BT"]
    batch_size, seq = tokens_BT.shape
    # RoPE depends on relative offsets only, so a window may start at 0.
    positions_BT = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch_size, seq))
    logits_BTN, _ = model.apply(merge(trainable, frozen), tokens_BT, positions_BT,
                                model.init_cache(batch_size, seq), full_vocab=False)
    metrics = losses.distill_metrics(logits_BTN, batch["teacher_head_BTk"],
                                     batch["teacher_logp_BTk"], batch["mask_BT"])
    return losses.total_loss(loss_kind, metrics), metrics

  @jax.jit
  def train_step(trainable, frozen, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   tokens=jnp.sum(batch["mask_BT"]))
    return trainable, opt_state, metrics

  return train_step


def feature_loss(model: FeatureDraft, params, batch, loss_kind: str,
                 feature_loss_weight: float, unroll: int):
  """Loss of a feature draft: distillation on its next-token distribution plus
  ``feature_loss_weight`` x smooth-L1 between its g and the target's feature.

  Pass 1 reads the target's true features (what the first draft of a step
  sees). Each further pass (``unroll`` in all) reads the previous pass's own
  estimates instead, as drafts 2..K do, so the draft learns to correct its
  own errors; the passes' losses are averaged. Metrics are pass 1's, plus
  ``top1_last``: greedy agreement of the last pass.
  """
  tokens_BT, mask_BT = batch["tokens_BT"], batch["mask_BT"]
  features_BT1D = batch["features_BT1D"]
  batch_size, seq = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch_size, seq))
  prev_BTD, target_BTD = features_BT1D[:, :-1], features_BT1D[:, 1:]
  count = jnp.maximum(jnp.sum(mask_BT), 1.0)
  total, first = 0.0, None
  for _ in range(unroll):
    g_BTD, _ = model.hidden(params, tokens_BT, prev_BTD, positions_BT,
                            model.init_cache(batch_size, seq))
    metrics = losses.distill_metrics(model.logits(params, g_BTD, full_vocab=False),
                                     batch["teacher_head_BTk"], batch["teacher_logp_BTk"],
                                     mask_BT)
    err_BTD = jnp.abs(g_BTD - target_BTD)
    smooth_l1_BT = jnp.mean(jnp.where(err_BTD < 1.0, 0.5 * err_BTD ** 2, err_BTD - 0.5), axis=-1)
    metrics["feature_l1"] = jnp.sum(smooth_l1_BT * mask_BT) / count
    total = total + losses.total_loss(loss_kind, metrics) + (
        feature_loss_weight * metrics["feature_l1"])
    if first is None:
      first = metrics
    # the next pass reads this pass's estimate of f_{t-1} (the true one at t = 0)
    prev_BTD = jnp.concatenate([prev_BTD[:, :1], g_BTD[:, :-1]], axis=1)
  return total / unroll, dict(first, top1_last=metrics["top1"])


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """The ``config.distill`` fields the optimizer reads (hashable, so that one
  compiled train step serves every run with the same settings)."""

  learning_rate: float
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  clip_norm: float

  @classmethod
  def from_config(cls, d) -> "OptimizerSettings":
    return cls(float(d.learning_rate), int(d.warmup_steps), float(d.min_lr_ratio),
               float(d.weight_decay), float(d.clip_norm))


@functools.lru_cache(maxsize=16)
def cached_train_step(model, settings: OptimizerSettings, total_steps: int, loss_kind: str,
                      feature_loss_weight: float, unroll: int):
  """(optimizer, jitted train step) for these settings, built once per process
  (a run in the same process, e.g. a resumed one, does not recompile)."""
  optimizer = make_optimizer(settings, total_steps)
  return optimizer, make_train_step(model, optimizer, loss_kind, feature_loss_weight, unroll)


@dataclasses.dataclass
class TrainResult:
  params: dict                 # the full draft params after the last step
  step: int
  resumed_from: int            # 0 for a fresh run
  history: list                # one dict per progress line
  evals: list                  # one dict per held-out evaluation


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_training(config, draft_cfg: ModelConfig, init_fn: Callable[[], dict],
                 data: TrainData, workdir: str, data_fingerprint: str, log=print,
                 evaluate: Callable[[dict], dict] | None = None,
                 on_checkpoint: Callable[[int], None] | None = None,
                 history_file: str | None = None) -> TrainResult:
  """Trains ``config.distill.train_steps`` steps, resuming from WORKDIR/checkpoints.

  Args:
    init_fn: () -> initial full draft params (only called on a fresh run).
    evaluate: full draft params -> metrics dict (held-out acceptance), run at
      the start of a fresh run, every ``distill.eval_every`` steps and at the end.
    on_checkpoint: called with the step after each checkpoint is on disk
      (tests use it to simulate a kill).
    history_file: JSONL file that each progress row and evaluation is
      appended to (the loss curve survives a kill).

  Raises:
    ValueError: the checkpoints were made for another draft config, data or
      seed, or are damaged.
  """
  d = config.distill
  total = int(config.distill.train_steps)
  model = checkpoints.draft_model(d.draft_kind, draft_cfg)
  optimizer, train_step = cached_train_step(
      model, OptimizerSettings.from_config(d), total, d.loss, float(d.feature_loss_weight),
      int(d.unroll))
  paths = frozen_paths(draft_cfg, d)
  meta_base = {"model_config": checkpoints.config_dict(draft_cfg), "draft_kind": d.draft_kind,
               "frozen": ["/".join(p) for p in paths], "data_seed": int(d.seed),
               "data_fingerprint": data_fingerprint, "train_steps": total}

  schedule = _schedule(d, total)
  mngr = checkpoints.manager(workdir, keep=d.keep_checkpoints)
  try:
    start = mngr.latest_step() or 0
    if start:
      meta, _ = checkpoints.read_meta(mngr, start)
      for key in ("model_config", "draft_kind", "frozen", "data_seed", "data_fingerprint"):
        stored = checkpoints.meta_field(meta, key)
        if key == "frozen" and stored is None:   # saved before the field existed
          continue
        if stored != meta_base[key]:
          raise ValueError(
              f"{checkpoints.checkpoint_dir(workdir)} holds checkpoints of another run "
              f"({key}: stored {stored!r}, now {meta_base[key]!r}); use a new workdir")
      abstract = model.expected_params_shapes()
      abstract_opt = jax.eval_shape(optimizer.init, partition(abstract, paths)[0])
      params, opt_state = checkpoints.restore(mngr, start, abstract, abstract_opt)
      log(f"resumed from the checkpoint at step {start}")
    else:
      params = init_fn()
      opt_state = optimizer.init(partition(params, paths)[0])
    trainable, frozen = partition(params, paths)
    history, evals = [], []
    if evaluate is not None and start == 0 and d.eval_at_start:
      evals.append(dict(evaluate(params), step=0))
      _append(history_file, {"eval": evals[-1]})
      log(_eval_line(evals[-1]))

    window, window_s, run_s, timed_steps = [], 0.0, 0.0, 0
    for step in range(start, total):
      t0 = time.perf_counter()
      batch = data.batch(d.seed, step, d.batch_size)
      trainable, opt_state, metrics = train_step(trainable, frozen, opt_state, batch)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - t0
      if step == start:  # includes compilation: kept out of the rates
        log(f"first step (with compilation) took {elapsed:.1f}s")
      else:
        window.append(metrics)
        window_s += elapsed
        run_s += elapsed
        timed_steps += 1
      done = step + 1
      if window and (done % d.log_every == 0 or done == total):
        row = {"step": done, **{k: float(np.mean([m[k] for m in window]))
                                for k in ("loss", "kl", "tv", "top1", "grad_norm")},
               **({"top1_last": float(np.mean([m["top1_last"] for m in window])),
                   "feature_l1": float(np.mean([m["feature_l1"] for m in window]))}
                  if "top1_last" in window[0] else {}),
               "lr": float(schedule(done)),
               "tokens_per_s": sum(float(m["tokens"]) for m in window) / window_s}
        history.append(row)
        _append(history_file, row)
        log(f"step {done}/{total} loss {row['loss']:.4f} kl {row['kl']:.4f} "
            f"tv {row['tv']:.4f} top1 {row['top1']:.3f}"
            + (f" (last pass {row['top1_last']:.3f}, feature l1 {row['feature_l1']:.4f})"
               if "top1_last" in row else "")
            + f" lr {row['lr']:.2e} | "
            f"{row['tokens_per_s']:.0f} tok/s | ETA "
            f"{_fmt_time(run_s / timed_steps * (total - done))}")
        window, window_s = [], 0.0
      if done % d.checkpoint_every == 0 or done == total:
        checkpoints.save(mngr, done, merge(trainable, frozen), opt_state,
                         dict(meta_base, step=done, metrics=history[-1] if history else {}))
        if on_checkpoint is not None:
          mngr.wait_until_finished()
          on_checkpoint(done)
      if evaluate is not None and ((d.eval_every and done % d.eval_every == 0) or done == total):
        evals.append(dict(evaluate(merge(trainable, frozen)), step=done))
        _append(history_file, {"eval": evals[-1]})
        log(_eval_line(evals[-1]))
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return TrainResult(params=merge(trainable, frozen), step=max(start, total),
                     resumed_from=start, history=history, evals=evals)


def _append(path: str | None, row: dict) -> None:
  if path:
    io.append_jsonl(path, row)


def _eval_line(ev: dict) -> str:
  lookup = ev.get("with_lookup")
  return (f"eval @ step {ev['step']}: held-out greedy K={ev['k']} acceptance "
          f"{ev['acceptance_rate']:.3f}, mean tokens per call "
          f"{ev['mean_tokens_per_call']:.2f}"
          + (f"; behind n-gram lookup {lookup['acceptance_rate']:.3f}, "
             f"{lookup['mean_tokens_per_call']:.2f}" if lookup else "")
          + f" ({ev['num_prompts']} prompts, {ev['wall_s']:.0f}s)")
