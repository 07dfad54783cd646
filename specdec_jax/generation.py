"""Host-side generation API over the compiled decode loop.

``Generator`` validates requests (before anything compiles), pads prompts to
a small static set of length buckets and batches to the static batch size,
runs the jitted ``decode.generate_loop`` and unpacks per-row results. It also
drives the same jitted phases step by step from Python (``iterate``) for
streaming and traces.
"""

import dataclasses
import inspect
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import compile_count
from specdec_jax import decode
from specdec_jax import policies
from specdec_jax import sampling
from specdec_jax import tree
from specdec_jax import verify
from specdec_jax.drafters import check_vocabulary
from specdec_jax.drafters.base import Drafter
from specdec_jax.models.transformer import Transformer

MIN_BUCKET = 16
LOOP = compile_count.LOOP   # the jitted loop's name, counted by compile_count
# What each jitted phase's arguments are, by parameter name, for sharded
# jitting (sharding.py): a phase whose parameter is not named here fails to
# jit, rather than being sharded by the wrong argument's rules.
ARG_KINDS = {"tp": "target_params", "dp": "draft_params", "requests": "batch",
             "state": "state", "proposal": "state", "run": "replicated"}
# The phases used one at a time (trace mode, phase timing) take the decode
# state by donation: the caches inside are updated in place instead of being
# copied on every call, as inside the fused loop.
_DONATE = {"draft_phase": (1,), "verify_phase": (1,)}


def prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
  """Static padded prompt lengths: powers of two from 16, then max_prompt_len."""
  buckets, size = [], MIN_BUCKET
  while size < max_prompt_len:
    buckets.append(size)
    size *= 2
  buckets.append(max_prompt_len)
  return tuple(buckets)


@dataclasses.dataclass
class RowResult:
  """One request's output. ``output_ids`` are the generated ids only."""

  prompt_ids: list[int]
  output_ids: list[int]
  finish_reason: str
  accepted_per_step: list[int]   # accepted drafts per target call
  proposed_per_step: list[int]   # effective k_b per target call
  width_per_step: list[int]      # the verify width of each target call (the batch's)
  reached_by_slot: list[int]
  accepted_by_slot: list[int]
  expected_accept_by_slot: list[float]
  target_calls: int


@dataclasses.dataclass
class GenerationResult:
  rows: list[RowResult]
  wall_time_s: float     # time of the compiled calls, including the host copy


@dataclasses.dataclass
class Request:
  """One compiled call's input (``Generator.request``): the packed requests,
  the run params, the greedy flag that picks the compiled phases and how
  many rows are real."""

  requests: decode.Batch
  run: decode.RunParams
  greedy: bool
  num_rows: int


@dataclasses.dataclass
class StepTrace:
  """One Python-driven step: what each row proposed and committed."""

  step: int
  drafts: list[list[int]]          # proposed drafts per row (num_proposed long)
  accepted: list[int]              # accepted drafts per row (-1: row idle)
  emitted: list[list[int]]         # tokens committed this step per row
  finished: list[bool]
  draft_time_s: float
  verify_time_s: float
  rows: list[RowResult] | None = None   # the final rows, on the last step only


