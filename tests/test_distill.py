"""job=distill on tiny models: data, losses, training, resume, restricted head."""

import dataclasses
import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import config_defaults
from specdec_jax import fidelity
from specdec_jax import metrics
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax.distill import checkpoints
from specdec_jax.distill import data as data_lib
from specdec_jax.distill import losses
from specdec_jax.distill import model as model_lib
from specdec_jax.distill import train as train_lib
from specdec_jax.drafters import FeatureDrafter, ModelDrafter
from specdec_jax.generation import Generator
from specdec_jax.jobs import distill as distill_job
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**distill):
  """configs/tiny.py as a quick distillation: short prompts and samples."""
  c = config_defaults.config_from_file(os.path.join(REPO, "configs", "tiny.py"))
  c.job = "distill"
  c.max_prompt_len = 128
  c.distill.train_steps = 8
  d = c.distill
  d.prompts = "builtin"
  d.samples_per_prompt = 4
  d.num_templated = 12
  d.gen_max_new_tokens = 24
  d.seq_len = 160            # >= prompt + completion: the full context is seen
  d.checkpoint_every = 4
  d.log_every = 4
  d.eval_max_new_tokens = 16
  d.eval_max_prompts = 4
  d.eval_at_start = True
  d.update(distill)
  return c


def _quiet(*_):
  pass


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
  """(config, runtime, examples, workdir with data) shared by the tests."""
  workdir = str(tmp_path_factory.mktemp("data"))
  config = _config()
  rt = runtime.build(config, with_drafter=False)
  examples = data_lib.prepare(config, rt, workdir, log=_quiet, with_features=True)
  return config, rt, examples, workdir


def _train_setup(config, rt, examples, head_size=0):
  config.distill.head_size = head_size
  feature = config.distill.draft_kind == "feature"
  if feature:   # a feature draft has the target's width
    for name in ("d_model", "num_heads", "num_kv_heads"):
      config.draft[name] = config.model[name]
  draft_cfg = model_lib.draft_config(config, rt.target.cfg)
  scores = data_lib.token_scores(examples, rt.target.cfg.vocab_size)
  head_ids = (model_lib.select_head_ids(scores, draft_cfg.head_size, rt.eos_ids)
              if draft_cfg.head_size else None)
  train_data = data_lib.TrainData.build(
      examples, config.distill.seq_len, model_lib.vocab_to_head(head_ids, rt.target.cfg.vocab_size))
  if feature:
    train_data.features_ET1D = data_lib.window_features(examples, config.distill.seq_len)
  init = model_lib.init_feature_params if feature else model_lib.init_params
  init_fn = lambda: init(draft_cfg, rt.target.cfg, rt.target_params, head_ids,
                         config.distill, jax.random.PRNGKey(0))
  return draft_cfg, train_data, init_fn, head_ids


