"""Greedy acceptance of a draft against the target on held-out prompts.

The same compiled ``Generator`` (the draft's drafter, K drafts, temperature 0) is
reused for every evaluation of a run: new draft params are arguments, so
nothing recompiles after the first call. The draft is measured alone and,
optionally, behind prompt lookup (``drafter=ngram+model`` / ``ngram+feature``,
a second Generator, so an evaluation then costs about twice as much).
"""

import time

from specdec_jax import metrics
from specdec_jax.drafters import Drafter
from specdec_jax.generation import Generator

MIN_PROMPT_SLOTS = 64


class HeldOutEval:
  """Callable: full draft params -> acceptance metrics on fixed prompts.

  Args:
    rt: the Runtime (target, its params, EOS ids).
    drafter: the Drafter over the draft model (``drafters.for_draft_model``).
    prompt_ids: token id lists of the held-out prompts.
    k: draft length.
    max_new_tokens, batch_size: generation size per prompt / rows per call.
  """

  def __init__(self, rt, drafter: Drafter, prompt_ids: list, k: int,
               max_new_tokens: int, batch_size: int, lookup_drafter: Drafter | None = None):
    if not prompt_ids:
      raise ValueError("no held-out prompts to evaluate the draft on")
    self.rt, self.prompt_ids, self.k = rt, prompt_ids, k
    max_prompt = max(MIN_PROMPT_SLOTS, max(len(p) for p in prompt_ids))
    make = lambda d: Generator(
        rt.target, d, k_max=k, max_prompt_len=max_prompt,
        max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(prompt_ids)),
        eos_ids=rt.eos_ids)
    self.generator = make(drafter)
    self.lookup_generator = make(lookup_drafter) if lookup_drafter is not None else None

  def _measure(self, generator, draft_params) -> dict:
    result = generator.generate(self.rt.target_params, draft_params, self.prompt_ids,
                                temperature=0.0)
    acc = metrics.acceptance_summary(result.rows, self.k)
    tokens = sum(len(r.output_ids) for r in result.rows)
    return {"acceptance_rate": acc["acceptance_rate"],
            "mean_tokens_per_call": acc["mean_tokens_per_call"] or 0.0,
            "tokens_per_call": metrics.pooled_tokens_per_call(result.rows),
            "acceptance_by_position": acc["acceptance_by_position"],
            "generated_tokens": tokens}

  def __call__(self, draft_params) -> dict:
    """Metrics of the draft alone; with a ``lookup_drafter`` (the draft
    behind prompt lookup, drafters.HybridDrafter) also under ``with_lookup``.

    ``mean_tokens_per_call`` is committed tokens per target call averaged
    over prompts, ``tokens_per_call`` the same pooled over all tokens.
    """
    start = time.perf_counter()
    out = {"k": self.k, "num_prompts": len(self.prompt_ids),
           **self._measure(self.generator, draft_params)}
    if self.lookup_generator is not None:
      out["with_lookup"] = self._measure(self.lookup_generator, draft_params)
    out["wall_s"] = time.perf_counter() - start
    return out
