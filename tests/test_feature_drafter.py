"""The feature drafter (EAGLE-style): exactness against plain decoding, the
feature and cache invariants it relies on, rejection-sampling fidelity with a
restricted head, and no recompiles."""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import FEATURE_DRAFT as DRAFT
from common import K_MAX, MAX_NEW, TARGET, VOCAB, feature_params, init, make_prompts, outputs
from common import generator as gen
from common import assert_close_in_float32, tiny_config, total_accepted
from specdec_jax import compile_count
from specdec_jax import decode
from specdec_jax import fidelity
from specdec_jax import metrics
from specdec_jax import sampling
from specdec_jax.drafters import FeatureDrafter
from specdec_jax.drafters.feature_drafter import _prev_features
from specdec_jax.generation import Generator
from specdec_jax.jobs.fidelity import draft_counts
from specdec_jax.kernels import build as kernel_build
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft
from specdec_jax.models.transformer import Transformer

NOISE = 0.12   # perturbation of an exact copy's fusion layer: partial acceptance


def target_params(seed):
  return init(TARGET, seed)


def draft_params(seed, tp, scale=0.2):
  """A random feature draft over the target's embedding."""
  return feature_params(seed, tp, scale)


# ----------------------------------------------------------------------------
# Greedy speculative with a feature draft == greedy plain.

def test_greedy_feature_drafts_equal_plain_and_never_recompile():
  before = None
  for seed in range(2):
    tp = target_params(seed)
    dp = draft_params(100 + seed, tp)
    prompts = make_prompts(seed)
    max_new = [MAX_NEW, 7, MAX_NEW, 1 + seed, 11]
    ref = outputs(gen("plain", 5).generate(tp, None, prompts, max_new_tokens=max_new))
    for k in (1, 3, K_MAX):
      result = gen("feature", 5).generate(tp, dp, prompts, k=k, max_new_tokens=max_new)
      assert outputs(result) == ref, f"seed {seed} K={k}"
      alone = gen("feature", 1).generate(tp, dp, [prompts[2]], k=k,
                                         max_new_tokens=max_new[2]).rows[0]
      assert alone.output_ids == ref[2], f"seed {seed} K={k} (batch 1)"
    if seed == 0:
      before = compile_count.loop_compiles()
  assert compile_count.loop_compiles() == before


def _copy_of_one_layer_target(seed):
  """A one-layer target and a feature draft that computes exactly its
  features: the fusion layer passes the (normalised) token embedding through
  and the block, final norm and head are the target's. The target's
  embedding rows have RMS 1, so normalising them changes nothing."""
  cfg = ModelConfig(vocab_size=VOCAB, num_layers=1, d_model=64, num_heads=4,
                    num_kv_heads=2, head_dim=16, ffn_dim=128)
  target = Transformer(cfg)
  tp = jax.jit(target.init_params)(jax.random.PRNGKey(seed))
  embedding = tp["embed"]["embedding"]
  embedding = embedding / jnp.sqrt(jnp.mean(embedding ** 2, axis=-1, keepdims=True))
  tp = dict(tp, embed={"embedding": embedding})
  draft = FeatureDraft(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}))
  dp = {"embed": tp["embed"], "layers": tp["layers"], "final_norm": tp["final_norm"],
        "embed_norm": {"scale": jnp.ones((64,))}, "feature_norm": {"scale": jnp.ones((64,))},
        "lm_head": {"kernel": tp["embed"]["embedding"].T},
        "fc": {"kernel": jnp.concatenate([jnp.eye(64), jnp.zeros((64, 64))], axis=0),
               "bias": jnp.zeros((64,))}}
  return target, tp, draft, dp


def test_exact_copy_is_accepted_at_every_slot():
  """Catches any misalignment of the draft's positions and tokens: a draft
  that reproduces the target's features must have every draft accepted."""
  target, tp, draft, dp = _copy_of_one_layer_target(3)
  prompts = make_prompts(7)
  plain = Generator(target, None, max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=5)
  ref = outputs(plain.generate(tp, None, prompts))
  spec = Generator(target, FeatureDrafter(draft), k_max=4, max_prompt_len=16,
                   max_new_tokens=MAX_NEW, batch_size=5)
  result = spec.generate(tp, dp, prompts, k=4)
  assert outputs(result) == ref
  for row in result.rows:
    assert row.accepted_per_step[:-1] == [4] * (len(row.accepted_per_step) - 1)
    assert row.target_calls == math.ceil(MAX_NEW / 5)
  assert metrics.acceptance_summary(result.rows, 4)["acceptance_rate"] == 1.0