def _assert_trees_close(a, b, atol=1e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


# ----- data and losses -----------------------------------------------------------


def test_data_is_cached_and_reused(prepared):
  config, rt, examples, workdir = prepared
  shards = sorted(glob.glob(os.path.join(workdir, "data", "shard-*.npz")))
  assert shards and examples.num_completion_tokens > 0
  mtimes = [os.path.getmtime(s) for s in shards]
  again = data_lib.prepare(config, rt, workdir, log=_quiet)
  assert [os.path.getmtime(s) for s in shards] == mtimes
  for x, y in zip(examples.tokens, again.tokens):
    np.testing.assert_array_equal(x, y)
  # each example is a prompt plus a sampled completion with one teacher row per token
  for toks, start, ids in zip(examples.tokens, examples.loss_start, examples.teacher_ids):
    assert ids.shape == (len(toks) - 1, config.distill.teacher_top_k) and 1 <= start < len(toks)


def test_text_file_windows_are_trained_everywhere(tmp_path, prepared):
  _, rt, _, _ = prepared
  text = tmp_path / "corpus.txt"
  text.write_text("Speculative decoding drafts tokens cheaply. " * 8)
  config = _config(prompts="", num_templated=0, text_file=str(text), seq_len=100)
  examples = data_lib.prepare(config, rt, str(tmp_path / "work"), log=_quiet)
  assert [len(t) for t in examples.tokens] == [100, 100, 100, 52]   # 352 bytes
  assert list(examples.loss_start) == [1, 1, 1, 1]
  assert examples.num_completion_tokens == 348 and examples.num_prompt_tokens == 0


def test_same_model_as_draft_matches_the_teacher(prepared):
  """Alignment check: the target as its own draft has KL 0, TV 0, top-1 1."""
  config, rt, examples, _ = prepared
  config = _config(init_from_target=True)
  config.draft = config.model
  draft_cfg = model_lib.draft_config(config, rt.target.cfg)
  params = model_lib.init_params(draft_cfg, rt.target.cfg, rt.target_params, None,
                                 config.distill, jax.random.PRNGKey(0))
  data = data_lib.TrainData.build(examples, config.distill.seq_len,
                                  model_lib.vocab_to_head(None, rt.target.cfg.vocab_size))
  batch = data.batch(0, 0, 8)
  model = Transformer(draft_cfg)
  seq = batch["tokens_BT"].shape[1]
  logits, _ = model.apply(params, batch["tokens_BT"], jnp.broadcast_to(jnp.arange(seq), (8, seq)),
                          model.init_cache(8, seq), full_vocab=False)
  m = jax.device_get(losses.distill_metrics(logits, batch["teacher_head_BTk"],
                                            batch["teacher_logp_BTk"], batch["mask_BT"]))
  assert m["kl"] < 1e-4 and m["tv"] < 1e-3 and m["top1"] == 1.0


def test_window_features_are_the_targets_hidden_states_at_window_positions(prepared):
  """The features stored with the data (one teacher pass with the top-k) are
  the target's hidden states: index i of an example's window row is the
  feature at absolute position w - 1 + i (w: the window start), zeros before
  the sequence and after it."""
  _, rt, examples, _ = prepared
  seq_len = 20                      # shorter than the examples: windows start at w > 0
  features = data_lib.window_features(examples, seq_len).astype(np.float32)
  short = data_lib.window_features(examples, 400).astype(np.float32)
  for e in (0, 5, len(examples.tokens) - 1):
    toks = np.asarray(examples.tokens[e])
    n = len(toks)
    _, hidden, _ = rt.target.apply_with_hidden(
        rt.target_params, jnp.asarray(toks)[None], jnp.arange(n)[None],
        rt.target.init_cache(1, n))
    hidden = np.asarray(hidden[0])
    w = n - seq_len
    tol = dict(atol=2e-3, rtol=2e-3)   # stored as float16
    np.testing.assert_allclose(features[e], hidden[w - 1:n], **tol)
    np.testing.assert_allclose(short[e, 0], 0.0)                  # position -1
    np.testing.assert_allclose(short[e, 1:n + 1], hidden, **tol)
    np.testing.assert_allclose(short[e, n + 1:], 0.0)


def test_tv_and_kl_match_exact_values_with_full_top_k():
  rng = np.random.default_rng(0)
  vocab = 7
  p_logits, q_logits = rng.normal(size=(2, 3, vocab)), rng.normal(size=(2, 3, vocab))
  logp = jax.nn.log_softmax(p_logits)
  logp_k, ids_k = jax.lax.top_k(logp, vocab)
  m = losses.distill_metrics(jnp.asarray(q_logits), ids_k, logp_k, jnp.ones((2, 3)))
  p, q = np.exp(logp), np.asarray(jax.nn.softmax(q_logits))
  np.testing.assert_allclose(m["tv"], np.mean(1 - np.minimum(p, q).sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(m["kl"], np.mean((p * (np.log(p) - np.log(q))).sum(-1)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="loss"):
    losses.total_loss("l2", m)


def test_batch_order_is_a_function_of_seed_and_step():
  a = [data_lib.batch_indices(3, s, 10, 4) for s in range(5)]
  b = [data_lib.batch_indices(3, s, 10, 4) for s in reversed(range(5))][::-1]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  first_epoch = np.concatenate(a)[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))
  assert not np.array_equal(data_lib.batch_indices(4, 0, 10, 4), a[0])


def test_select_head_ids_keeps_eos_and_the_most_frequent():
  scores = np.array([5.0, 0.0, 3.0, 9.0, 1.0, 0.0])
  np.testing.assert_array_equal(model_lib.select_head_ids(scores, 3, always=(5,)), [0, 3, 5])
  np.testing.assert_array_equal(model_lib.vocab_to_head(np.array([0, 3, 5]), 6),
                                [0, -1, -1, 1, -1, 2])


# ----- training, acceptance, resume ---------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory, prepared):
  """The full job on the tiny target: 60 steps, restricted head of 128.

  The draft has the target's shapes but starts from scratch (a random tiny
  target is easier to imitate with the same capacity).
  """
  _, _, _, data_dir = prepared
  workdir = str(tmp_path_factory.mktemp("trained"))
  shutil.copytree(os.path.join(data_dir, "data"), os.path.join(workdir, "data"))
  config = _config(head_size=128, init_from_target=False, learning_rate=1e-2,
                   prompt_loss_weight=1.0, warmup_steps=5, log_every=10, checkpoint_every=30)
  for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "ffn_dim"):
    config.draft[name] = config.model[name]
  config.distill.train_steps = 60
  summary = distill_job.run_distill(config, workdir, log=_quiet)
  return config, workdir, summary


@pytest.mark.slow
def test_training_reduces_loss_and_raises_acceptance(trained):
  _, _, summary = trained
  evals = summary["evals"]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
  history = _history(trained[1])
  assert history[-1]["loss"] < 0.8 * history[0]["loss"]
  assert evals[-1]["acceptance_rate"] > evals[0]["acceptance_rate"] + 0.05
  assert evals[-1]["mean_tokens_per_call"] > evals[0]["mean_tokens_per_call"]


def _history(workdir):
  import json
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    return [r for r in map(json.loads, f) if "eval" not in r]


def _assert_exact_with_the_jobs_acceptance(config, rt, summary):
  """The restored drafter drafts exactly (greedy output = plain) and reaches
  the acceptance of the job's final held-out evaluation."""
  prompts = distill_job._held_out_ids(config, rt, _quiet)
  gen = Generator(rt.target, rt.drafter, k_max=4, max_prompt_len=128, max_new_tokens=16,
                  batch_size=4, eos_ids=rt.eos_ids)
  rows = gen.generate(rt.target_params, rt.draft_params, prompts).rows
  plain = Generator(rt.target, None, max_prompt_len=128, max_new_tokens=16, batch_size=4,
                    eos_ids=rt.eos_ids).generate(rt.target_params, {}, prompts).rows
  assert [r.output_ids for r in rows] == [r.output_ids for r in plain]
  got = metrics.acceptance_summary(rows, 4)["acceptance_rate"]
  assert got == pytest.approx(summary["acceptance_rate"])


@pytest.mark.slow
def test_restore_latest_draft_builds_the_trained_restricted_drafter(trained):
  config, workdir, summary = trained
  model, params = checkpoints.restore_latest_draft(workdir)
  cfg = model.cfg
  assert isinstance(model, Transformer) and cfg.head_size == 128 and params["lm_head"]["kernel"].shape == (cfg.d_model, 128)
  ids = np.asarray(params["lm_head"]["token_ids"])
  assert len(set(ids.tolist())) == 128 and 257 in ids     # the byte tokenizer's EOS
  config.decode.drafter = "model"
  config.draft_checkpoint = workdir
  rt = runtime.build(config)
  assert isinstance(rt.drafter, ModelDrafter) and rt.drafter.model.cfg == cfg
  # the same acceptance as the job's final evaluation
  _assert_exact_with_the_jobs_acceptance(config, rt, summary)


@pytest.mark.slow
def test_feature_draft_job_raises_acceptance_and_drafts_exactly(tmp_path, prepared):
  """job=distill with draft_kind='feature' on the tiny target: one block of
  the target's width, trained 2 passes deep; then used as the drafter."""
  _, _, _, data_dir = prepared
  workdir = str(tmp_path / "feature")
  shutil.copytree(os.path.join(data_dir, "data"), os.path.join(workdir, "data"))
  shards = sorted(glob.glob(os.path.join(workdir, "data", "shard-*.npz")))
  mtimes = [os.path.getmtime(f) for f in shards]
  config = _config(draft_kind="feature", head_size=128, learning_rate=3e-3, unroll=2,
                   prompt_loss_weight=1.0, warmup_steps=5, log_every=10, checkpoint_every=30)
  for name in ("d_model", "num_heads", "num_kv_heads", "ffn_dim"):
    config.draft[name] = config.model[name]
  config.draft.num_layers = 1
  config.distill.train_steps = 60
  summary = distill_job.run_distill(config, workdir, log=_quiet)
  assert summary["draft_kind"] == "feature"
  evals, history = summary["evals"], _history(workdir)
  assert history[-1]["loss"] < 0.8 * history[0]["loss"]
  assert history[-1]["feature_l1"] < history[0]["feature_l1"]
  assert evals[-1]["acceptance_rate"] > evals[0]["acceptance_rate"] + 0.05

  config.decode.drafter = "feature"
  config.draft_checkpoint = workdir
  rt = runtime.build(config)
  assert isinstance(rt.drafter, FeatureDrafter)
  _assert_exact_with_the_jobs_acceptance(config, rt, summary)
  # a feature checkpoint is not a plain model draft
  config.decode.drafter = "model"
  with pytest.raises(ValueError, match="drafter=feature"):
    runtime.build(config)
  # the features came with the copied data (the model draft's): nothing was remade
  assert shards and [os.path.getmtime(f) for f in shards] == mtimes


def test_feature_draft_init_has_the_drafts_dtypes(prepared):
  """The target's embedding, norm and head rows are cast to the draft's dtype:
  restore checks the stored dtypes against the draft's config."""
  config, rt, _, _ = prepared
  config = _config(draft_kind="feature", head_size=32)
  for name in ("d_model", "num_heads", "num_kv_heads"):
    config.draft[name] = config.model[name]
  config.draft.dtype = "bfloat16"
  draft_cfg = model_lib.draft_config(config, rt.target.cfg)
  params = model_lib.init_feature_params(draft_cfg, rt.target.cfg, rt.target_params,
                                         np.arange(32), config.distill, jax.random.PRNGKey(0))
  expected = checkpoints.draft_model("feature", draft_cfg).expected_params_shapes()
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  assert got == jax.tree.map(lambda e: (e.shape, e.dtype), expected)


def test_checkpoints_from_before_draft_kinds_are_model_drafts():
  assert checkpoints.meta_field({"step": 3}, "draft_kind") == "model"
  assert checkpoints.meta_field({"draft_kind": "feature"}, "draft_kind") == "feature"
  assert checkpoints.meta_field({}, "frozen") is None


def test_feature_draft_must_have_the_target_width(tmp_path):
  config = _config(draft_kind="feature")      # tiny: draft width 32, target 64
  with pytest.raises(ValueError, match="d_model"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)
  with pytest.raises(ValueError, match="draft_kind"):
    distill_job.run_distill(_config(draft_kind="eagle"), str(tmp_path), log=_quiet)
  with pytest.raises(ValueError, match="unroll"):
    distill_job.run_distill(_config(draft_kind="feature", unroll=0), str(tmp_path), log=_quiet)


class _Killed(Exception):
  pass


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "feature"])
def test_interrupted_run_resumes_to_the_same_params(tmp_path, prepared, kind):
  config, rt, examples, _ = prepared
  config = _config(head_size=64, checkpoint_every=3, keep_checkpoints=2, draft_kind=kind,
                   unroll=2)
  config.distill.train_steps = 8
  draft_cfg, data, init_fn, _ = _train_setup(config, rt, examples, head_size=64)

  def run(workdir, on_checkpoint=None):
    return train_lib.run_training(config, draft_cfg, init_fn, data, str(workdir), "fp",
                                  log=_quiet, on_checkpoint=on_checkpoint)

  straight = run(tmp_path / "a")

  def kill_at_6(step):
    if step == 6:
      raise _Killed()

  with pytest.raises(_Killed):
    run(tmp_path / "b", kill_at_6)
  resumed = run(tmp_path / "b")
  assert resumed.resumed_from == 6 and resumed.step == 8
  _assert_trees_close(resumed.params, straight.params)
  model, params = checkpoints.restore_latest_draft(str(tmp_path / "b"))
  assert model.cfg == draft_cfg
  _assert_trees_close(params, straight.params)

  # a rerun with other data (or seed) refuses the checkpoints
  with pytest.raises(ValueError, match="another run"):
    train_lib.run_training(config, draft_cfg, init_fn, data, str(tmp_path / "b"), "other",
                           log=_quiet)


