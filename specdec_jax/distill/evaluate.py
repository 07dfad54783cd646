"""Greedy acceptance of a draft against the target on held-out prompts.

The same compiled ``Generator`` (the draft's drafter, K drafts, temperature 0) is
reused for every evaluation of a run: new draft params are arguments, so
nothing recompiles after the first call.
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
               max_new_tokens: int, batch_size: int):
    if not prompt_ids:
      raise ValueError("no held-out prompts to evaluate the draft on")
    self.rt, self.prompt_ids, self.k = rt, prompt_ids, k
    max_prompt = max(MIN_PROMPT_SLOTS, max(len(p) for p in prompt_ids))
    self.generator = Generator(
        rt.target, drafter, k_max=k, max_prompt_len=max_prompt,
        max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(prompt_ids)),
        eos_ids=rt.eos_ids)

  def __call__(self, draft_params) -> dict:
    start = time.perf_counter()
    result = self.generator.generate(self.rt.target_params, draft_params, self.prompt_ids,
                                     temperature=0.0)
    acc = metrics.acceptance_summary(result.rows, self.k)
    return {"k": self.k, "num_prompts": len(self.prompt_ids),
            "acceptance_rate": acc["acceptance_rate"],
            "mean_accepted_length": acc["mean_accepted_length"] or 0.0,
            "acceptance_by_position": acc["acceptance_by_position"],
            "generated_tokens": sum(len(r.output_ids) for r in result.rows),
            "wall_s": time.perf_counter() - start}
