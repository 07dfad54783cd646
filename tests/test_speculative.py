"""The speculative core: exactness against plain decoding, batching, EOS and
length limits inside draft blocks, draft-length policies and statistics.

Every Generator here comes from ``common.generator`` (max_prompt_len=16, one
prompt bucket; shared with the other decode-loop modules), so each setup
compiles once per greedy flag; params and prompts vary freely without
recompiling.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import (DRAFT, DRAFTERS, K_MAX, MAX_NEW, MAX_PROMPT, TARGET, VOCAB, check_stats,
                    draft_params, init, make_prompts, outputs, total_accepted)
from common import generator as gen
from specdec_jax import compile_count
from specdec_jax import metrics
from specdec_jax import phase_timing
from specdec_jax.drafters import NgramDrafter
from specdec_jax.generation import Generator

KS = (1, 2, K_MAX)


def draft_params_for(kind, tp, dp):
  return {"plain": None, "model": dp, "ngram": {}, "self": tp}[kind]


# ----------------------------------------------------------------------------
# Greedy speculative == greedy plain.

@pytest.mark.slow
def test_greedy_speculative_equals_plain():
  accepted = {"model": 0, "ngram": 0}
  proposed = {"model": 0, "ngram": 0}
  before = None
  for seed in range(6):
    tp, dp = init(TARGET, seed), init(DRAFT, 1000 + seed)
    prompts = make_prompts(seed)
    rng = np.random.default_rng(seed)
    max_new = [MAX_NEW if i % 2 else int(m) for i, m in enumerate(rng.integers(1, 25, size=5))]
    ref = outputs(gen("plain", 5).generate(tp, None, prompts, max_new_tokens=max_new))
    assert [len(o) for o in ref] == max_new
    alone_i = seed % 5
    ref_alone = gen("plain", 1).generate(tp, None, [prompts[alone_i]],
                                         max_new_tokens=max_new[alone_i]).rows[0].output_ids
    assert ref_alone == ref[alone_i], f"seed {seed}: plain batch 1 vs batch 5"
    for kind in ("model", "ngram"):
      d = draft_params_for(kind, tp, dp)
      for k in KS:
        result = gen(kind, 5).generate(tp, d, prompts, k=k, max_new_tokens=max_new)
        assert outputs(result) == ref, f"seed {seed} drafter {kind} K={k} (batch 5)"
        for row in result.rows:
          check_stats(row)
          assert max(row.proposed_per_step) <= k
          accepted[kind] += sum(row.accepted_per_step)
          proposed[kind] += sum(row.proposed_per_step)
        alone = gen(kind, 1).generate(tp, d, [prompts[alone_i]], k=k,
                                      max_new_tokens=max_new[alone_i]).rows[0]
        assert alone.output_ids == ref[alone_i], f"seed {seed} drafter {kind} K={k} (batch 1)"
    if seed == 0:
      before = compile_count.loop_compiles()
  # Different params, prompts and K never recompiled.
  assert compile_count.loop_compiles() == before
  # Not vacuous: drafts were proposed and some were accepted by both drafters.
  assert accepted["ngram"] > 20 and accepted["model"] > 0, (accepted, proposed)
  assert proposed["model"] > 300


def test_self_draft_accepted_everywhere():
  """A draft identical to the target is accepted at every slot (greedy)."""
  tp = init(TARGET, 5)
  prompts = make_prompts(5)
  ref = outputs(gen("plain", 5).generate(tp, None, prompts))
  for k in KS:
    result = gen("self", 5).generate(tp, tp, prompts, k=k)
    assert outputs(result) == ref, f"K={k}"
    for row in result.rows:
      check_stats(row)
      assert row.accepted_per_step[:-1] == [k] * (len(row.accepted_per_step) - 1)
      assert row.accepted_per_step[-1] <= k
      assert row.proposed_per_step == [k] * row.target_calls
      assert row.target_calls == math.ceil(MAX_NEW / (k + 1))
      assert row.accepted_by_slot[:k] == row.reached_by_slot[:k]
      assert row.reached_by_slot[k:] == [0] * (K_MAX - k)
    summary = metrics.acceptance_summary(result.rows, K_MAX)
    assert summary["acceptance_rate"] == 1.0
    assert summary["min_row_acceptance"] == 1.0
    assert summary["acceptance_by_position"][:k] == [1.0] * k
    assert summary["wasted_drafts_per_token"] == pytest.approx(0.0, abs=1.0 / MAX_NEW * k)


# ----------------------------------------------------------------------------
# coupled == plain sampling, token for token.

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_coupled_equals_plain_sampling(kind):
  accepted = 0
  for seed in range(3):
    tp, dp = init(TARGET, 50 + seed), init(DRAFT, 60 + seed)
    prompts = make_prompts(70 + seed)
    seeds = [1000 * seed + i for i in range(5)]
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
      ref = gen("plain", 5).generate(tp, None, prompts, seeds=seeds,
                                     temperature=temperature, top_p=top_p)
      for k in (2, K_MAX):
        result = gen(kind, 5, rule="coupled").generate(
            tp, draft_params_for(kind, tp, dp), prompts, seeds=seeds, k=k,
            temperature=temperature, top_p=top_p)
        assert outputs(result) == outputs(ref), (seed, temperature, k)
        for row in result.rows:
          check_stats(row)
          accepted += sum(row.accepted_per_step)
    # Sampling really depends on the seed (the comparison is not trivial).
    other = gen("plain", 5).generate(tp, None, prompts, seeds=[s + 1 for s in seeds],
                                     temperature=1.0)
    assert outputs(other) != outputs(ref)
  assert accepted > 0


# ----------------------------------------------------------------------------
# A row does not depend on the other rows of its batch.

@pytest.mark.parametrize("kind,temperature", [
    ("model", 0.0), ("ngram", 0.0), ("model", 1.0), ("plain", 1.0)])
def test_row_independent_of_batch(kind, temperature):
  tp, dp = init(TARGET, 8), init(DRAFT, 9)
  d = draft_params_for(kind, tp, dp)
  prompt, seed = make_prompts(10)[1], 4242
  others = make_prompts(11)
  alone = gen(kind, 1).generate(tp, d, [prompt], seeds=[seed], k=4,
                                temperature=temperature).rows[0]
  assert len(alone.output_ids) == MAX_NEW
  for position in (0, 2, 4):
    prompts = list(others)
    prompts[position] = prompt
    seeds = [7 + i for i in range(5)]
    seeds[position] = seed
    rows = gen(kind, 5).generate(tp, d, prompts, seeds=seeds, k=4,
                                 temperature=temperature).rows
    assert rows[position].output_ids == alone.output_ids, f"row position {position}"
    if kind != "plain":
      assert rows[position].accepted_per_step == alone.accepted_per_step
  # The seed matters when sampling (so equality above is not trivial).
  if temperature > 0:
    other_seed = gen(kind, 1).generate(tp, d, [prompt], seeds=[seed + 1], k=4,
                                       temperature=temperature).rows[0]
    assert other_seed.output_ids != alone.output_ids


# ----------------------------------------------------------------------------
# EOS and max_new_tokens inside an accepted block.

K_BLOCK = 4


@pytest.fixture(scope="session")
def self_draft_run():
  tp = init(TARGET, 12)
  prompts = make_prompts(13)
  result = gen("self", 5).generate(tp, tp, prompts, k=K_BLOCK)
  for row in result.rows:
    assert row.accepted_per_step[:-1] == [K_BLOCK] * (row.target_calls - 1)
  return tp, prompts, outputs(result)


def test_eos_inside_accepted_block(self_draft_run):
  tp, prompts, full = self_draft_run
  block = K_BLOCK + 1
  # A token whose first occurrence is strictly inside a block (not its first
  # draft, not the bonus token), preferably in the second block or later.
  candidates = [(j < block, b, j) for b, out in enumerate(full) for j in range(1, len(out))
                if j % block not in (0, block - 1) and out[j] not in out[:j]]
  assert candidates, "no usable mid-block token"
  _, row_index, j = min(candidates)
  eos = full[row_index][j]
  result = gen("self", 5, eos=(eos,)).generate(tp, tp, prompts, k=K_BLOCK)
  for b, (row, out) in enumerate(zip(result.rows, full)):
    if eos in out:
      stop = out.index(eos)
      assert row.output_ids == out[:stop + 1], f"row {b}"
      assert row.finish_reason == "eos"
      assert row.target_calls == stop // block + 1
    else:
      assert row.output_ids == out and row.finish_reason == "length"
  row = result.rows[row_index]
  assert row.output_ids[-1] == eos and len(row.output_ids) == j + 1
  # The whole last block was accepted; the commit stopped at the EOS inside it.
  assert row.accepted_per_step[-1] == K_BLOCK
  check_stats(row)


def test_max_new_tokens_inside_accepted_block(self_draft_run):
  tp, prompts, full = self_draft_run
  limits = [7, 12, 3, 24, 1]
  result = gen("self", 5).generate(tp, tp, prompts, k=K_BLOCK, max_new_tokens=limits)
  for row, out, m in zip(result.rows, full, limits):
    assert row.output_ids == out[:m]
    assert row.finish_reason == "length"
    assert row.target_calls == math.ceil(m / (K_BLOCK + 1))
    assert row.accepted_per_step == [K_BLOCK] * row.target_calls
    check_stats(row)


# ----------------------------------------------------------------------------
# Draft-length policies.

@pytest.fixture(scope="session")
def policy_setup():
  tp, dp = init(TARGET, 20), init(DRAFT, 21)
  prompts = make_prompts(22)
  ref = outputs(gen("plain", 5).generate(tp, None, prompts))
  fixed = gen("model", 5).generate(tp, dp, prompts, k=4)
  assert outputs(fixed) == ref
  return tp, dp, prompts, ref, fixed


def steps_table(rows, field):
  """[T, B] array of a per-step field, -1 where the row had finished."""
  steps = max(r.target_calls for r in rows)
  table = np.full((steps, len(rows)), -1)
  for b, r in enumerate(rows):
    table[:r.target_calls, b] = getattr(r, field)
  return table


def test_policy_threshold(policy_setup):
  tp, dp, prompts, ref, fixed = policy_setup
  g = gen("model", 5, policy="threshold")
  none = g.generate(tp, dp, prompts, k=4, tau=1.0)
  before = compile_count.loop_compiles()
  assert outputs(none) == ref
  for row in none.rows:
    assert set(row.proposed_per_step) == {0}
    assert sum(row.reached_by_slot) == 0
    assert row.target_calls == len(row.output_ids)
  zero = g.generate(tp, dp, prompts, k=4, tau=0.0)
  assert outputs(zero) == ref
  assert [r.proposed_per_step for r in zero.rows] == [r.proposed_per_step for r in fixed.rows]
  assert [r.accepted_per_step for r in zero.rows] == [r.accepted_per_step for r in fixed.rows]
  counts = set()
  for tau in (0.05, 0.2, 0.5):
    for k in (1, 3, K_MAX):
      result = g.generate(tp, dp, prompts, k=k, tau=tau)
      assert outputs(result) == ref, (tau, k)
      for row in result.rows:
        check_stats(row)
        assert max(row.proposed_per_step) <= k
        counts.update(row.proposed_per_step)
  assert compile_count.loop_compiles() == before
  assert len(counts) > 2    # the threshold stopped rows at various slots


def assert_adaptive_recurrence(row, k):
  """k_b starts at k, +1 after a full acceptance, -1 after a rejection."""
  p, a = row.proposed_per_step, row.accepted_per_step
  assert p[0] == k
  for t in range(len(p) - 1):
    grown = p[t] + 1 if a[t] >= p[t] else p[t] - 1
    assert p[t + 1] == min(max(grown, 1), k), (t, p, a)


def test_policy_adaptive_per_row(policy_setup):
  tp, dp, prompts, ref, _ = policy_setup
  g = gen("model", 5, policy="adaptive")
  g.generate(tp, dp, prompts, k=4)
  before = compile_count.loop_compiles()
  differing_steps = 0
  for k in (2, 4, K_MAX):
    result = g.generate(tp, dp, prompts, k=k)
    assert outputs(result) == ref
    for row in result.rows:
      check_stats(row)
      assert_adaptive_recurrence(row, k)
    table = steps_table(result.rows, "proposed_per_step")
    for step in table:
      active = step[step >= 0]
      differing_steps += len(set(active)) > 1 and min(active) > 0
  assert differing_steps > 0   # rows in the same step drafted different k_b
  assert compile_count.loop_compiles() == before


def test_policy_adaptive_ngram_long_drafts_where_accepted_short_where_rejected():
  """Adaptive k_b follows each row's acceptance. A target that copies its last
  token (all layers zeroed: logits = e_t . E^T) accepts every lookup draft,
  so k_b climbs to k and stays; the random target rejects the lookup's
  copy-heavy drafts, so a rejected first step shrinks the next one."""
  tp = init(TARGET, 30)
  copying = dict(tp, layers=jax.tree.map(jnp.zeros_like, tp["layers"]))
  prompts = make_prompts(31)
  g = gen("ngram", 5, policy="adaptive")
  for params in (copying, tp):
    ref = outputs(gen("plain", 5).generate(params, None, prompts))
    result = g.generate(params, {}, prompts, k=4)
    assert outputs(result) == ref
    for row in result.rows:
      check_stats(row)
      assert max(row.proposed_per_step) <= 4
    if params is copying:
      for row in result.rows:
        assert len(set(row.output_ids)) == 1       # it copies
        assert row.proposed_per_step[-3:] == [4, 4, 4], row.proposed_per_step
        assert row.accepted_per_step[-3:-1] == [4, 4]   # (the last may be cut)
    else:
      rejected_first = [r for r in result.rows
                        if r.proposed_per_step[0] == 4 and r.accepted_per_step[0] < 4]
      assert rejected_first, [r.proposed_per_step[:3] for r in result.rows]
      for row in rejected_first:
        assert row.proposed_per_step[1] <= 3, row.proposed_per_step[:4]
      assert total_accepted(result) < 0.5 * sum(sum(r.proposed_per_step) for r in result.rows)


@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_policy_budget(policy_setup, kind):
  tp, dp, prompts, ref, _ = policy_setup
  d = draft_params_for(kind, tp, dp)
  g = gen(kind, 5, policy="budget")
  g.generate(tp, d, prompts, k=4, budget=3)
  before = compile_count.loop_compiles()
  binding = 0
  for budget in (1, 3, 8, 100):
    for k in (1, 4, K_MAX):
      result = g.generate(tp, d, prompts, k=k, budget=budget)
      assert outputs(result) == ref, (budget, k)
      table = steps_table(result.rows, "proposed_per_step")
      for step in table:
        active = step >= 0
        total = step[active].sum()
        assert total <= budget, (budget, k, step)
        if kind == "model":
          # A model drafter always fills its k_b: exactly the budget is used.
          assert total == min(budget, active.sum() * k), (budget, k, step)
        binding += total == budget
      for row in result.rows:
        check_stats(row)
        assert max(row.proposed_per_step) <= k
  assert binding > 0
  assert compile_count.loop_compiles() == before


def test_policy_bad_input(policy_setup):
  tp, dp, prompts, _, _ = policy_setup
  with pytest.raises(ValueError, match="tau"):
    gen("model", 5, policy="threshold").generate(tp, dp, prompts, tau=1.5)
  with pytest.raises(ValueError, match="tau"):
    gen("model", 5, policy="threshold").generate(tp, dp, prompts, tau=-0.5)
  with pytest.raises(ValueError, match="budget"):
    gen("model", 5, policy="budget").generate(tp, dp, prompts, budget=0)
  with pytest.raises(ValueError, match="budget"):
    gen("model", 5, policy="budget").generate(tp, dp, prompts, budget=1.5)
  with pytest.raises(ValueError, match="policy"):
    Generator(TARGET, NgramDrafter(), k_max=2, policy="bogus")


# ----------------------------------------------------------------------------
# Statistics.

@pytest.mark.parametrize("kind,temperature", [("model", 0.0), ("ngram", 0.0),
                                              ("model", 1.0)])
def test_statistics_match_an_independent_replay(kind, temperature):
  """Each step's accepted count is the number of leading drafts that equal
  the plain decoder's own tokens at those positions (greedy, or coupled
  sampling with the same seeds), and it commits that many drafts plus one
  token of the target's. The drafts come from the step-by-step trace; the
  reference from plain decoding; the per-slot counters of the compiled loop
  must follow from them."""
  tp, dp = init(TARGET, 40), init(DRAFT, 41)
  prompts, seeds = make_prompts(42), [3, 4, 5, 6, 7]
  # Rows stop at least K tokens before the cap, so the reference (run to the
  # cap) also knows the target's tokens at a last step's drafts.
  max_new = [MAX_NEW - 5, 5, 17, 1, MAX_NEW - 5]
  rule = "coupled" if temperature > 0 else "rejection"
  d = draft_params_for(kind, tp, dp)
  kwargs = dict(seeds=seeds, k=4, temperature=temperature, max_new_tokens=max_new)
  full = outputs(gen("plain", 5).generate(tp, None, prompts, seeds=seeds,
                                          temperature=temperature))
  ref = [f[:m] for f, m in zip(full, max_new)]
  spec = gen(kind, 5, rule=rule)
  rows = spec.generate(tp, d, prompts, **kwargs).rows
  traces = list(spec.iterate(tp, d, prompts, **kwargs))
  assert all(t.rows is None for t in traces[:-1])
  assert [r.output_ids for r in traces[-1].rows] == ref == outputs_of(rows)
  proposed_any = accepted_any = 0
  for b, row in enumerate(rows):
    check_stats(row)
    done, reached, accepted = 0, np.zeros(K_MAX, int), np.zeros(K_MAX, int)
    steps_n, steps_k = [], []
    for trace in traces:
      if trace.accepted[b] < 0:    # the row had finished
        continue
      drafts = trace.drafts[b]
      truth = full[b][done:done + len(drafts)]
      n = next((i for i, (x, y) in enumerate(zip(drafts, truth)) if x != y), len(truth))
      assert trace.accepted[b] == n, (b, trace.step, drafts, truth)
      assert trace.emitted[b] == ref[b][done:done + n + 1]
      reached[:min(n + 1, len(drafts))] += 1
      accepted[:n] += 1
      steps_n.append(n)
      steps_k.append(len(drafts))
      done += len(trace.emitted[b])
    assert done == len(ref[b])
    assert row.accepted_per_step == steps_n and row.proposed_per_step == steps_k
    assert row.reached_by_slot == reached.tolist()
    assert row.accepted_by_slot == accepted.tolist()
    assert row.target_calls == len(steps_n)
    proposed_any += sum(steps_k)
    accepted_any += sum(steps_n)
  assert accepted_any > 0 and proposed_any > accepted_any   # accepted and rejected


def outputs_of(rows):
  return [r.output_ids for r in rows]


def test_acceptance_summary_hand_made():
  from specdec_jax.generation import RowResult
  row = lambda out, acc_steps, prop_steps, reached, acc: RowResult(
      prompt_ids=[1], output_ids=out, finish_reason="length", accepted_per_step=acc_steps,
      width_per_step=[3] * len(acc_steps),
      proposed_per_step=prop_steps, reached_by_slot=reached, accepted_by_slot=acc,
      expected_accept_by_slot=[0.0] * len(reached), target_calls=len(acc_steps))
  # Row A: 2 steps, K=2: accepted 2 then 0 -> 4 tokens; reached [2, 2], acc [1, 1].
  a = row([1, 2, 3, 4], [2, 0], [2, 2], [2, 1], [1, 1])
  # Row B: 4 steps, nothing accepted: 4 tokens; reached [4, 0].
  b = row([5, 6, 7, 8], [0, 0, 0, 0], [2, 2, 2, 2], [4, 0], [0, 0])
  s = metrics.acceptance_summary([a, b], 2)
  # Per-row averaged: (2/3 + 0) / 2, not pooled 2/7.
  assert s["acceptance_rate"] == pytest.approx((2 / 3 + 0) / 2)
  assert s["min_row_acceptance"] == 0.0
  assert s["mean_tokens_per_call"] == pytest.approx((4 / 2 + 4 / 4) / 2)
  assert s["acceptance_by_position"] == [pytest.approx((0.5 + 0) / 2), 1.0]
  assert s["effective_k_histogram"] == {"2": 6}
  assert s["wasted_drafts_per_token"] == pytest.approx(((4 - 2) / 4 + 8 / 4) / 2)


# ----------------------------------------------------------------------------
# EOS under sampling: as the correction token, as the bonus token, in the prompt.

def _last_token_kinds(traces, b):
  """Per step of row b: (emitted tokens, 'bonus' | 'correction' | 'cut')."""
  kinds = []
  for t in traces:
    if t.accepted[b] < 0:
      continue
    n, k = t.accepted[b], len(t.drafts[b])
    kind = "bonus" if (k > 0 and n == k) else "correction"
    kinds.append((t.emitted[b], kind if len(t.emitted[b]) == n + 1 else "cut"))
  return kinds


def _first_occurrence_of_kind(tokens_and_kinds, kind):
  """(position in the output, token) of a step's last token of ``kind`` whose
  token does not occur earlier in the output; None if there is none."""
  out = []
  for emitted, k in tokens_and_kinds:
    if k == kind and emitted[-1] not in out + emitted[:-1]:
      return len(out) + len(emitted) - 1, emitted[-1]
    out.extend(emitted)
  return None


@pytest.mark.parametrize("rule,kind,drafter", [
    ("rejection", "correction", "model"), ("rejection", "bonus", "self"),
    ("coupled", "correction", "model"), ("coupled", "bonus", "self")])
def test_eos_under_sampling(rule, kind, drafter):
  """An EOS that arrives as a step's correction token (after a rejection) or
  as its bonus token (after a full acceptance) ends the row right there: the
  output is the EOS-free output cut after that token, and with the coupled
  rule it is also plain sampling's output with the same EOS."""
  tp, dp = init(TARGET, 60), init(DRAFT, 61)
  d = draft_params_for(drafter, tp, dp)
  prompts, seeds = make_prompts(62), [21, 22, 23, 24, 25]
  kwargs = dict(seeds=seeds, k=3, temperature=1.0)
  free = gen(drafter, 5, rule=rule)
  full = outputs(free.generate(tp, d, prompts, **kwargs))
  traces = list(free.iterate(tp, d, prompts, **kwargs))
  found = [(b, _first_occurrence_of_kind(_last_token_kinds(traces, b), kind))
           for b in range(5)]
  found = [(b, hit) for b, hit in found if hit is not None and hit[0] < MAX_NEW - 1]
  assert found, f"no {kind} token to use as EOS"
  b, (position, eos) = found[0]
  assert full[b][position] == eos and eos not in full[b][:position]
  rows = gen(drafter, 5, rule=rule, eos=(eos,)).generate(tp, d, prompts, **kwargs).rows
  assert rows[b].output_ids == full[b][:position + 1]
  assert rows[b].finish_reason == "eos"
  last_n, last_k = rows[b].accepted_per_step[-1], rows[b].proposed_per_step[-1]
  assert (last_n == last_k) == (kind == "bonus")
  for other, row in enumerate(rows):   # every row stops at its own first EOS
    cut = full[other].index(eos) + 1 if eos in full[other] else len(full[other])
    assert row.output_ids == full[other][:cut]
  if rule == "coupled":
    plain = gen("plain", 5, eos=(eos,)).generate(tp, None, prompts, seeds=seeds,
                                                 temperature=1.0)
    assert outputs(plain) == [r.output_ids for r in rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_eos_in_the_prompt_does_not_end_the_row(temperature):
  """EOS ids inside the prompt are text like any other: the row generates
  past them, and the n-gram lookup may propose them (the prompt repeats a
  pattern around the EOS); the output is plain decoding's with the same EOS."""
  tp = init(TARGET, 63)
  eos = 7
  prompts = [[3, 4, eos, 3, 4], [eos], [9, eos, 9, eos, 9], [1, 2, 3], [eos, eos, 5, 6]]
  seeds = [1, 2, 3, 4, 5]
  kwargs = dict(seeds=seeds, temperature=temperature)
  rule = "coupled" if temperature > 0 else "rejection"
  plain = gen("plain", 5, eos=(eos,)).generate(tp, None, prompts, **kwargs).rows
  spec = gen("ngram", 5, rule=rule, eos=(eos,)).generate(tp, {}, prompts, k=3, **kwargs).rows
  assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
  for row, prompt in zip(spec, prompts):
    assert row.prompt_ids == prompt and len(row.output_ids) >= 1
    assert eos not in row.output_ids[:-1]
    assert row.finish_reason == ("eos" if row.output_ids[-1] == eos else "length")
  assert any(len(r.output_ids) > 1 for r in spec)
  assert any(sum(r.proposed_per_step) > 0 for r in spec)   # the lookup proposed


# ----------------------------------------------------------------------------
# The last cache slot: a full prompt, max_new at the cap, K = k_max.

@pytest.mark.parametrize("drafter", ["self", "ngram", "model"])
def test_full_prompt_full_budget_and_k_max_fit_the_buffer(drafter):
  """A prompt of exactly max_prompt_len tokens, max_new_tokens at the cap
  and K = k_max: the last verify block reaches the buffer's last slots
  (S = max_prompt + max_new + k_max + 1) and the output is still plain
  decoding's, in full."""
  tp, dp = init(TARGET, 64), init(DRAFT, 65)
  d = draft_params_for(drafter, tp, dp)
  rng = np.random.default_rng(66)
  prompts = [rng.integers(0, VOCAB, size=16).tolist() for _ in range(4)]
  prompts.append(([11, 12, 13] * 6)[:16])
  g = gen(drafter, 5)
  assert g.num_slots == 16 + MAX_NEW + K_MAX + 1 and g.buckets[-1] == 16
  ref = outputs(gen("plain", 5).generate(tp, None, prompts, max_new_tokens=MAX_NEW))
  result = g.generate(tp, d, prompts, k=K_MAX, max_new_tokens=MAX_NEW)
  assert outputs(result) == ref
  for row in result.rows:
    assert len(row.output_ids) == MAX_NEW and row.finish_reason == "length"
    check_stats(row)
  if drafter == "self":   # every block full: the last one ends at the buffer's end
    assert all(r.accepted_per_step[:-1] == [K_MAX] * (r.target_calls - 1) for r in result.rows)


# ----------------------------------------------------------------------------
# Verification priced by its drafts: the verify width follows the drafts.

def test_verify_width_is_the_smallest_that_holds_the_drafts():
  """Each step verifies at the smallest of the static widths that holds the
  most drafts any active row proposed, plus one: a step where no row
  drafted costs a plain step. One compiled loop serves every width."""
  tp = init(TARGET, 80)
  widths = (1, 3, K_MAX + 1)
  g = Generator(TARGET, NgramDrafter(), k_max=K_MAX, max_prompt_len=16,
                max_new_tokens=MAX_NEW, batch_size=5, verify_widths=widths)
  plain = gen("plain", 5)
  seen = set()
  before = None
  for seed in (81, 82, 83):
    prompts = make_prompts(seed)
    result = g.generate(tp, {}, prompts, k=K_MAX)
    assert outputs(result) == outputs(plain.generate(tp, None, prompts))
    steps = max(r.target_calls for r in result.rows)
    for t in range(steps):
      most = max(r.proposed_per_step[t] for r in result.rows if t < r.target_calls)
      width = next(w for w in widths if w >= most + 1)
      assert all(r.width_per_step[t] == width for r in result.rows if t < r.target_calls)
      seen.add(width)
    if before is None:
      before = compile_count.loop_compiles()
  assert seen == set(widths), seen            # every width ran
  assert compile_count.loop_compiles() == before


def test_no_drafts_means_plain_width_steps():
  """With the threshold policy at tau=1 no row ever drafts: every step runs
  at width 1 (the default widths are 1 and K_max + 1)."""
  tp, dp = init(TARGET, 84), init(DRAFT, 85)
  prompts = make_prompts(86)
  result = gen("model", 5, policy="threshold").generate(tp, dp, prompts, tau=1.0)
  assert outputs(result) == outputs(gen("plain", 5).generate(tp, None, prompts))
  assert all(set(r.width_per_step) == {1} for r in result.rows)
  fixed = gen("model", 5).generate(tp, dp, prompts)
  assert all(set(r.width_per_step) == {K_MAX + 1} for r in fixed.rows)


def test_a_width_beyond_the_drafts_pads_the_block():
  """A verify width wider than k_max + 1 (the numerics-matched mode's plain
  baseline: k_max = 0 at width K + 1) runs its extra rows as padding: the
  same tokens as at the default widths, every step at that width, and the
  cache sized for it."""
  tp = init(TARGET, 87)
  prompts = make_prompts(88)
  for name, k_max in (("plain", 0), ("ngram", 2)):
    padded = Generator(TARGET, DRAFTERS[name], k_max=k_max, rule="coupled", max_prompt_len=MAX_PROMPT,
                       max_new_tokens=MAX_NEW, batch_size=5, verify_widths=(K_MAX + 1,))
    assert padded.num_slots == MAX_PROMPT + MAX_NEW + K_MAX + 1
    for temperature in (0.0, 1.0):
      kwargs = dict(seeds=[1, 2, 3, 4, 5], temperature=temperature)
      if k_max:
        kwargs["k"] = k_max
      result = padded.generate(tp, draft_params(name, 0, tp), prompts, **kwargs)
      plain = gen("plain", 5).generate(tp, None, prompts, seeds=kwargs["seeds"],
                                       temperature=temperature)
      assert outputs(result) == outputs(plain), (name, temperature)
      assert all(set(r.width_per_step) == {K_MAX + 1} for r in result.rows)


@pytest.mark.parametrize("widths", [(2, 1, 6), (1, 4), (0, 6), (1, 6, 6), (1, 6.0), (True, 6)])
def test_bad_verify_widths_are_refused(widths):
  with pytest.raises(ValueError, match="verify_widths"):
    Generator(TARGET, NgramDrafter(), k_max=K_MAX, verify_widths=widths)


# ----------------------------------------------------------------------------
# The auto policy: never speculate at a loss.

def test_auto_k_hand_values():
  from specdec_jax import policies
  widths = (1, K_MAX + 1)
  cpu = policies.Costs(verify_W=jnp.asarray([1.0, 1.6]), draft=jnp.float32(0.0))
  k_B = policies.auto_k(jnp.asarray([0.9, 0.2, 0.5, 0.0]), jnp.int32(4), cpu, widths, K_MAX)
  # 1 + .9 + .81 + .73 + .66 = 4.1 tokens for 1.6 steps; 1.25 / 1.6 < 1; the
  # widest width costs the same for any k, so the most drafts win when it pays.
  assert k_B.tolist() == [4, 0, 4, 0]
  free = policies.Costs.free(2)
  assert policies.auto_k(jnp.asarray([0.05, 0.5]), jnp.int32(3), free, widths,
                         K_MAX).tolist() == [3, 3]
  dear_draft = policies.Costs(verify_W=jnp.asarray([1.0, 1.0]), draft=jnp.float32(0.6))
  # a = 0.5: k=1 gives 1.5 / 1.6 < 1.02; every longer k is worse.
  assert policies.auto_k(jnp.asarray([0.5]), jnp.int32(4), dear_draft, widths,
                         K_MAX).tolist() == [0]


@pytest.mark.parametrize("temperature,tree_nodes", [(0.0, 0), (1.0, 0), (1.0, 8)],
                         ids=["greedy", "coupled", "coupled-tree"])
def test_auto_policy_drafts_where_it_pays_and_stays_exact(temperature, tree_nodes):
  """The lookup's drafts are all right on a target that copies its last token
  and mostly wrong on a random one. At CPU-like costs (a verify pass of K+1
  tokens at 1.6 plain steps) the auto policy keeps drafting on the first and
  soon stops on the second (its shadow checks of the lookup keep the
  estimate honest); output is plain decoding's either way (coupled rule when
  sampling); prohibitive costs mean plain steps only. With draft trees
  (the lookup's branches, a verify pass of N + 1 tokens) the same: a row
  drafts a tree or nothing (trees send no shadow candidates: a row that
  stopped drifts back to the prior and tries again)."""
  from specdec_jax import policies
  tp = init(TARGET, 90)
  copying = dict(tp, layers=jax.tree.map(jnp.zeros_like, tp["layers"]))
  prompts, seeds = make_prompts(91), [1, 2, 3, 4, 5]
  rule = "coupled" if temperature > 0 else "rejection"
  g = gen("ngram", 5, rule=rule, policy="auto")
  if tree_nodes:
    g = Generator(TARGET, NgramDrafter(), k_max=K_MAX, rule=rule, policy="auto",
                  max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=5,
                  tree_nodes=tree_nodes, tree_topk=2)
  cpu = policies.Costs(verify_W=jnp.asarray([1.0, 1.6]), draft=jnp.float32(0.0))
  never = policies.Costs(verify_W=jnp.asarray([1.0, 100.0]), draft=jnp.float32(0.0))
  drafting = {}
  for name, params in (("copying", copying), ("random", tp)):
    ref = outputs(gen("plain", 5).generate(params, None, prompts, seeds=seeds,
                                           temperature=temperature))
    for costs_name, costs in (("cpu", cpu), ("never", never)):
      result = g.generate(params, {}, prompts, seeds=seeds, temperature=temperature,
                          costs=costs)
      assert outputs(result) == ref, (name, costs_name)
      drafting[name, costs_name] = np.mean(
          [np.mean(np.asarray(r.proposed_per_step) > 0) for r in result.rows])
      if costs_name == "never":
        assert all(set(r.width_per_step) == {1} for r in result.rows)
  assert drafting["copying", "never"] == drafting["random", "never"] == 0.0
  assert drafting["copying", "cpu"] > 0.5, drafting
  assert drafting["random", "cpu"] < 0.2, drafting


def test_measure_costs_shapes_and_values():
  tp, dp = init(TARGET, 92), init(DRAFT, 93)
  g = gen("model", 5, policy="auto")
  costs = phase_timing.measure_policy_costs(g, tp, dp, make_prompts(94), iters=2)
  assert costs.verify_W.shape == (len(g.verify_widths),)
  assert float(costs.verify_W[0]) == pytest.approx(1.0)
  assert float(costs.verify_W[-1]) > 0 and float(costs.draft) > 0
  with pytest.raises(ValueError, match="verify_W"):
    g.generate(tp, dp, make_prompts(94),
               costs=costs.replace(verify_W=jnp.ones((3,), jnp.float32)))


@pytest.mark.parametrize("policy,extra", [("threshold", dict(tau=0.3)), ("adaptive", {}),
                                          ("budget", dict(budget=6)), ("auto", {})])
def test_policies_under_coupled_sampling_equal_plain_sampling(policy, extra):
  """Every draft-length policy keeps the coupled rule token-identical to plain
  sampling with the same seeds, at two warps; drafts are accepted."""
  tp, dp = init(TARGET, 95), init(DRAFT, 96)
  prompts, seeds = make_prompts(97), [31, 32, 33, 34, 35]
  g = gen("self" if policy == "auto" else "model", 5, rule="coupled", policy=policy)
  d = tp if policy == "auto" else dp
  accepted = 0
  for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
    ref = gen("plain", 5).generate(tp, None, prompts, seeds=seeds, temperature=temperature,
                                   top_p=top_p)
    result = g.generate(tp, d, prompts, seeds=seeds, k=4, temperature=temperature,
                        top_p=top_p, **extra)
    assert outputs(result) == outputs(ref), (policy, temperature)
    accepted += total_accepted(result)
  assert accepted > 0