# ----- restricted head: exactness ------------------------------------------------------


def _tiny_vocab_models(head_ids):
  """A 6-token random target and, as draft, the same model restricted to a head.

  The draft agrees with the target where the target's choice is in the head
  and can never propose the others: acceptances and rejections both happen.
  """
  target_cfg = ModelConfig(vocab_size=6, num_layers=2, d_model=16, num_heads=2,
                           num_kv_heads=1, head_dim=8, ffn_dim=32)
  draft_cfg = dataclasses.replace(target_cfg, tie_embeddings=False, head_size=len(head_ids))
  target, draft = Transformer(target_cfg), Transformer(draft_cfg)
  tp = jax.jit(lambda k: target.init_params(k, logit_scale=1.5))(jax.random.PRNGKey(100))
  ids = jnp.asarray(head_ids, jnp.int32)
  dp = dict(tp, lm_head={"kernel": tp["embed"]["embedding"][ids].T, "token_ids": ids})
  return target, tp, draft, dp


def test_restricted_head_logits_are_minus_inf_off_the_head():
  _, _, draft, dp = _tiny_vocab_models([0, 2, 5])
  tokens = jnp.array([[0, 1, 2]])
  logits_BTV, _ = draft.apply(dp, tokens, jnp.arange(3)[None], draft.init_cache(1, 3))
  head_BTN, _ = draft.apply(dp, tokens, jnp.arange(3)[None], draft.init_cache(1, 3),
                            full_vocab=False)
  assert logits_BTV.shape == (1, 3, 6) and head_BTN.shape == (1, 3, 3)
  assert np.all(np.isneginf(np.asarray(logits_BTV)[..., [1, 3, 4]]))
  np.testing.assert_array_equal(np.asarray(logits_BTV)[..., [0, 2, 5]], np.asarray(head_BTN))
  with pytest.raises(ValueError, match="tie_embeddings"):
    ModelConfig(vocab_size=6, num_layers=1, d_model=8, num_heads=2, num_kv_heads=1,
                head_dim=4, ffn_dim=16, head_size=3)
  with pytest.raises(ValueError, match="head_size"):
    ModelConfig(vocab_size=6, num_layers=1, d_model=8, num_heads=2, num_kv_heads=1,
                head_dim=4, ffn_dim=16, tie_embeddings=False, head_size=7)