def test_greedy_with_a_partly_right_draft_equals_plain():
  """A perturbed exact copy: drafts are both accepted and rejected, beyond
  the first slot too, and the output is still plain greedy's."""
  target, tp, draft, dp = _copy_of_one_layer_target(4)
  noise = jax.random.normal(jax.random.PRNGKey(0), dp["fc"]["kernel"].shape) * NOISE
  dp = dict(dp, fc={"kernel": dp["fc"]["kernel"] + noise, "bias": dp["fc"]["bias"]})
  prompts = make_prompts(8)
  plain = Generator(target, None, max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=5)
  spec = Generator(target, FeatureDrafter(draft), k_max=4, max_prompt_len=16,
                   max_new_tokens=MAX_NEW, batch_size=5)
  ref = outputs(plain.generate(tp, None, prompts))
  result = spec.generate(tp, dp, prompts, k=4)
  assert outputs(result) == ref
  accepted = np.sum([r.accepted_by_slot for r in result.rows], axis=0)
  reached = np.sum([r.reached_by_slot for r in result.rows], axis=0)
  assert accepted[1] > 0 and np.sum(reached - accepted) > 10, (accepted, reached)


# ----------------------------------------------------------------------------
# The invariants: recorded features and the resynced draft cache.

@functools.partial(jax.jit, static_argnums=4)
def _reference_drafts(dp, tokens_T, hidden_TD, n, k):
  """Greedy feature drafts after the first n tokens, computed step by step
  from one fresh cache (fixed shapes: positions >= n are padding, and a
  query never reads a slot above its own position)."""
  width = tokens_T.shape[0]
  prev_TD = jnp.concatenate([jnp.zeros_like(hidden_TD[:1]), hidden_TD[:-1]])
  g_1TD, cache = DRAFT.hidden(dp, tokens_T[None], prev_TD[None], jnp.arange(width)[None],
                              DRAFT.init_cache(1, width + k))
  g_11D = jax.lax.dynamic_slice_in_dim(g_1TD, n - 1, 1, axis=1)
  drafts = [jnp.argmax(DRAFT.logits(dp, g_11D)[0, 0])]
  for i in range(1, k):
    g_11D, cache = DRAFT.hidden(dp, drafts[-1].reshape(1, 1), g_11D,
                                jnp.reshape(n - 1 + i, (1, 1)), cache)
    drafts.append(jnp.argmax(DRAFT.logits(dp, g_11D)[0, 0]))
  return jnp.stack(drafts)


@jax.jit
def _teacher_forced(tp, dp, tokens_BS):
  """The target's features of the whole buffer, and the draft's cache after
  one pass over it with those features (causal: padding is never read)."""
  batch, width = tokens_BS.shape
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  _, hidden, _ = TARGET.apply_with_hidden(tp, tokens_BS, positions,
                                          TARGET.init_cache(batch, width))
  prev = _prev_features(jnp.pad(hidden, ((0, 0), (0, 1), (0, 0))), positions)
  cache = DRAFT.hidden(dp, tokens_BS, prev, positions, DRAFT.init_cache(batch, width))[1]
  return hidden, cache


def test_features_and_draft_cache_match_teacher_forcing():
  """After any number of steps, the recorded features below length-1 are the
  target's features of the committed text; after a propose the draft's cache
  below length holds what one teacher-forced draft pass over the committed
  text (with the target's features) computes, and its drafts are what a
  step-by-step reference that feeds back its own estimates drafts."""
  tp = target_params(11)
  dp = draft_params(12, tp)
  prompts = make_prompts(13)
  batch = len(prompts)
  g = gen("feature", batch)
  spec = g.spec(greedy=True)
  drafter = g.drafter
  req = g.request(prompts, max_new_tokens=MAX_NEW, k=3, tau=0.5, budget=8)
  run = req.run
  state = jax.jit(functools.partial(decode.prefill, spec, TARGET, drafter))(
      tp, dp, req.requests, run)
  draft_fn = jax.jit(functools.partial(decode.draft_phase, spec, drafter))
  verify_fn = jax.jit(functools.partial(decode.verify_phase, spec, TARGET, drafter))
  for step in range(4):
    drafted, state = draft_fn(dp, state, run)    # propose resyncs the draft cache
    length = np.asarray(state.length_B)
    tokens = np.asarray(state.tokens_BS)
    hidden, forced_cache = _teacher_forced(tp, dp, jnp.asarray(tokens))
    recorded = np.asarray(state.drafter_state.features_BSD)
    k_cache = np.asarray(state.drafter_state.cache.k_LBSGH)
    for b in range(batch):
      n = int(length[b])
      assert_close_in_float32(recorded[b, :n - 1], np.asarray(hidden[b, :n - 1]),
                              what=f"features, step {step} row {b}")
      assert_close_in_float32(k_cache[:, b, :n], np.asarray(forced_cache.k_LBSGH[:, b, :n]),
                              what=f"draft cache, step {step} row {b}")
      # the drafts: slot 0 from the last committed position, then each step
      # feeding back the previous estimate g
      reference = _reference_drafts(dp, jnp.asarray(tokens[b]), hidden[b], n, 3)
      assert np.asarray(drafted.draft_BK)[b, :3].tolist() == np.asarray(reference).tolist(), (
          f"drafts, step {step} row {b}")
    proposal, state = draft_fn(dp, state, run)
    state = verify_fn(tp, state, proposal, run)
  assert (np.asarray(state.length_B) >= np.asarray(req.requests.prompt_len_B) + 4).all()


