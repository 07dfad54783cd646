"""drafter=ngram+model / ngram+feature: prompt lookup where the text ends in a
repeated n-gram, the draft model elsewhere. The choice per row, exactness
against plain decoding (greedy and coupled sampling), rejection-sampling
fidelity, config checks and no recompiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import DRAFT, DRAFTERS, K_MAX, LOOKUP, MAX_NEW, TARGET, VOCAB, init, make_prompts
from common import draft_params as draft_params_for
from common import generator as gen
from common import load_config, outputs, total_accepted
from specdec_jax import compile_count
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax.drafters import HybridDrafter, ModelDrafter
from specdec_jax.drafters.base import DraftContext
from specdec_jax.jobs.fidelity import run_fidelity
from test_ngram_drafter import reference_proposal

HYBRIDS = {kind: DRAFTERS[kind] for kind in ("ngram+model", "ngram+feature")}


def match_length(text, max_n, min_n):
  """The n of the n-gram lookup's match for ``text`` (0: none), by hand."""
  for n in range(max_n, min_n - 1, -1):
    if len(text) > n and any(text[s:s + n] == text[-n:] for s in range(len(text) - n - 1 + 1)
                             if s + n <= len(text) - 1):
      return n
  return 0


def params(seed):
  tp = init(TARGET, seed)
  return tp, {kind: draft_params_for(kind, 100 + seed, tp) for kind in HYBRIDS}


def _context(tokens_rows, k, greedy=True, width=None):
  """A DraftContext over right-padded committed texts."""
  width = width or max(len(t) for t in tokens_rows) + k + 2
  tokens = np.zeros((len(tokens_rows), width), np.int32)
  for b, t in enumerate(tokens_rows):
    tokens[b, :len(t)] = t
  return DraftContext(
      tokens_BS=jnp.asarray(tokens), length_B=jnp.asarray([len(t) for t in tokens_rows], jnp.int32),
      keys_B2=jax.vmap(jax.random.PRNGKey)(jnp.arange(len(tokens_rows))),
      sampling=sampling.SamplingParams.create(0.0 if greedy else 1.0, 0, 1.0),
      max_k_B=jnp.full((len(tokens_rows),), k, jnp.int32), min_confidence=jnp.float32(0.0))


@pytest.mark.parametrize("greedy", [True, False])
def test_each_row_takes_lookup_or_model_drafts(greedy):
  """A row whose text ends in a repeated 2-gram gets the lookup's drafts (and
  a one-hot q); a row with only a 1-gram match, or none, gets the model's."""
  tp, dps = params(0)
  dp = dps["ngram+model"]
  k = 4
  rows = [[5, 6, 7, 8, 9, 5, 6],          # "5 6" seen before: lookup proposes 7 8 9 5
          [1, 2, 3, 4, 1],                # only the 1-gram "1" repeats: model
          [10, 11, 12, 13, 14]]           # no match: model
  hybrid = HYBRIDS["ngram+model"]
  model_drafter = hybrid.draft
  ctx = _context(rows, k, greedy)
  state = model_drafter.init_state(3, ctx.tokens_BS.shape[1])
  positions = jnp.broadcast_to(jnp.arange(ctx.tokens_BS.shape[1]), ctx.tokens_BS.shape)
  state = model_drafter.prefill(dp, state, ctx.tokens_BS, positions)
  purpose = sampling.DRAFT
  propose = lambda drafter: jax.jit(functools.partial(
      drafter.propose, k=k, greedy=greedy, purpose=purpose))(dp, state, ctx)[0]
  got, alone = propose(hybrid), propose(model_drafter)
  draft = np.asarray(got.draft_BK)
  assert draft[0].tolist() == [7, 8, 9, 5]
  assert int(got.num_proposed_B[0]) == 4
  np.testing.assert_array_equal(draft[1:], np.asarray(alone.draft_BK)[1:])
  np.testing.assert_array_equal(np.asarray(got.num_proposed_B)[1:],
                                np.asarray(alone.num_proposed_B)[1:])
  assert np.asarray(alone.draft_BK)[0].tolist() != [7, 8, 9, 5]   # not vacuous
  if greedy:
    assert got.q_BKV is None
  else:
    q = np.asarray(got.q_BKV)
    np.testing.assert_array_equal(q[0], np.eye(VOCAB, dtype=np.float32)[[7, 8, 9, 5]])
    np.testing.assert_allclose(q[1:], np.asarray(alone.q_BKV)[1:])
  # min_match=1: the 1-gram match of row 1 now takes the lookup.
  loose = dataclasses.replace(hybrid, min_match=1)
  got1 = propose(loose)
  assert np.asarray(got1.draft_BK)[1].tolist() == [2, 3, 4, 1]
  assert int(got1.num_proposed_B[1]) == 4