def test_restricted_head_greedy_is_identical_to_plain_decoding():
  target, tp, draft, dp = _tiny_vocab_models([0, 2, 5])
  prompts = [[0, 1, 2], [3, 4], [5, 5, 1, 0]]
  spec = Generator(target, ModelDrafter(draft), k_max=3, max_prompt_len=8, max_new_tokens=12,
                   batch_size=3).generate(tp, dp, prompts).rows
  plain = Generator(target, None, max_prompt_len=8, max_new_tokens=12,
                    batch_size=3).generate(tp, {}, prompts).rows
  assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
  accepted = sum(sum(r.accepted_by_slot) for r in spec)
  assert 0 < accepted < sum(sum(r.reached_by_slot) for r in spec)


def test_restricted_head_rejection_sampling_is_exact():
  target, tp, draft, dp = _tiny_vocab_models([0, 2, 5])
  prompt, num_tokens, n = [0, 1, 2], 3, 12000
  sp = sampling.SamplingParams.create(1.0, 0, 1.0)
  expected = fidelity.exact_sequence_probs(target, tp, prompt, num_tokens, sp)
  gen = Generator(target, ModelDrafter(draft), k_max=2, rule="rejection", max_prompt_len=8,
                  max_new_tokens=num_tokens, batch_size=2000)
  samples = []
  for start in range(0, n, 2000):
    rows = gen.generate(tp, dp, [prompt] * 2000, seeds=list(range(start, start + 2000)),
                        temperature=1.0).rows
    samples.extend(tuple(r.output_ids) for r in rows)
  stats = fidelity.chi_square_test(samples, expected)
  assert stats["p_value"] > 0.001 and stats["impossible_samples"] == 0
  # drafts came only from the head, and some were accepted
  assert sum(sum(r.accepted_by_slot) for r in rows) > 0


