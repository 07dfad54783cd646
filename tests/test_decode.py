"""The decode loop through the Generator API: compile counts, EOS and length
limits per row, and input validation before anything compiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import DRAFT, TARGET, VOCAB, cache_copies, init, tiny_config
from specdec_jax import compile_count
from specdec_jax import runtime
from specdec_jax import verify
from specdec_jax.drafters import ModelDrafter, NgramDrafter
from specdec_jax.generation import Generator
from specdec_jax.kernels import build as kernel_build
from specdec_jax.models import transformer


@pytest.fixture(scope="session")
def params():
  return init(TARGET, 0), init(DRAFT, 1)


def random_prompts(rng, lengths):
  return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def loop_compiles():
  return compile_count.loop_compiles()


# ----------------------------------------------------------------------------
# The phases run one at a time update the caches in place.

def test_phase_functions_take_the_state_by_donation(params):
  """Trace mode and phase timing pass the state on from call to call; a
  non-donated state would copy every cache on every call (at batch 8 on
  SmolLM2 that copy cost more than the n-gram drafter itself)."""
  tp, dp = params
  gen = Generator(TARGET, ModelDrafter(DRAFT), k_max=3, max_prompt_len=16, max_new_tokens=8,
                  batch_size=2)
  req = gen.request([[1, 2, 3], [4, 5]], max_new_tokens=8, k=3)
  run = req.run
  state = gen.compiled("prefill", True)(tp, dp, req.requests, run)
  proposal, after_draft = gen.compiled("draft_phase", True)(dp, state, run)
  assert state.target_cache.k_LBSGH.is_deleted()
  after_verify = gen.compiled("verify_phase", True)(tp, after_draft, proposal, run)
  assert after_draft.target_cache.k_LBSGH.is_deleted()
  assert (np.asarray(after_verify.length_B) > np.asarray(req.requests.prompt_len_B)).all()


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan", "unrolled-kernel"])
@pytest.mark.parametrize("setup", ["plain", "chain", "tree"])
def test_verify_phase_updates_the_cache_in_place(params, layer_loop, setup):
  """The verify pass, a ``lax.switch`` over widths, compiles without a copy
  of the target cache: the branches only read it and the step's keys and
  values are written once after the switch (a branch that wrote would make
  XLA copy every layer's cache into and out of the conditional, about 15%
  of a SmolLM2 step on CPU). The negative control is the same count on a
  switch whose branches write a buffer."""
  tp, _ = params
  if layer_loop == "unrolled-kernel":   # the CPU kernels' matmuls and attention
    if not kernel_build.available():
      pytest.skip(kernel_build.why_unavailable())
    target = transformer.Transformer(TARGET.cfg, "unrolled", matmul="kernel")
  else:
    target = transformer.Transformer(TARGET.cfg, layer_loop)
  tp = target.prepare_params(tp)
  kwargs = {"plain": dict(), "chain": dict(drafter=NgramDrafter(), k_max=3),
            "tree": dict(drafter=NgramDrafter(), k_max=3, tree_nodes=4, tree_topk=2)}[setup]
  gen = Generator(target, max_prompt_len=16, max_new_tokens=8, batch_size=2, **kwargs)
  req = gen.request([[1, 2, 3, 1, 2], [4, 5]], max_new_tokens=8,
                    **({"k": 3} if setup != "plain" else {}))
  state = gen.compiled("prefill", True)(tp, None, req.requests, req.run)
  proposal, state = gen.compiled("draft_phase", True)(None, state, req.run)
  text = gen.compiled("verify_phase", True).lower(tp, state, proposal, req.run).compile().as_text()
  leaf = jax.tree.leaves(state.target_cache)[0]
  per_layer = leaf.shape if layer_loop != "scan" else leaf.shape[1:]
  if layer_loop == "unrolled-kernel" and setup != "plain":
    # The kernels did run, attention in both widths' branches (1 and k+1 or
    # N+1: a tree's masked pass too), once per layer.
    assert "specdec_rows_matmul" in text
    assert text.count('custom_call_target="specdec_decode_attention"') == 2 * TARGET.cfg.num_layers
  assert cache_copies(text, leaf.shape) == 0 and cache_copies(text, per_layer) == 0

  def writing_branch(width, buf_SD, x_D):
    return jax.lax.dynamic_update_slice(buf_SD, jnp.broadcast_to(x_D, (width, 4)), (1, 0))

  writing = jax.jit(lambda i, buf, x: jax.lax.switch(
      i, [functools.partial(writing_branch, w) for w in (1, 2)], buf, x), donate_argnums=(1,))
  control = writing.lower(0, jnp.zeros((16, 4)), jnp.ones(4)).compile().as_text()
  assert cache_copies(control, (16, 4)) > 0


# ----------------------------------------------------------------------------
# Compile counts.

def test_plain_compiles_once_per_bucket(params):
  tp, _ = params
  gen = Generator(TARGET, max_prompt_len=64, max_new_tokens=8, batch_size=3)
  assert gen.buckets == (16, 32, 64)
  rng = np.random.default_rng(0)
  before = loop_compiles()
  outputs = []
  for i in range(10):
    n = int(rng.integers(1, 4))             # also partial batches
    lengths = rng.integers(1, 17, size=n)   # all in the 16 bucket
    prompts = random_prompts(rng, lengths)
    result = gen.generate(tp, None, prompts, seeds=[100 * i + j for j in range(n)],
                          temperature=0.9, max_new_tokens=[int(m) for m in
                                                           rng.integers(1, 9, size=n)])
    outputs.extend(r.output_ids for r in result.rows)
  assert loop_compiles() - before == 1
  assert len({tuple(o) for o in outputs}) > 5   # really different runs
  gen.generate(tp, None, [list(range(1, 21))], temperature=0.9)   # bucket 32
  assert loop_compiles() - before == 2
  gen.generate(tp, None, [list(range(1, 31)), [3]], temperature=0.5, seeds=[7, 8])
  assert loop_compiles() - before == 2


def test_speculative_no_recompiles_after_warmup(params):
  tp, dp = params
  gen = Generator(TARGET, ModelDrafter(DRAFT), k_max=4, max_prompt_len=32,
                  max_new_tokens=12, batch_size=3)
  rng = np.random.default_rng(1)
  gen.generate(tp, dp, random_prompts(rng, [5, 9]), temperature=1.0)   # warm-up
  before, before_all = loop_compiles(), compile_count.count("")
  accepted_patterns, lengths = set(), set()
  for i in range(20):
    n = 3 if i % 4 else 2
    prompts = random_prompts(rng, rng.integers(1, 17, size=n))
    if i % 3 == 0:   # copy-heavy: drafts get accepted at different rates
      prompts[0] = (prompts[0][:4] * 4)[:16]
    result = gen.generate(
        tp, dp, prompts, seeds=[int(s) for s in rng.integers(0, 2**31, size=n)],
        k=int(rng.integers(1, 5)), temperature=float(rng.uniform(0.2, 1.5)),
        top_p=[1.0, 0.9, 0.5][i % 3], top_k=[0, 5, 0, 50][i % 4],
        max_new_tokens=[int(m) for m in rng.integers(1, 13, size=n)])
    for r in result.rows:
      accepted_patterns.add(tuple(r.accepted_per_step))
      lengths.add(len(r.output_ids))
  assert loop_compiles() == before
  assert compile_count.count("") == before_all, compile_count.snapshot()
  assert len(accepted_patterns) > 10 and len(lengths) > 5


def test_windowed_attention_in_the_loop_is_exact_and_compiles_once(params):
  """Target and draft read 8, 16 or all 61 cache slots as the rows grow
  (``Transformer.min_window``): greedy speculative decoding, with chains and
  with trees, equals plain greedy decoding over the whole cache, and crossing
  windows never recompiles."""
  tp, dp = params
  windowed = lambda model: dataclasses.replace(model, min_window=8)
  plain_whole = Generator(TARGET, max_prompt_len=16, max_new_tokens=40, batch_size=2)
  gens = {"plain": Generator(windowed(TARGET), max_prompt_len=16, max_new_tokens=40,
                             batch_size=2),
          "model": Generator(windowed(TARGET), ModelDrafter(windowed(DRAFT)), k_max=4,
                             max_prompt_len=16, max_new_tokens=40, batch_size=2),
          # Trees name their nodes' slots past the text: the window holds them.
          "ngram_tree": Generator(windowed(TARGET), NgramDrafter(), k_max=3, tree_nodes=6,
                                  tree_topk=3, max_prompt_len=16, max_new_tokens=40,
                                  batch_size=2),
          "model_tree": Generator(windowed(TARGET), ModelDrafter(windowed(DRAFT)), k_max=3,
                                  tree_nodes=5, tree_topk=2, max_prompt_len=16,
                                  max_new_tokens=40, batch_size=2)}
  assert transformer.attention_windows(gens["model"].num_slots, 8) == (8, 16, 61)
  rng = np.random.default_rng(11)
  compiles = {}
  accepted = {"ngram_tree": 0, "model_tree": 0}
  for i in range(3):
    prompts = random_prompts(rng, [3, 14])
    prompts[1] = (prompts[1][:5] * 3)[:14]   # copy-heavy: drafts accepted
    ref = [r.output_ids for r in plain_whole.generate(tp, None, prompts).rows]
    assert [len(o) for o in ref] == [40, 40]
    for name, gen in gens.items():
      result = gen.generate(tp, dp if name.startswith("model") else None, prompts,
                            **({"k": 3} if name.endswith("tree") else {}))
      assert [r.output_ids for r in result.rows] == ref, f"{name}, round {i}"
      if name.endswith("tree"):
        accepted[name] += sum(sum(r.accepted_per_step) for r in result.rows)
    if i == 0:
      compiles = loop_compiles()
  assert loop_compiles() == compiles
  assert min(accepted.values()) > 0, accepted   # the trees' nodes were accepted


# ----------------------------------------------------------------------------
# EOS and max_new_tokens per row.

@pytest.fixture(scope="session")
def eos_setup(params):
  tp, _ = params
  rng = np.random.default_rng(2)
  prompts = random_prompts(rng, [6, 13, 3])
  gen = Generator(TARGET, max_prompt_len=16, max_new_tokens=12, batch_size=3)
  full = gen.generate(tp, None, prompts).rows
  eos = full[0].output_ids[2]
  eos_gen = Generator(TARGET, max_prompt_len=16, max_new_tokens=12, batch_size=3,
                      eos_ids=(eos,))
  return gen, eos_gen, prompts, full, eos


def test_eos_truncates_each_row_independently(params, eos_setup):
  tp, _ = params
  _, eos_gen, prompts, full, eos = eos_setup
  rows = eos_gen.generate(tp, None, prompts).rows
  finished_by_eos = 0
  for row, ref in zip(rows, full):
    assert len(ref.output_ids) == 12 and ref.finish_reason == "length"
    if eos in ref.output_ids:
      stop = ref.output_ids.index(eos)
      assert row.output_ids == ref.output_ids[:stop + 1]
      assert row.output_ids[-1] == eos and eos not in row.output_ids[:-1]
      assert row.finish_reason == "eos"
      assert row.target_calls == stop + 1
      finished_by_eos += 1
    else:
      assert row.output_ids == ref.output_ids
      assert row.finish_reason == "length"
  assert rows[0].finish_reason == "eos" and len(rows[0].output_ids) <= 3
  # Some row keeps going after row 0 stopped.
  assert any(r.finish_reason == "length" and len(r.output_ids) == 12 for r in rows)
  assert finished_by_eos >= 1


def test_nothing_written_after_eos(params, eos_setup):
  """Step by step: a finished row emits nothing more, its length is frozen."""
  tp, _ = params
  _, eos_gen, prompts, _, eos = eos_setup
  traces = list(eos_gen.iterate(tp, None, prompts))
  rows = traces[-1].rows
  for b in range(3):
    emitted = [t.emitted[b] for t in traces]
    finished = [t.finished[b] for t in traces]
    done_at = finished.index(True)
    assert all(finished[done_at:])
    assert all(e == [] for e in emitted[done_at + 1:])
    assert all(t.accepted[b] == -1 for t in traces[done_at + 1:])
    assert sum(emitted, []) == rows[b].output_ids
  assert rows[0].output_ids[-1] == eos
  ref = eos_gen.generate(tp, None, prompts).rows
  assert [r.output_ids for r in ref] == [r.output_ids for r in rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_per_row_max_new_tokens(params, eos_setup, temperature):
  tp, _ = params
  gen, _, prompts, _, _ = eos_setup
  seeds = [11, 12, 13]
  full = gen.generate(tp, None, prompts, seeds=seeds, temperature=temperature).rows
  limits = [3, 12, 1]
  rows = gen.generate(tp, None, prompts, seeds=seeds, temperature=temperature,
                      max_new_tokens=limits).rows
  for row, ref, m in zip(rows, full, limits):
    assert len(row.output_ids) == m
    assert row.finish_reason == "length"
    assert row.target_calls == m
    # Stopping early does not change the tokens produced before the stop.
    assert row.output_ids == ref.output_ids[:m]
  rows = gen.generate(tp, None, prompts, seeds=seeds, temperature=temperature,
                      max_new_tokens=5).rows
  assert [len(r.output_ids) for r in rows] == [5, 5, 5]


def test_more_prompts_than_batch_size(params, eos_setup):
  """Prompts beyond batch_size run in further compiled calls, in order, with
  the same result as in any other batch (no recompile)."""
  tp, _ = params
  gen, _, prompts, full, _ = eos_setup
  rng = np.random.default_rng(3)
  extra = random_prompts(rng, [4, 16, 9, 1])
  before = loop_compiles()
  rows = gen.generate(tp, None, prompts + extra, max_new_tokens=6).rows
  assert loop_compiles() == before
  assert len(rows) == 7
  assert [r.prompt_ids for r in rows] == prompts + extra
  assert [r.output_ids for r in rows[:3]] == [f.output_ids[:6] for f in full]
  for prompt, row in zip(extra, rows[3:]):
    alone = gen.generate(tp, None, [prompt], max_new_tokens=6).rows[0]
    assert row.output_ids == alone.output_ids


# ----------------------------------------------------------------------------
# Bad input: ValueError naming the problem, before anything compiles.

@pytest.fixture(scope="session")
def fresh_gen():
  """A speculative generator that has never compiled anything."""
  return Generator(TARGET, ModelDrafter(DRAFT), k_max=4, max_prompt_len=16,
                   max_new_tokens=8, batch_size=2)


GOOD = dict(prompts=[[1, 2, 3], [4, 5]], max_new_tokens=4, temperature=1.0, top_k=0,
            top_p=1.0, k=2, seeds=[0, 1], tau=0.0, budget=1)


def _case_id(value):
  if isinstance(value, dict):
    return ",".join(f"{k}={str(v)[:12]}" for k, v in value.items())
  return None


@pytest.mark.parametrize("change,match", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2], []]), "empty"),
    (dict(prompts=[[1] * 17, [2]]), "max_prompt_len"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=[4, 0]), "max_new_tokens"),
    (dict(max_new_tokens=9), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(prompts=[[1, VOCAB], [2]]), "vocab"),
    (dict(prompts=[[-1, 3], [2]]), "vocab"),
    (dict(k=0), "k="),
    (dict(k=5), "k="),
    (dict(seeds=[1]), "seeds"),
    (dict(seeds=[-1, 0]), "seed"),
    (dict(seeds=[0, 2**32]), "seed"),
    (dict(tau=1.5), "tau"),
    (dict(tau=-0.1), "tau"),
    # Types: nothing is silently rounded or coerced.
    (dict(prompts=[[1, 2.0], [2]]), "not integers"),
    (dict(prompts=[[1.7, 3], [2]]), "not integers"),
    (dict(prompts=[[1, True], [2]]), "not integers"),
    (dict(prompts=["hello", [2]]), "string"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=[4, 2.0]), "max_new_tokens"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=2.5), "top_k"),
    (dict(seeds=True), "seed"),
    (dict(seeds=[0, True]), "seed"),
    (dict(seeds=[0, 1.0]), "seed"),
    (dict(k=2.0), "k="),
], ids=_case_id)
def test_bad_generate_input_raises_before_compile(params, fresh_gen, change, match):
  tp, dp = params
  args = dict(GOOD, **change)
  prompts = args.pop("prompts")
  before, before_all = loop_compiles(), compile_count.count("")
  with pytest.raises(ValueError, match=match):
    fresh_gen.generate(tp, dp, prompts, **args)
  assert loop_compiles() == before
  assert compile_count.count("") == before_all


def test_good_input_is_accepted(fresh_gen):
  """The baseline of the parametrized cases above is itself valid."""
  args = dict(GOOD)
  prompts = args.pop("prompts")
  fresh_gen.validate(prompts, [args["max_new_tokens"]] * 2, args["k"], args["temperature"],
                     args["top_k"], args["top_p"], args["seeds"], args["tau"], args["budget"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="bogus"), "rule"),
    (dict(policy="bogus"), "policy"),
    (dict(k_max=-1), "k_max"),
    (dict(k_max=2, drafter=None), "drafter"),
    (dict(eos_ids=(VOCAB,)), "eos"),
    (dict(batch_size=0), "batch_size"),
    (dict(drafter=ModelDrafter(dataclasses.replace(
        DRAFT, cfg=dataclasses.replace(DRAFT.cfg, vocab_size=VOCAB + 1)))), "vocab"),
])
def test_bad_generator_config(kwargs, match):
  full = dict(drafter=NgramDrafter(), k_max=2, max_prompt_len=16, max_new_tokens=4)
  full.update(kwargs)
  drafter = full.pop("drafter")
  with pytest.raises(ValueError, match=match):
    Generator(TARGET, drafter, **full)


def test_greedy_is_a_temperature_not_a_rule(params):
  """rule='greedy' is refused at the API and the config boundary, naming the
  fix (temperature=0), before anything compiles; temperature 0 under any
  rule but synthetic is plain greedy decoding, and is reported exact."""
  tp, _ = params
  before = compile_count.count("")
  with pytest.raises(ValueError, match="rule='greedy' is not a rule.*temperature=0"):
    Generator(TARGET, NgramDrafter(), k_max=2, rule="greedy", max_prompt_len=16)
  c = tiny_config()
  c.decode.rule = "greedy"
  with pytest.raises(ValueError, match="config.decode.rule='greedy' is not a rule"):
    runtime.validate_config(c)
  assert compile_count.count("") == before
  plain = Generator(TARGET, max_prompt_len=16, max_new_tokens=4)
  typical = Generator(TARGET, NgramDrafter(), k_max=2, rule="typical", max_prompt_len=16,
                      max_new_tokens=4)
  assert (typical.generate(tp, {}, [[1, 2, 3, 1, 2]]).rows[0].output_ids
          == plain.generate(tp, None, [[1, 2, 3, 1, 2]]).rows[0].output_ids)
  assert verify.is_exact("typical", greedy=True) and not verify.is_exact("typical", False)
  assert not verify.is_exact("synthetic", greedy=True)


def test_draft_target_vocab_mismatch():
  config = tiny_config(drafter="model", **{"draft.vocab_size": VOCAB + 7})
  before = loop_compiles()
  with pytest.raises(ValueError, match="vocab"):
    runtime.build_drafter(config, TARGET)
  assert loop_compiles() == before
  # The same config with matching vocab builds a model drafter.
  drafter, draft_params = runtime.build_drafter(tiny_config(drafter="model"), TARGET)
  assert isinstance(drafter, ModelDrafter)
  assert draft_params["embed"]["embedding"].shape[0] == VOCAB


@pytest.mark.parametrize("changes,match", [
    (dict(drafter="bogus"), "drafter"),
    (dict(ngram_min_n=0), "ngram"),
    (dict(ngram_min_n=3, ngram_max_n=2), "ngram"),
    (dict(k=0), "k"),
    (dict(rule="bogus"), "rule"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(policy="bogus"), "policy"),
    (dict(tau=2.0), "tau"),
    (dict(policy="budget", budget=0), "budget"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(job="bogus"), "job"),
    (dict(**{"model.source": "bogus"}), "source"),
])
def test_validate_config(changes, match):
  runtime.validate_config(tiny_config())   # the baseline is valid
  with pytest.raises(ValueError, match=match):
    runtime.validate_config(tiny_config(**changes))


@pytest.mark.parametrize("kwargs", [dict(max_n=0), dict(min_n=0), dict(min_n=3, max_n=2)])
def test_ngram_sizes(kwargs):
  with pytest.raises(ValueError, match="n-gram"):
    NgramDrafter(**kwargs)
