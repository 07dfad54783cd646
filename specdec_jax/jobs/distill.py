"""job=distill: trains a draft model on the target's own outputs.

1. Data (WORKDIR/data, reused on rerun): the target completes the training
   prompts (``distill.prompts`` x ``samples_per_prompt``, ``num_templated``
   templated instructions and ``num_self_instruct`` instructions the target
   writes itself) at ``gen_temperature``; one teacher pass stores its top-k
   next-token distributions (and, for a feature draft, its hidden states).
2. Draft: ``config.draft`` shapes, the target's vocabulary, optionally a
   restricted head over the ``distill.head_size`` tokens the target emits
   most; initialised from the target (``distill.init_from_target``).
3. Training: ``config.distill.train_steps`` AdamW steps on ``distill.loss``
   (kl | tv | kl+tv), checkpoints in WORKDIR/checkpoints; a killed run
   resumes where its last checkpoint left off, with the same batches.
4. Evaluation: greedy acceptance at K=``distill.eval_k`` on the held-out
   prompts, at the start, every ``eval_every`` steps and at the end; with
   ``eval_with_lookup`` also behind n-gram lookup (``ngram+model`` /
   ``ngram+feature``).

Outputs: WORKDIR/summary.json, WORKDIR/train_log.jsonl (loss curve, evals).
Use the draft with ``--config.decode.drafter=model --config.draft_checkpoint=WORKDIR``
(``--config.decode.drafter=feature`` for ``distill.draft_kind='feature'``; prefix
``ngram+`` for the hybrid).
"""

import os
import time

import jax
import numpy as np

from specdec_jax import drafters
from specdec_jax import prompts as prompts_lib
from specdec_jax import runtime
from specdec_jax.distill import checkpoints
from specdec_jax.distill import data as data_lib
from specdec_jax.distill import evaluate as evaluate_lib
from specdec_jax.distill import losses
from specdec_jax.distill import model as model_lib
from specdec_jax.distill import train as train_lib
from specdec_jax.jobs import io


def validate(config) -> None:
  """Checks the fields job=distill reads; ValueError naming the field."""
  d = config.distill
  if d.loss not in losses.LOSSES:
    raise ValueError(f"config.distill.loss={d.loss!r}; expected one of {losses.LOSSES}")
  positive = {"distill.train_steps": d.train_steps, "distill.batch_size": d.batch_size,
              "distill.gen_batch_size": d.gen_batch_size,
              "distill.gen_max_new_tokens": d.gen_max_new_tokens,
              "distill.teacher_top_k": d.teacher_top_k,
              "distill.teacher_batch_size": d.teacher_batch_size,
              "distill.checkpoint_every": d.checkpoint_every,
              "distill.keep_checkpoints": d.keep_checkpoints, "distill.log_every": d.log_every,
              "distill.eval_k": d.eval_k, "distill.eval_max_new_tokens": d.eval_max_new_tokens,
              "distill.self_instruct_max_tokens": d.self_instruct_max_tokens}
  for name, value in positive.items():
    if int(value) != value or value < 1:
      raise ValueError(f"config.{name}={value} must be an int >= 1")
  if d.eval_with_lookup:   # the held-out eval also runs ngram+<draft>
    runtime.validate_lookup(config, hybrid=True)
  for name in ("samples_per_prompt", "num_templated", "num_self_instruct", "head_size",
               "eval_every",
               "eval_max_prompts", "warmup_steps"):
    if int(d[name]) != d[name] or d[name] < 0:
      raise ValueError(f"config.distill.{name}={d[name]} must be an int >= 0")
  if d.seq_len < 2:
    raise ValueError(f"config.distill.seq_len={d.seq_len} must be >= 2")
  if d.draft_kind not in checkpoints.DRAFT_KINDS:
    raise ValueError(f"config.distill.draft_kind={d.draft_kind!r}; expected one of "
                     f"{checkpoints.DRAFT_KINDS}")
  if int(d.unroll) != d.unroll or d.unroll < 1:
    raise ValueError(f"config.distill.unroll={d.unroll} must be an int >= 1")
  if not d.feature_loss_weight >= 0:
    raise ValueError(f"config.distill.feature_loss_weight={d.feature_loss_weight} "
                     "must be >= 0")
  if not d.learning_rate > 0:
    raise ValueError(f"config.distill.learning_rate={d.learning_rate} must be > 0")
  if not 0 <= d.prompt_loss_weight <= 1:
    raise ValueError(f"config.distill.prompt_loss_weight={d.prompt_loss_weight} must be "
                     "in [0, 1]")
  if not d.gen_temperature >= 0:
    raise ValueError(f"config.distill.gen_temperature={d.gen_temperature} must be >= 0")


def _held_out_ids(config, rt, log) -> list:
  prompts = prompts_lib.load_prompts(config.distill.eval_prompts)
  if config.distill.eval_max_prompts:
    prompts = prompts[:config.distill.eval_max_prompts]
  ids = [rt.encode_prompt(p) for p in prompts]
  kept = [x for x in ids if len(x) <= config.max_prompt_len]
  if len(kept) < len(ids):
    log(f"eval: {len(ids) - len(kept)} held-out prompts longer than max_prompt_len skipped")
  return kept