# ----- bad input ---------------------------------------------------------------------


def test_draft_vocab_must_match_the_target(tmp_path):
  config = _config()
  config.draft.vocab_size = 300
  with pytest.raises(ValueError, match="vocab"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)


def test_empty_dataset_is_refused(tmp_path):
  config = _config(prompts="", num_templated=0)
  with pytest.raises(ValueError, match="empty"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)
  config = _config()
  config.max_prompt_len = 4      # nothing fits
  with pytest.raises(ValueError, match="empty"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)
  config = _config(text_file=str(tmp_path / "missing.txt"))
  with pytest.raises(ValueError, match="text_file"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)


def test_bad_distill_settings_are_refused(tmp_path):
  with pytest.raises(ValueError, match="distill.loss"):
    distill_job.run_distill(_config(loss="mse"), str(tmp_path), log=_quiet)
  config = _config()
  config.distill.train_steps = 0
  with pytest.raises(ValueError, match="train_steps"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)
  # The held-out eval's ngram+<draft> settings are checked before any data is made.
  config = _config()
  config.decode.lookup_min_match = config.decode.ngram_max_n + 1
  with pytest.raises(ValueError, match="lookup_min_match"):
    distill_job.run_distill(config, str(tmp_path), log=_quiet)
  assert not os.path.exists(os.path.join(tmp_path, "data"))