def test_model_cache_holds_committed_lookup_drafts():
  """A lookup step commits 4 drafts the draft model never fed; on the next
  step (no n-gram match, so the model drafts) its drafts must be those of
  the model rerun from scratch on the committed text."""
  _, dps = params(1)
  dp, k = dps["ngram+model"], 4
  hybrid = HYBRIDS["ngram+model"]
  before = [5, 6, 7, 8, 9, 5, 6]
  ctx = _context([before], k, width=32)
  state = hybrid.init_state(1, 32)
  positions = jnp.arange(ctx.tokens_BS.shape[1])[None]
  state = hybrid.prefill(dp, state, ctx.tokens_BS, positions)
  propose = jax.jit(functools.partial(hybrid.propose, k=k, greedy=True, purpose=sampling.DRAFT))
  first, state = propose(dp, state, ctx)
  assert np.asarray(first.draft_BK)[0].tolist() == [7, 8, 9, 5]      # the lookup's
  after = before + [7, 8, 9, 5, 42]       # all 4 accepted, then the target's 42
  second, _ = propose(dp, state, _context([after], k, width=ctx.tokens_BS.shape[1]))
  assert np.asarray(second.draft_BK)[0].tolist() == reference_model_drafts(dp, after, k)


@pytest.mark.parametrize("kind", list(HYBRIDS))
def test_greedy_hybrid_equals_plain_and_never_recompiles(kind):
  before = None
  for seed in range(2):
    tp, dps = params(seed)
    prompts = make_prompts(seed)
    max_new = [MAX_NEW, 9, MAX_NEW, 1 + seed, 13]
    ref = outputs(gen("plain", 5).generate(tp, None, prompts, max_new_tokens=max_new))
    for k in (1, 3, K_MAX):
      result = gen(kind, 5).generate(tp, dps[kind], prompts, k=k, max_new_tokens=max_new)
      assert outputs(result) == ref, f"{kind} seed {seed} K={k}"
      alone = gen(kind, 1).generate(tp, dps[kind], [prompts[1]], k=k,
                                    max_new_tokens=max_new[1]).rows[0]
      assert alone.output_ids == ref[1], f"{kind} seed {seed} K={k} (batch 1)"
    if seed == 0:
      before = compile_count.loop_compiles()
  assert compile_count.loop_compiles() == before


REFERENCE_WIDTH = 64


@jax.jit
def _draft_logits_at(dp, tokens_1W, last):
  """The draft model's next-token logits after tokens[:last + 1], by one
  cache-free forward over a padded row (causal: the padding is never read)."""
  positions = jnp.arange(REFERENCE_WIDTH)[None]
  logits, _ = DRAFT.apply(dp, tokens_1W, positions, DRAFT.init_cache(1, REFERENCE_WIDTH))
  return logits[0, last]


def reference_model_drafts(dp, text, k):
  """Greedy drafts of the draft model continuing ``text``, recomputed from
  scratch at every token (no cache carried across steps)."""
  tokens, drafts = list(text), []
  for _ in range(k):
    row = np.zeros((1, REFERENCE_WIDTH), np.int32)
    row[0, :len(tokens)] = tokens
    drafts.append(int(jnp.argmax(_draft_logits_at(dp, jnp.asarray(row), len(tokens) - 1))))
    tokens.append(drafts[-1])
  return drafts


@pytest.mark.parametrize("kind", list(HYBRIDS))
def test_loop_takes_lookup_drafts_exactly_where_an_ngram_repeats(kind):
  """Step by step (the same jitted phases as the loop): wherever a row's
  committed text ends in a repeated n-gram of >= min_match tokens, its drafts
  are the lookup's continuation; both branches occur, and the output is
  still plain greedy decoding's. For ngram+model the model's drafts are
  checked too, against the draft model rerun from scratch on the committed
  text: its cache must hold the lookup drafts it never proposed itself."""
  tp, dps = params(4)
  prompts = make_prompts(40)
  hybrid = HYBRIDS[kind]
  ref = outputs(gen("plain", 5).generate(tp, None, prompts))
  texts = [list(p) for p in prompts]
  branches = {"lookup": 0, "model": 0}
  generator = gen(kind, 5)
  for trace in generator.iterate(tp, dps[kind], prompts, k=K_MAX):
    for b, text in enumerate(texts):
      if trace.accepted[b] < 0:
        continue
      if match_length(text, LOOKUP.max_n, LOOKUP.min_n) >= hybrid.min_match:
        branches["lookup"] += 1
        assert trace.drafts[b] == reference_proposal(text, K_MAX, LOOKUP.max_n, LOOKUP.min_n)
      else:
        branches["model"] += 1
        if kind == "ngram+model":
          assert trace.drafts[b] == reference_model_drafts(dps[kind], text, K_MAX), b
      text.extend(trace.emitted[b])
  assert [t[len(p):] for t, p in zip(texts, prompts)] == ref
  assert branches["lookup"] > 5 and branches["model"] > 5, branches


