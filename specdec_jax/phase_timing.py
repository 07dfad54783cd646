"""Timing the compiled phases one at a time: what a prefill, a draft phase
and a verify pass at each static width cost on this machine.

The ``auto`` policy weighs these costs (``policy_costs``), the benchmark
reports them and predicts the speedup from them (``diagnose.model_speedup``).
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import decode
from specdec_jax import policies


@dataclasses.dataclass(frozen=True)
class PhaseCosts:
  """Median seconds of the compiled phases (warm).

  prefill_s: one prefill of the probe batch.
  draft_s: one draft phase (0 for plain decoding).
  verify_s_by_width: {verify width: seconds of one verify pass at it}.
  verify_s: one verify pass at the width the drafts asked for (None where
    not measured).
  """

  prefill_s: float
  draft_s: float
  verify_s_by_width: dict
  verify_s: float | None = None


def median(rounds: list[PhaseCosts]) -> PhaseCosts:
  """Field-wise medians of several measurements (each width on its own)."""
  mid = lambda values: float(np.median(values))
  return PhaseCosts(
      prefill_s=mid([r.prefill_s for r in rounds]), draft_s=mid([r.draft_s for r in rounds]),
      verify_s_by_width={w: mid([r.verify_s_by_width[w] for r in rounds])
                         for w in rounds[0].verify_s_by_width},
      verify_s=None if rounds[0].verify_s is None else mid([r.verify_s for r in rounds]))


def measure(gen, target_params, draft_params, prompts, *, iters: int = 10,
            **run_kwargs) -> PhaseCosts:
  """Times the phases of ``gen`` (a ``generation.Generator``) on its first
  batch_size prompts; ``run_kwargs`` as for ``Generator.generate`` (k,
  temperature, ...).

  Draft and verify run repeatedly from a freshly prefilled state, which
  each call takes by donation and passes on (as the fused loop updates its
  caches in place, a copy of them would be timed otherwise); the verify
  calls re-check the same proposal, the same work as a real step. A width
  is timed by giving every row that many drafts minus one; the state is
  prefilled again (untimed) before a row could run out of its budget.
  """
  req = gen.request(prompts[:gen.batch_size], **run_kwargs)
  run, n = req.run, req.num_rows
  prefill_fn = gen.compiled("prefill", req.greedy)
  prefill = lambda: prefill_fn(target_params, draft_params, req.requests, run)
  call = lambda: jax.block_until_ready(prefill())
  call()
  prefill_s = median_time(call, max(1, iters // 4))
  box = {"state": prefill()}
  if gen.drafter is None:
    box["proposal"] = decode.empty_proposal(gen.batch_size)
    draft_s = 0.0
  else:
    draft_fn = gen.compiled("draft_phase", req.greedy)

    def draft_call():
      box["proposal"], box["state"] = jax.block_until_ready(
          draft_fn(draft_params, box["state"], run))

    draft_call()
    draft_s = median_time(draft_call, iters)
  verify_fn = gen.compiled("verify_phase", req.greedy)
  proposal = box["proposal"]

  def out_of_room(width) -> bool:
    """Whether some row cannot commit ``width`` more tokens. A function of its
    own, so that no host view of the state outlives it: on CPU that view
    shares the device buffers, and the donated state (its caches) would be
    copied on every timed call instead."""
    state = gen.to_host(box["state"])
    used = state.length_B - state.prompt_len_B
    return bool(np.any(used + width > state.max_new_B[:n]) or np.any(
        state.finish_B[:n] != decode.RUNNING))

  def timed_verify(proposal, width):
    def run_once():
      if out_of_room(width):
        box["state"] = jax.block_until_ready(prefill())   # untimed
      t0 = time.perf_counter()
      box["state"] = jax.block_until_ready(
          verify_fn(target_params, box["state"], proposal, run))
      return time.perf_counter() - t0
    return run_once

  natural = int(np.max(gen.to_host(proposal).num_proposed_B)) + 1
  verify_s = median_seconds(timed_verify(proposal, natural), iters, warmup=1)
  by_width = {}
  for width in gen.verify_widths:
    forced = proposal.replace(num_proposed_B=jnp.full_like(proposal.num_proposed_B, width - 1))
    by_width[width] = median_seconds(timed_verify(forced, width), iters, warmup=1)
  return PhaseCosts(prefill_s=prefill_s, draft_s=draft_s, verify_s_by_width=by_width,
                    verify_s=verify_s)


def policy_costs(phases: PhaseCosts, widths, k: int) -> policies.Costs:
  """``policies.Costs`` (what the auto policy weighs): every width's verify
  pass and one draft token (draft phase / k), in width-1 passes."""
  by_width = phases.verify_s_by_width
  step_s = by_width[widths[0]] if widths[0] == 1 else phases.verify_s
  return policies.Costs(
      verify_W=jnp.asarray([by_width[w] / step_s for w in widths], jnp.float32),
      draft=jnp.float32(phases.draft_s / (max(k, 1) * step_s)))


def measure_policy_costs(gen, target_params, draft_params, prompts, *, iters: int = 5,
                         **run_kwargs) -> policies.Costs:
  """The auto policy's costs for ``gen``, measured on this machine."""
  phases = measure(gen, target_params, draft_params, prompts, iters=iters, **run_kwargs)
  return policy_costs(phases, gen.verify_widths, run_kwargs.get("k") or gen.k_max)


def median_time(fn, iters: int) -> float:
  """Median wall time of ``fn()`` (which must block on its result)."""
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def median_seconds(run_once, iters: int, warmup: int = 0) -> float:
  """Median of ``run_once()``'s returned seconds over ``iters`` runs."""
  for _ in range(warmup):
    run_once()
  return float(np.median([run_once() for _ in range(iters)]))