def test_data_from_other_settings_is_refused(tmp_path, prepared):
  config, rt, _, data_dir = prepared
  shutil.copytree(os.path.join(data_dir, "data"), os.path.join(tmp_path, "data"))
  other = _config(gen_temperature=0.5)
  with pytest.raises(ValueError, match="other settings"):
    data_lib.prepare(other, rt, str(tmp_path), log=_quiet)
  shard = sorted(glob.glob(os.path.join(tmp_path, "data", "shard-*.npz")))[0]
  with open(shard, "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="damaged"):
    data_lib.prepare(config, rt, str(tmp_path), log=_quiet)


@pytest.fixture(scope="session")
def checkpointed(tmp_path_factory, prepared):
  """A workdir with a 2-step checkpoint of a restricted-head draft."""
  _, rt, examples, _ = prepared
  config = _config(head_size=64, checkpoint_every=2)
  config.distill.train_steps = 2
  draft_cfg, data, init_fn, _ = _train_setup(config, rt, examples, head_size=64)
  workdir = str(tmp_path_factory.mktemp("checkpointed"))
  result = train_lib.run_training(config, draft_cfg, init_fn, data, workdir, "fp", log=_quiet)
  return workdir, draft_cfg, result.params


def test_restore_latest_draft_round_trip(checkpointed, caplog):
  workdir, draft_cfg, params = checkpointed
  with caplog.at_level(logging.WARNING):
    model, restored = checkpoints.restore_latest_draft(workdir)
  # A reader's manager warns about nothing (a sweep restores once per point).
  assert not [r for r in caplog.records if "orbax" in r.pathname], caplog.text
  cfg = model.cfg
  assert cfg == draft_cfg and cfg.head_size == 64
  _assert_trees_close(restored, params, atol=0)
  # the checkpoints folder itself works too
  assert checkpoints.restore_latest_draft(os.path.join(workdir, "checkpoints"))[0].cfg == cfg


def test_missing_or_corrupted_checkpoint_is_refused(tmp_path, checkpointed):
  """Each damage on its own (the params, then the metadata) is refused with
  its own message; an empty folder and a missing one too."""
  with pytest.raises(ValueError, match="does not exist"):
    checkpoints.restore_latest_draft(str(tmp_path / "nothing"))

  def copy(name):
    folder = str(tmp_path / name)
    shutil.copytree(checkpointed[0], folder)
    return folder, os.path.join(folder, "checkpoints", "2")

  truncated, step_dir = copy("truncated_params")
  for path in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 200:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=r"draft checkpoint .* could not be (read|restored)"):
    checkpoints.restore_latest_draft(truncated)

  bad_meta, step_dir = copy("bad_meta")
  meta = [m for m in glob.glob(os.path.join(step_dir, "meta", "*")) if os.path.isfile(m)]
  with open(meta[0], "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="unreadable metadata"):
    checkpoints.restore_latest_draft(bad_meta)

  # Not vacuous: the undamaged copy restores.
  assert checkpoints.restore_latest_draft(copy("intact")[0])[0].cfg == checkpointed[1]
  empty = tmp_path / "empty" / "checkpoints"
  empty.mkdir(parents=True)
  with pytest.raises(ValueError, match="no complete draft checkpoint"):
    checkpoints.restore_latest_draft(str(tmp_path / "empty"))