def run_distill(config, workdir: str, log=print, on_checkpoint=None) -> dict:
  """The whole job; returns the summary (also written to summary.json)."""
  validate(config)
  workdir = io.prepare_workdir(workdir)
  d = config.distill
  rt = runtime.build(config, with_drafter=False)
  target_cfg = rt.target.cfg
  draft_cfg = model_lib.draft_config(config, target_cfg)   # vocab check first
  if d.teacher_top_k > target_cfg.vocab_size:
    raise ValueError(f"config.distill.teacher_top_k={d.teacher_top_k} exceeds the "
                     f"vocabulary ({target_cfg.vocab_size})")

  feature = d.draft_kind == checkpoints.FEATURE
  t0 = time.perf_counter()
  examples = data_lib.prepare(config, rt, workdir, log=log, with_features=feature)
  data_s = time.perf_counter() - t0
  log(f"data: {examples.num_examples} sequences, {examples.num_completion_tokens} "
      f"completion + {examples.num_prompt_tokens} prompt tokens ({data_s:.0f}s)")

  scores_V = data_lib.token_scores(examples, target_cfg.vocab_size)
  head_ids, coverage = None, 1.0
  if draft_cfg.head_size:
    head_ids = model_lib.select_head_ids(scores_V, draft_cfg.head_size, rt.eos_ids)
    coverage = float(scores_V[head_ids].sum() / max(scores_V.sum(), 1e-12))
    log(f"head: {draft_cfg.head_size} tokens cover {coverage:.1%} of the target's "
        "top-k probability mass on the training data")
  train_data = data_lib.TrainData.build(
      examples, d.seq_len, model_lib.vocab_to_head(head_ids, target_cfg.vocab_size),
      prompt_weight=d.prompt_loss_weight)
  if feature:
    train_data.features_ET1D = data_lib.window_features(examples, d.seq_len)
    examples.features = None   # the windows are all training needs
    log(f"data: target features of the training windows "
        f"({train_data.features_ET1D.nbytes / 2**20:.0f} MiB)")
  draft_model = checkpoints.draft_model(d.draft_kind, draft_cfg)
  log(f"draft ({d.draft_kind}): {draft_cfg.num_layers} layers, d_model {draft_cfg.d_model}, "
      f"head {draft_cfg.head_size or draft_cfg.vocab_size}, "
      f"{draft_cfg.num_params / 1e6:.1f}M params (target {target_cfg.num_params / 1e6:.1f}M)")

  init = model_lib.init_feature_params if feature else model_lib.init_params
  init_fn = lambda: init(draft_cfg, target_cfg, rt.target_params, head_ids, d,
                         jax.random.PRNGKey(d.seed))
  draft_drafter = drafters.for_draft_model(draft_model)
  lookup_drafter = None
  if d.eval_with_lookup:
    lookup_drafter = drafters.HybridDrafter.wrap(
        drafters.NgramDrafter(max_n=config.decode.ngram_max_n, min_n=config.decode.ngram_min_n),
        draft_drafter, min_match=int(config.decode.lookup_min_match))
  evaluator = evaluate_lib.HeldOutEval(rt, draft_drafter, _held_out_ids(config, rt, log),
                                       d.eval_k, d.eval_max_new_tokens, d.eval_batch_size,
                                       lookup_drafter=lookup_drafter)
  result = train_lib.run_training(
      config, draft_cfg, init_fn, train_data, workdir, examples.fingerprint, log=log,
      evaluate=evaluator, on_checkpoint=on_checkpoint,
      history_file=os.path.join(workdir, "train_log.jsonl"))
  final_eval = result.evals[-1] if result.evals else dict(evaluator(result.params),
                                                          step=result.step)
  summary = {
      "job": "distill", "draft_kind": d.draft_kind, "train_steps": result.step, "resumed_from": result.resumed_from,
      "loss": d.loss, "data_seconds": data_s, "num_sequences": examples.num_examples,
      "num_completion_tokens": examples.num_completion_tokens,
      "num_prompt_tokens": examples.num_prompt_tokens,
      "draft_config": checkpoints.config_dict(draft_cfg),
      "draft_params_millions": draft_cfg.num_params / 1e6,
      "head_coverage": coverage,
      "final_train_metrics": result.history[-1] if result.history else None,
      "tokens_per_s": (float(np.mean([h["tokens_per_s"] for h in result.history]))
                       if result.history else None),
      "evals": result.evals, "acceptance_rate": final_eval["acceptance_rate"],
      "mean_tokens_per_call": final_eval["mean_tokens_per_call"],
      "with_lookup": final_eval.get("with_lookup"),
      "checkpoint_dir": checkpoints.checkpoint_dir(workdir),
  }
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def run(config, workdir: str, log=print) -> dict:
  summary = run_distill(config, workdir, log=log)
  lookup = summary["with_lookup"]
  log(f"distill done: {summary['train_steps']} steps, held-out acceptance "
      f"{summary['acceptance_rate']:.3f}, mean tokens per call "
      f"{summary['mean_tokens_per_call']:.2f}"
      + (f" (behind n-gram lookup: {lookup['acceptance_rate']:.3f}, "
         f"{lookup['mean_tokens_per_call']:.2f}; "
         f"--config.decode.drafter=ngram+{summary['draft_kind']})"
         if lookup else "")
      + f"; use it with --config.decode.drafter={summary['draft_kind']} "
      f"--config.draft_checkpoint={os.path.abspath(workdir)}")
  return summary