# ----------------------------------------------------------------------------
# Sampling.

def test_coupled_feature_drafts_equal_plain_sampling():
  tp = target_params(21)
  dp = draft_params(22, tp, scale=0.05)
  prompts = make_prompts(23)
  seeds = [5, 6, 7, 8, 9]
  for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
    ref = outputs(gen("plain", 5).generate(tp, None, prompts, seeds=seeds,
                                           temperature=temperature, top_p=top_p))
    result = gen("feature", 5, "coupled").generate(tp, dp, prompts, seeds=seeds, k=3,
                                                   temperature=temperature, top_p=top_p)
    assert outputs(result) == ref, (temperature, top_p)
    assert total_accepted(result) > 0, (temperature, top_p)


@pytest.mark.slow
def test_rejection_with_restricted_feature_head_preserves_distribution():
  """Chi-square test of 10k speculative 3-token samples (K=2, so bonus tokens
  are among them) against the exact warped target distribution (vocab 6; the
  draft's head covers 4 tokens, so q = 0 on the other 2)."""
  vocab, num_tokens, n = 6, 3, 10_000
  tcfg = ModelConfig(vocab_size=vocab, num_layers=2, d_model=16, num_heads=2,
                     num_kv_heads=1, head_dim=8, ffn_dim=32)
  target = Transformer(tcfg)
  tp = init(target, 100, logit_scale=1.5)
  draft = FeatureDraft(ModelConfig(vocab_size=vocab, num_layers=1, d_model=16, num_heads=2,
                                   num_kv_heads=1, head_dim=8, ffn_dim=32,
                                   tie_embeddings=False, head_size=4))
  dp = init(draft, 200, init_scale=0.3)
  dp["embed"] = tp["embed"]
  dp["lm_head"]["token_ids"] = jnp.asarray([0, 2, 3, 5], jnp.int32)
  prompt = [0, 1, 2]
  sp = sampling.SamplingParams.create(0.8, 0, 1.0)
  expected = fidelity.exact_sequence_probs(target, tp, prompt, num_tokens, sp)
  g = Generator(target, FeatureDrafter(draft), k_max=2, max_prompt_len=4,
                max_new_tokens=num_tokens, batch_size=2000)
  samples, counts = [], collections.Counter()
  for start in range(0, n, 2000):
    result = g.generate(tp, dp, [prompt] * 2000, seeds=list(range(start, start + 2000)),
                        k=2, temperature=0.8)
    samples.extend(tuple(r.output_ids) for r in result.rows)
    for row in result.rows:
      counts.update(draft_counts(row))
  stats = fidelity.chi_square_test(samples, expected)
  assert stats["impossible_samples"] == 0
  assert stats["p_value"] > 1e-3, stats
  # Drafts really were accepted and rejected, and bonus tokens drawn.
  assert counts["accepted"] > n // 4, counts
  assert counts["proposed"] - counts["accepted"] > n // 4, counts
  assert counts["bonus_tokens"] > n // 50, counts