def test_coupled_hybrid_equals_plain_sampling():
  tp, dps = params(3)
  prompts = make_prompts(30)
  seeds = [7, 8, 9, 10, 11]
  for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
    ref = gen("plain", 5).generate(tp, None, prompts, seeds=seeds, temperature=temperature,
                                   top_p=top_p)
    result = gen("ngram+model", 5, rule="coupled").generate(
        tp, dps["ngram+model"], prompts, seeds=seeds, k=4, temperature=temperature,
        top_p=top_p)
    assert outputs(result) == outputs(ref), (temperature, top_p)
    assert total_accepted(result) > 0, (temperature, top_p)


@pytest.mark.slow
def test_rejection_hybrid_preserves_distribution():
  """Chi-square against the enumerated distribution (tests/test_fidelity.py's
  set-up); min_match=1 so that the lookup proposes often in 3 tokens, and the
  draft model (a perturbed copy of the target) drafts elsewhere."""
  c = load_config("configs/tiny.py")
  c.job = "fidelity"
  c.decode.drafter, c.decode.rule = "ngram+model", "rejection"
  c.sampling.temperature, c.sampling.top_p = 0.7, 0.9
  c.decode.lookup_min_match, c.decode.k = 1, 2
  c.fidelity.num_samples = 10_000   # as tests/test_fidelity.py
  stats = run_fidelity(c, log=lambda *_: None)
  assert stats["impossible_samples"] == 0
  assert stats["p_value"] > 1e-3, stats
  assert stats["accepted"] > 0.1 * stats["n_samples"], stats
  assert stats["proposed"] - stats["accepted"] > 0.1 * stats["n_samples"], stats
  assert stats["bonus_tokens"] > 0.02 * stats["n_samples"], stats


def test_config_checks():
  c = load_config("configs/tiny.py")
  c.decode.drafter = "ngram+model"
  c.decode.lookup_min_match = 4      # above ngram_max_n=3
  with pytest.raises(ValueError, match="lookup_min_match=4"):
    runtime.validate_config(c)
  c.decode.lookup_min_match = 2
  runtime.validate_config(c)
  drafter, _ = runtime.build_drafter(c, TARGET)
  assert isinstance(drafter, HybridDrafter) and drafter.name == "ngram+model"
  assert isinstance(drafter.draft, ModelDrafter) and drafter.min_match == 2
  assert drafter.draft.resync_all_drafts     # it re-feeds the lookup's commits
  with pytest.raises(ValueError, match="HybridDrafter.wrap"):
    HybridDrafter(LOOKUP, ModelDrafter(DRAFT))


def test_registry_builds_what_each_name_runs():
  from specdec_jax import drafters
  from common import FEATURE_DRAFT
  built = {name: drafters.build(name, lookup=LOOKUP,
                                draft_model=FEATURE_DRAFT if "feature" in name else DRAFT)
           for name in drafters.DRAFTERS}
  assert built["none"] is None and built["ngram"] is LOOKUP
  assert {name: type(d).__name__ for name, d in built.items() if d is not None} == {
      "model": "ModelDrafter", "feature": "FeatureDrafter", "ngram": "NgramDrafter",
      "ngram+model": "HybridDrafter", "ngram+feature": "HybridDrafter"}
  for name, d in built.items():
    if d is not None:
      assert d.name == name
      assert d.reads_target_features == ("feature" in name)
      assert (d.draft_model is None) == (drafters.kind(name).draft_model is None)
  assert built["ngram+model"].with_draft_model(TARGET).draft_model is TARGET
  with pytest.raises(ValueError, match="expected one of"):
    drafters.build("eagle")
  with pytest.raises(ValueError, match="needs a 'feature' draft"):
    drafters.build("feature", draft_model=DRAFT)