class Generator:
  """Compiled generation for one target, drafter and static decode setup.

  Args:
    target: the target Transformer.
    drafter: a Drafter, or None for plain decoding.
    k_max: static draft slots (0 = plain decoding).
    rule: acceptance rule used when temperature > 0 (temperature 0 is greedy);
      "synthetic" (not exact, for systems benchmarks) at any temperature.
    max_prompt_len, max_new_tokens: sizes of the static buffers.
    batch_size: static rows per compiled call; fewer prompts are padded.
    eos_ids: ids that end a row.
    verify_widths: the static verify widths each step chooses from (the
      smallest holding every row's drafts + 1); default (1, k_max + 1).
      ``decode.matched_verify_widths`` gives the numerics-matched mode: one
      width, which a plain Generator (k_max=0) can share by padding.
    tree_nodes, tree_topk: draft trees (``tree.py``; 0 nodes: chains): N
      nodes per row of depth <= k_max from tree_topk branches, verified in
      one pass of N + 1 tokens (widths (1, N + 1)); ``tree.check_setup``
      says which drafters, rules and policies.
    tree_candidates: "topk" (each node's top-k children) or "sampled"
      (drawn from the draft's q at temperature > 0; ``tree_expansion``).
    shardings: optional ``sharding.GenerationShardings``: the phases are then
      jitted with explicit in/out shardings on its mesh (params per the rules,
      batch arrays and the DecodeState over ``data``, caches per the rules)
      and inputs are placed into them. None: single-device, unchanged.
  """

  def __init__(self, target: Transformer, drafter: Drafter | None = None, *,
               k_max: int = 0, rule: str = "rejection", policy: str = "fixed",
               max_prompt_len: int = 256, max_new_tokens: int = 64,
               batch_size: int = 1, eos_ids: Sequence[int] = (),
               typical_epsilon: float = 0.09, typical_alpha: float = 0.3,
               shardings=None,
               verify_widths: Sequence[int] | None = None,
               tree_nodes: int = 0, tree_topk: int = 1, tree_candidates: str = "topk"):
    verify.check_rule(rule)
    policies.validate(policy, 0.0, 1)
    if int(k_max) != k_max or k_max < 0:
      raise ValueError(f"k_max must be an int >= 0, got {k_max}")
    if k_max > 0 and drafter is None:
      raise ValueError("k_max > 0 needs a drafter")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_prompt_len < 1 or max_new_tokens < 1:
      raise ValueError("max_prompt_len and max_new_tokens must be >= 1")
    check_vocabulary(drafter, target.cfg.vocab_size)
    for eos in eos_ids:
      if not 0 <= eos < target.cfg.vocab_size:
        raise ValueError(f"eos id {eos} outside the vocabulary [0, {target.cfg.vocab_size})")
    if tree_nodes:
      tree.check_setup(tree_nodes, tree_topk, k_max, drafter if k_max > 0 else None, rule,
                       policy, verify_widths, tree_candidates)
      verify_widths = (1, tree_nodes + 1)
    widths = tuple(verify_widths) if verify_widths else decode.default_verify_widths(k_max)
    decode.check_verify_widths(widths, k_max)
    # Past the text: the widest verify block's scratch (a tree's nodes) and
    # the draft model's own tree scratch.
    room = widths[-1]
    if tree_nodes:
      room = max(room, drafter.tree_scratch_slots(k_max, tree_nodes, tree_topk))
    # The static decode settings, built once; ``spec(greedy)`` adds the flag.
    self.decode_spec = decode.DecodeSpec(
        batch_size=batch_size, k_max=k_max,
        num_slots=max_prompt_len + max_new_tokens + room,
        max_new_tokens=max_new_tokens, eos_ids=tuple(int(e) for e in eos_ids), greedy=False,
        rule=rule, policy=policy, typical_epsilon=typical_epsilon,
        typical_alpha=typical_alpha, verify_widths=widths, tree_nodes=tree_nodes,
        tree_topk=tree_topk, tree_candidates=tree_candidates)
    self.target = target
    self.drafter = drafter if k_max > 0 else None
    self.max_prompt_len = max_prompt_len
    self.buckets = prompt_buckets(max_prompt_len)
    self._jitted = {}
    self.shardings = shardings
    if shardings is not None:
      shardings.check_batch(batch_size)

  # ----- static setup -------------------------------------------------------

  def spec(self, greedy: bool) -> decode.DecodeSpec:
    return dataclasses.replace(self.decode_spec, greedy=greedy)

  # The decode settings, read from the one spec.
  batch_size = property(lambda self: self.decode_spec.batch_size)
  k_max = property(lambda self: self.decode_spec.k_max)
  num_slots = property(lambda self: self.decode_spec.num_slots)
  max_new_tokens = property(lambda self: self.decode_spec.max_new_tokens)
  eos_ids = property(lambda self: self.decode_spec.eos_ids)
  rule = property(lambda self: self.decode_spec.rule)
  policy = property(lambda self: self.decode_spec.policy)
  verify_widths = property(lambda self: self.decode_spec.verify_widths)

  def to_host(self, tree):
    """Host (numpy) copy of a state or proposal, gathered from every process
    on several hosts (caches dropped; see ``Shardings.fetch``)."""
    return jax.device_get(tree) if self.shardings is None else self.shardings.fetch(tree)

  def compiled(self, name: str, greedy: bool):
    """The jitted phase ``name`` (``LOOP``, "prefill", "draft_phase",
    "verify_phase"), one per (phase, greedy); shapes pick the bucket."""
    key = (name, greedy)
    if key not in self._jitted:
      spec, target, drafter = self.spec(greedy), self.target, self.drafter
      if self.shardings is not None:
        target, drafter = self.shardings.constrain(target, drafter)

      def generate_loop(tp, dp, requests, run):
        return decode.generate_loop(spec, target, drafter, tp, dp, requests, run)

      def prefill(tp, dp, requests, run):
        return decode.prefill(spec, target, drafter, tp, dp, requests, run)

      def draft_phase(dp, state, run):
        return decode.draft_phase(spec, drafter, dp, state, run)

      def verify_phase(tp, state, proposal, run):
        return decode.verify_phase(spec, target, drafter, tp, state, proposal, run)

      fns = {LOOP: generate_loop, "prefill": prefill,
             "draft_phase": draft_phase, "verify_phase": verify_phase}
      fn = fns[name]
      fn.__name__ = fn.__qualname__ = name   # what compile_count sees, whatever the closure's name
      donate = _DONATE.get(name, ())
      if self.shardings is None:
        self._jitted[key] = jax.jit(fn, donate_argnums=donate)
      else:
        kinds = [ARG_KINDS[arg] for arg in inspect.signature(fn).parameters]
        self._jitted[key] = self.shardings.jit(fn, kinds, donate)
    return self._jitted[key]

  # ----- validation and batching --------------------------------------------

  def validate(self, prompts, max_new_tokens, k, temperature, top_k, top_p, seeds,
               tau=0.0, budget=1, synthetic_acceptance=0.0):
    """Raises ValueError naming the problem; runs before anything compiles."""
    if not prompts:
      raise ValueError("no prompts given")
    vocab = self.target.cfg.vocab_size
    for i, ids in enumerate(prompts):
      if len(ids) == 0:
        raise ValueError(f"prompt {i} is empty")
      if len(ids) > self.max_prompt_len:
        raise ValueError(
            f"prompt {i} has {len(ids)} tokens, longer than max_prompt_len="
            f"{self.max_prompt_len} that the cache allows")
      bad = [t for t in ids if not 0 <= int(t) < vocab]
      if bad:
        raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    for m in max_new_tokens:
      if not _is_int(m) or m < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
      if m > self.max_new_tokens:
        raise ValueError(f"max_new_tokens={m} exceeds the compiled cap {self.max_new_tokens}")
    sampling.validate(temperature, top_k, top_p)
    if self.k_max > 0 and (not _is_int(k) or not 1 <= k <= self.k_max):
      raise ValueError(f"k={k} must be an int in [1, k_max={self.k_max}]")
    if len(seeds) != len(prompts):
      raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    for seed in seeds:
      if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed!r} must be an int in [0, 2**32)")
    policies.validate(self.policy, tau, budget)
    validate_synthetic_acceptance(synthetic_acceptance)

  def _bucket(self, longest: int) -> int:
    return next(b for b in self.buckets if b >= longest)

  def _pack(self, prompts, max_new, seeds):
    """Right-pads one batch (<= batch_size prompts) to static shapes."""
    b = self.batch_size
    bucket = self._bucket(max(len(p) for p in prompts))
    prompt_BT = np.zeros((b, bucket), np.int32)
    prompt_len_B = np.ones((b,), np.int32)
    max_new_B = np.ones((b,), np.int32)
    active_B = np.zeros((b,), bool)
    seeds_B = np.zeros((b,), np.uint32)
    for row, (ids, m, seed) in enumerate(zip(prompts, max_new, seeds)):
      prompt_BT[row, :len(ids)] = ids
      prompt_len_B[row] = len(ids)
      max_new_B[row] = m
      active_B[row] = True
      seeds_B[row] = seed
    keys_B2 = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds_B))
    return decode.Batch(prompt_BT=jnp.asarray(prompt_BT), prompt_len_B=jnp.asarray(prompt_len_B),
                        max_new_B=jnp.asarray(max_new_B), keys_B2=keys_B2,
                        active_B=jnp.asarray(active_B))

  def _run_params(self, k, temperature, top_k, top_p, tau, budget, costs=None,
                  synthetic_acceptance=0.0):
    if costs is None:
      costs = policies.Costs.free(len(self.verify_widths))
    elif np.shape(costs.verify_W) != (len(self.verify_widths),):
      raise ValueError(f"costs.verify_W has shape {np.shape(costs.verify_W)}; this generator "
                       f"verifies at widths {self.verify_widths}")
    return decode.RunParams(
        sampling=sampling.SamplingParams.create(temperature, top_k, top_p),
        k=jnp.int32(k if self.k_max > 0 else 0), tau=jnp.float32(tau),
        budget=jnp.int32(budget), costs=costs,
        synthetic_acceptance=jnp.float32(synthetic_acceptance))

  def _normalise(self, prompts, max_new_tokens, seeds, k):
    """Per-prompt lists from the call's arguments; types are checked here, so
    nothing is silently rounded (a token id 1.7 must not become 1)."""
    if isinstance(prompts, (str, bytes)) or not _is_sequence(prompts):
      raise ValueError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
    checked = []
    for i, ids in enumerate(prompts):
      if isinstance(ids, (str, bytes)):
        raise ValueError(f"prompt {i} is a string; pass token ids (tokenizer.encode)")
      ids = list(ids)
      bad = [t for t in ids if not _is_int(t)]
      if bad:
        raise ValueError(f"prompt {i} has token ids that are not integers: {bad[:5]}")
      checked.append([int(t) for t in ids])
    if max_new_tokens is None:
      max_new_tokens = self.max_new_tokens
    if not _is_sequence(max_new_tokens):
      max_new_tokens = [max_new_tokens] * len(checked)
    for m in max_new_tokens:
      if not _is_int(m):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
    if seeds is None:
      seeds = list(range(len(checked)))
    elif not _is_sequence(seeds):
      if not _is_int(seeds):
        raise ValueError(f"seed {seeds!r} must be an int in [0, 2**32)")
      seeds = [int(seeds) + i for i in range(len(checked))]
    if k is None:
      k = self.k_max
    elif not _is_int(k):
      raise ValueError(f"k={k!r} must be an int in [1, k_max={self.k_max}]")
    return checked, [int(m) for m in max_new_tokens], list(seeds), int(k)

  def _prepare(self, prompts, max_new_tokens, seeds, k, temperature, top_k, top_p, tau,
               budget, costs, synthetic_acceptance):
    """Checked per-prompt lists and the run params of one call (every prompt
    validated before anything compiles)."""
    prompts, max_new, seeds, k = self._normalise(prompts, max_new_tokens, seeds, k)
    self.validate(prompts, max_new, k, temperature, top_k, top_p, seeds, tau, budget,
                  synthetic_acceptance)
    run = self._run_params(k, temperature, top_k, top_p, tau, budget, costs,
                           synthetic_acceptance)
    return prompts, max_new, seeds, run

  def request(self, prompts, *, max_new_tokens=None, seeds=None, k=None, temperature=0.0,
              top_k=0, top_p=1.0, tau=0.0, budget=1, costs=None,
              synthetic_acceptance=0.0) -> Request:
    """At most batch_size prompts, checked and packed for the compiled phases
    (``compiled``); arguments as for ``generate``."""
    prompts, max_new, seeds, run = self._prepare(
        prompts, max_new_tokens, seeds, k, temperature, top_k, top_p, tau, budget, costs,
        synthetic_acceptance)
    if len(prompts) > self.batch_size:
      raise ValueError(f"{len(prompts)} prompts for one call of batch_size={self.batch_size}")
    return Request(requests=self._pack(prompts, max_new, seeds), run=run,
                   greedy=temperature == 0, num_rows=len(prompts))

  # ----- running --------------------------------------------------------------

  def generate(self, target_params, draft_params, prompts: Sequence[Sequence[int]], *,
               max_new_tokens=None, seeds=None, k=None, temperature=0.0, top_k=0,
               top_p=1.0, tau=0.0, budget=1, costs=None,
               synthetic_acceptance=0.0) -> GenerationResult:
    """Generates for any number of prompts, batch_size rows per compiled call.

    Args:
      prompts: token id lists (1 <= len <= max_prompt_len).
      max_new_tokens: int or per-prompt list (<= the compiled cap).
      seeds: per-prompt seeds (default 0..n-1), or one int base seed.
      k: effective draft length in [1, k_max] (default k_max).
      costs: ``policies.Costs`` for the auto policy (``phase_timing.measure_policy_costs``);
        default: verify at any width costs a step and drafts are free.
      synthetic_acceptance: rule="synthetic" only: each draft's acceptance
        probability in [0, 1] (traced: a sweep over it never recompiles).
    """
    prompts, max_new, seeds, run = self._prepare(
        prompts, max_new_tokens, seeds, k, temperature, top_k, top_p, tau, budget, costs,
        synthetic_acceptance)
    fn = self.compiled(LOOP, temperature == 0)
    rows, wall = [], 0.0
    for start in range(0, len(prompts), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      requests = self._pack(prompts[chunk], max_new[chunk], seeds[chunk])
      t0 = time.perf_counter()
      state = self.to_host(fn(target_params, draft_params, requests, run))
      wall += time.perf_counter() - t0
      rows.extend(_unpack(state, len(prompts[chunk])))
    return GenerationResult(rows=rows, wall_time_s=wall)

  def iterate(self, target_params, draft_params, prompts, *, max_new_tokens=None,
              seeds=None, k=None, temperature=0.0, top_k=0, top_p=1.0, tau=0.0,
              budget=1, costs=None, synthetic_acceptance=0.0) -> Iterator[StepTrace]:
    """Python-driven loop over the same jitted phases, one batch (<= batch_size).

    Yields a StepTrace after every step (for streaming and traces); the last
    one carries the final rows (``StepTrace.rows``, the ``RowResult``s that
    ``generate`` would return).
    """
    req = self.request(prompts, max_new_tokens=max_new_tokens, seeds=seeds, k=k,
                       temperature=temperature, top_k=top_k, top_p=top_p, tau=tau,
                       budget=budget, costs=costs, synthetic_acceptance=synthetic_acceptance)
    run, n = req.run, req.num_rows
    state = self.compiled("prefill", req.greedy)(target_params, draft_params, req.requests, run)
    draft_fn = self.compiled("draft_phase", req.greedy)
    verify_fn = self.compiled("verify_phase", req.greedy)
    for step_index in range(self.max_new_tokens):   # every row runs until the last
      old_length = np.asarray(state.length_B)
      t0 = time.perf_counter()
      if self.drafter is None:
        proposal = decode.empty_proposal(self.batch_size)
      else:
        proposal, state = draft_fn(draft_params, state, run)
        jax.block_until_ready(proposal.draft_BK)
      t1 = time.perf_counter()
      state = verify_fn(target_params, state, proposal, run)
      length = np.asarray(state.length_B)
      t2 = time.perf_counter()
      tokens = np.asarray(state.tokens_BS)
      drafts = np.asarray(proposal.draft_BK)
      num = np.asarray(proposal.num_proposed_B)
      accepted = np.asarray(state.stats.accepted_TB[step_index])
      finished = np.asarray(state.finish_B)[:n] != decode.RUNNING
      last = bool(finished.all()) or step_index == self.max_new_tokens - 1
      yield StepTrace(
          step=step_index,
          drafts=[drafts[b, :num[b]].tolist() for b in range(n)],
          accepted=accepted[:n].tolist(),
          emitted=[tokens[b, old_length[b]:length[b]].tolist() for b in range(n)],
          finished=finished.tolist(),
          draft_time_s=t1 - t0, verify_time_s=t2 - t1,
          rows=_unpack(jax.device_get(state), n) if last else None)
      if last:
        return


def validate_synthetic_acceptance(value) -> None:
  """ValueError unless ``value`` is a real number in [0, 1]."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"synthetic_acceptance={value!r} must be a number in [0, 1]")


def _is_sequence(value) -> bool:
  return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _is_int(value) -> bool:
  """An integer, not a bool or a float that happens to be whole."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _unpack(state: decode.DecodeState, num_rows: int) -> list[RowResult]:
  tokens = np.asarray(state.tokens_BS)
  length = np.asarray(state.length_B)
  prompt_len = np.asarray(state.prompt_len_B)
  finish = np.asarray(state.finish_B)
  stats = state.stats
  accepted_TB = np.asarray(stats.accepted_TB)
  proposed_TB = np.asarray(stats.proposed_TB)
  width_T = np.asarray(stats.width_T)
  rows = []
  for b in range(num_rows):
    calls = int(stats.target_calls_B[b])
    rows.append(RowResult(
        prompt_ids=tokens[b, :prompt_len[b]].tolist(),
        output_ids=tokens[b, prompt_len[b]:length[b]].tolist(),
        finish_reason=decode.FINISH_REASONS[int(finish[b])],
        accepted_per_step=accepted_TB[:calls, b].tolist(),
        proposed_per_step=proposed_TB[:calls, b].tolist(),
        width_per_step=width_T[:calls].tolist(),
        reached_by_slot=np.asarray(stats.reached_BK[b]).tolist(),
        accepted_by_slot=np.asarray(stats.accepted_BK[b]).tolist(),
        expected_accept_by_slot=np.asarray(stats.expected_accept_BK[b]).tolist(),
        target_calls=calls))
  return rows