def test_draft_tree_steps_record_the_accepted_paths_features():
  """With draft trees the features of the accepted path come from the tree's
  verify pass, whose nodes are not in position order: after each step the
  recorded features below length-1 must still be the target's features of
  the committed text (a one-layer target and its exact feature copy, so
  that paths several nodes deep are accepted)."""
  target, tp, draft, dp = _copy_of_one_layer_target(5)
  prompts = make_prompts(14)
  batch = len(prompts)
  g = Generator(target, FeatureDrafter(draft), k_max=3, max_prompt_len=16,
                max_new_tokens=MAX_NEW, batch_size=batch, tree_nodes=6, tree_topk=2)
  spec = g.spec(greedy=True)
  req = g.request(prompts, max_new_tokens=MAX_NEW, k=3)
  state = jax.jit(functools.partial(decode.prefill, spec, target, g.drafter))(
      tp, dp, req.requests, req.run)
  step_fn = jax.jit(functools.partial(decode.step, spec, target, g.drafter))
  accepted = 0
  for step in range(4):
    before = np.asarray(state.length_B)
    state = step_fn(tp, dp, state, req.run)
    length = np.asarray(state.length_B)
    accepted += int(np.sum(length - before - 1))
    tokens = state.tokens_BS
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    _, hidden, _ = target.apply_with_hidden(tp, tokens, positions,
                                            target.init_cache(batch, tokens.shape[1]))
    recorded = np.asarray(state.drafter_state.features_BSD)
    for b in range(batch):
      n = int(length[b])
      assert_close_in_float32(recorded[b, :n - 1], np.asarray(hidden[b, :n - 1]),
                              what=f"features, step {step} row {b}")
  assert accepted >= 2 * 4 * batch   # paths deeper than one node were accepted


# ----------------------------------------------------------------------------
# On the CPU kernels (what runtime picks for an unrolled float32 draft on the CPU).

@pytest.mark.skipif(not kernel_build.available(), reason="the CPU kernels do not build here")
def test_feature_draft_on_the_kernels_computes_what_xla_does():
  """The fusion layer, the block (its products and attention) and the
  restricted head run on the kernels and give XLA's features and logits;
  the XLA draft's program has no kernel call (the count can fail)."""
  tp = target_params(4)
  stacked = draft_params(5, tp)
  on_xla = FeatureDraft(DRAFT.cfg, "unrolled", matmul="xla")
  on_kernels = FeatureDraft(DRAFT.cfg, "unrolled", matmul="kernel")
  rng = np.random.default_rng(6)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(1, 5)), jnp.int32)
  feats = jnp.asarray(rng.standard_normal((1, 5, DRAFT.cfg.d_model)), jnp.float32)
  positions = jnp.arange(5, dtype=jnp.int32)[None]

  def run(model):
    params = model.prepare_params(stacked)
    fn = jax.jit(lambda p, c: (lambda g, c2: (g, model.logits(p, g, full_vocab=False)))(
        *model.hidden(p, tokens, feats, positions, c)))
    cache = model.init_cache(1, 16)
    text = fn.lower(params, cache).as_text()
    return fn(params, cache), text

  (g_xla, logits_xla), text_xla = run(on_xla)
  (g_kernel, logits_kernel), text_kernel = run(on_kernels)
  assert_close_in_float32(g_kernel, g_xla, what="features on the kernels")
  assert_close_in_float32(logits_kernel, logits_xla, what="logits on the kernels")
  # fc, q/k/v/o, gate/up, down, head: products; one attention per layer.
  assert text_kernel.count("specdec_rows_matmul") >= 3
  assert "specdec_decode_attention" in text_kernel
  assert "specdec_rows_matmul" not in text_xla and "specdec_decode_attention" not in text_xla


@pytest.mark.skipif(not kernel_build.available(), reason="the CPU kernels do not build here")
def test_runtime_runs_a_feature_draft_on_the_kernels_and_stays_exact():
  """configs/tiny.py with drafter=feature: the runtime gives the draft the
  kernels (matmul auto), and greedy speculative output equals plain, chains
  and trees alike."""
  from specdec_jax import runtime
  rt = runtime.build(tiny_config(**{"decode.drafter": "feature", "decode.policy": "fixed",
                                    "sampling.temperature": 0.0, "decode.k": 3,
                                    "max_new_tokens": 12, "batch_size": 2}))
  assert rt.drafter.model.matmul == "kernel" and rt.target.matmul == "kernel"
  assert "kernel_t" in rt.draft_params["fc"] and "kernel_t" in rt.draft_params["lm_head"]
  prompts = [rt.encode_prompt(p) for p in runtime.load_prompt_list(rt.config)[:2]]
  plain = rt.generator(baseline=True).generate(rt.target_params, None, prompts, seeds=[0, 1])
  for overrides in ({}, {"tree_nodes": 4, "tree_topk": 2}):
    spec = rt.generator(**overrides).generate(rt.target_params, rt.draft_params, prompts,
                                              seeds=[0, 1], **rt.run_kwargs())
    assert outputs(spec) == outputs(plain), overrides
