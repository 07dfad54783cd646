"""job=fidelity: checks that the configured rule preserves the target distribution.

Builds a tiny-vocabulary random target (``fidelity.vocab_size`` tokens) and,
for drafter=model, a different random draft with the same shapes as the
config's draft; enumerates the exact warped distribution of the next
``fidelity.num_tokens`` tokens; samples ``fidelity.num_samples``
continuations with speculative decoding (one seed per sample); writes
p_value, tv_distance, n_samples, passed to summary.json.
"""

import os

import ml_collections
import numpy as np

from specdec_jax import fidelity
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax.jobs import io

PROMPT = [0, 1, 2]


def fidelity_config(config) -> ml_collections.ConfigDict:
  """The config with tiny-vocab random models and fidelity-sized buffers."""
  c = ml_collections.ConfigDict(config.to_dict())
  f = config.fidelity
  for name, seed in (("model", 100), ("draft", 200)):
    c[name].source = "random"
    c[name].vocab_size = f.vocab_size
    c[name].init_seed = seed
    c[name].logit_scale = f.logit_scale
  c.tokenizer = "byte"
  c.max_prompt_len = 16
  c.max_new_tokens = f.num_tokens
  c.batch_size = f.batch_size
  return c


def run_fidelity(config, log=print) -> dict:
  if config.temperature == 0:
    raise ValueError("config.job=fidelity needs config.temperature > 0 (greedy is "
                     "checked token for token by the tests)")
  if config.drafter == "none":
    raise ValueError("config.job=fidelity needs a drafter (ngram or model)")
  f = config.fidelity
  c = fidelity_config(config)
  runtime.validate_config(c)
  target, target_params, _ = runtime.load_model(c.model, c)
  drafter, draft_params = runtime.build_drafter(c, target, target_params=target_params)
  rt = runtime.Runtime(config=c, target=target, target_params=target_params,
                       tokenizer=_NoEosTokenizer(), drafter=drafter, draft_params=draft_params)
  generator = rt.generator()
  sp = sampling.SamplingParams.create(c.temperature, c.top_k, c.top_p)
  expected = fidelity.exact_sequence_probs(target, target_params, PROMPT, f.num_tokens, sp)
  samples = []
  for start in range(0, f.num_samples, c.batch_size):
    count = min(c.batch_size, f.num_samples - start)
    seeds = [(config.seed * f.num_samples + start + i) % 2**32 for i in range(count)]
    result = generator.generate(target_params, rt.draft_params, [PROMPT] * count,
                                seeds=seeds, **rt.run_kwargs())
    samples.extend(tuple(r.output_ids) for r in result.rows)
    log(f"sampled {len(samples)}/{f.num_samples}")
  stats = fidelity.chi_square_test(samples, expected)
  stats["passed"] = bool(stats["p_value"] > f.alpha)
  stats.update(rule=config.rule, drafter=config.drafter, k=config.k,
               temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
               vocab_size=f.vocab_size, num_tokens=f.num_tokens, alpha=f.alpha,
               exact_rule=config.rule in ("rejection", "coupled"))
  return stats


class _NoEosTokenizer:
  """The fidelity models have no EOS: every sample has num_tokens tokens."""

  eos_ids = ()


def run(config, workdir: str, log=print) -> dict:
  workdir = io.prepare_workdir(workdir)
  summary = run_fidelity(config, log=log)
  summary["job"] = "fidelity"
  io.write_json(os.path.join(workdir, "summary.json"), summary)
  log(f"rule={summary['rule']} drafter={summary['drafter']} K={summary['k']}: "
      f"p_value={summary['p_value']:.4g} tv={summary['tv_distance']:.4f} "
      f"n={summary['n_samples']} passed={summary['passed']}")
  return summary
