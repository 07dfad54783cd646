"""job=fidelity: checks that the configured rule preserves the target distribution.

Builds a tiny-vocabulary random target (``fidelity.vocab_size`` tokens) and,
for drafters that run a draft model (model, ngram+model), a draft that is the
target with Gaussian noise of ``fidelity.draft_noise`` x each weight matrix's
std added (0.1: about 0.7 of the drafts accepted at K=2, so accepted,
rejected and bonus tokens are all frequent; two unrelated random models
agree too rarely for that); enumerates the exact warped distribution of the next
``fidelity.num_tokens`` tokens; samples ``fidelity.num_samples``
continuations with speculative decoding (one seed per sample); writes
p_value, tv_distance, n_samples, passed, and the drafts proposed, accepted
and the bonus tokens drawn (so a drafter that never proposes cannot pass
unnoticed) to summary.json. Use k < fidelity.num_tokens, or the bonus token
(drawn after a full acceptance) never enters the samples.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections

from specdec_jax import drafters
from specdec_jax import fidelity
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax import verify
from specdec_jax.jobs import io



def fidelity_config(config) -> ml_collections.ConfigDict:
  """The config with tiny-vocab random models and fidelity-sized buffers."""
  c = ml_collections.ConfigDict(config.to_dict())
  f = config.fidelity
  if drafters.kind(config.decode.drafter).draft_model == "model" and f.draft_noise > 0:
    c.draft = ml_collections.ConfigDict(c.model.to_dict())   # perturbed in run_fidelity
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
  if config.sampling.temperature == 0:
    raise ValueError("config.job=fidelity needs config.sampling.temperature > 0 (greedy is "
                     "checked token for token by the tests)")
  if not drafters.kind(config.decode.drafter).speculative:
    raise ValueError("config.job=fidelity needs a drafter (ngram or model)")
  f = config.fidelity
  c = fidelity_config(config)
  runtime.validate_config(c)
  target, target_params, _ = runtime.load_model(c.model, c)
  drafter, draft_params = runtime.build_drafter(c, target, target_params=target_params)
  if drafters.kind(config.decode.drafter).draft_model == "model" and f.draft_noise > 0:
    draft_params = perturbed_copy(target_params, f.draft_noise, config.seed)
  rt = runtime.Runtime(config=c, target=target, target_params=target_params,
                       tokenizer=_NoEosTokenizer(), drafter=drafter, draft_params=draft_params)
  generator = rt.generator()
  sp = sampling.SamplingParams.create(**c.sampling)
  prompt = [int(t) for t in f.get("prompt", (0, 1, 2))]
  if not prompt or max(prompt) >= f.vocab_size or min(prompt) < 0:
    raise ValueError(f"config.fidelity.prompt={tuple(prompt)} needs token ids in "
                     f"[0, fidelity.vocab_size={f.vocab_size})")
  expected = fidelity.exact_sequence_probs(target, target_params, prompt, f.num_tokens, sp)
  samples, drafts = [], {"proposed": 0, "accepted": 0, "bonus_tokens": 0,
                         "steps_accepting_2_or_more": 0}
  for start in range(0, f.num_samples, c.batch_size):
    count = min(c.batch_size, f.num_samples - start)
    seeds = [(config.seed * f.num_samples + start + i) % 2**32 for i in range(count)]
    result = generator.generate(target_params, rt.draft_params, [prompt] * count,
                                seeds=seeds, **rt.run_kwargs())
    samples.extend(tuple(r.output_ids) for r in result.rows)
    for row in result.rows:
      for key, value in draft_counts(row).items():
        drafts[key] += value
    log(f"sampled {len(samples)}/{f.num_samples}")
  stats = fidelity.chi_square_test(samples, expected)
  stats.update(drafts, acceptance_rate=drafts["accepted"] / max(drafts["proposed"], 1))
  stats["passed"] = bool(stats["p_value"] > f.alpha)
  stats.update(rule=config.decode.rule, drafter=config.decode.drafter, k=config.decode.k,
               **config.sampling,
               vocab_size=f.vocab_size, num_tokens=f.num_tokens, alpha=f.alpha,
               exact_rule=verify.is_exact(config.decode.rule, greedy=False))
  return stats


def perturbed_copy(params, noise: float, seed: int):
  """``params`` with N(0, (noise * std(leaf))^2) added to every matrix."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [x + noise * jnp.std(x) * jax.random.normal(key, x.shape, x.dtype) if x.ndim >= 2
           else x for x, key in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def draft_counts(row) -> dict:
  """Drafts proposed and accepted by one row, and the bonus tokens it
  committed (steps that accepted every proposed draft and then committed the
  target's extra token, not cut by max_new_tokens)."""
  committed, bonus = 0, 0
  for n, k in zip(row.accepted_per_step, row.proposed_per_step):
    step_tokens = min(n + 1, len(row.output_ids) - committed)
    bonus += k > 0 and n == k and step_tokens == n + 1
    committed += step_tokens
  return {"proposed": sum(row.proposed_per_step), "accepted": sum(row.accepted_per_step),
          "bonus_tokens": bonus,
          "steps_accepting_2_or_more": sum(n >= 2 for n in row.accepted_per_step)}


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
      f"n={summary['n_samples']} passed={summary['passed']} "
      f"acceptance={summary['acceptance_rate']:.2f} bonus_tokens={summary['bonus_tokens']}")
  return summary
