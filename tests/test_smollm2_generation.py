"""Greedy generation on the real SmolLM2 GGUF equals transformers' generate.

Plain decoding and n-gram speculative decoding (the loop the benchmark runs)
must both reproduce transformers' greedy tokens exactly, EOS included.
"""

import numpy as np
import pytest

import hf_reference
from specdec_jax.drafters import NgramDrafter
from specdec_jax.generation import Generator
from specdec_jax.models import tokenizers
from specdec_jax.models.transformer import Transformer

pytestmark = pytest.mark.slow

MAX_NEW = 64
MESSAGES = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Repeat exactly: red, green, blue, red, green, blue, red"}],
    [{"role": "user", "content": "Complete this Python code:\ndef fibonacci(n):\n    "
      "if n < 2:\n        return n\n    return"}],
)


@pytest.fixture(scope="module")
def setup():
  cfg, params, info = hf_reference.our_smollm2()
  tokenizer = tokenizers.load_tokenizer_from_gguf(info)
  prompts = [tokenizer.encode(tokenizer.apply_chat_template(m)) for m in MESSAGES]
  return Transformer(cfg), params, tokenizer, prompts


@pytest.fixture(scope="module")
def reference_outputs(setup):
  import torch
  _, _, tokenizer, prompts = setup
  model = hf_reference.hf_smollm2_model()
  outputs = []
  for ids in prompts:
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW,
                           eos_token_id=list(tokenizer.eos_ids),
                           pad_token_id=tokenizer.eos_ids[0])
    outputs.append(out[0, len(ids):].tolist())
  return outputs


@pytest.mark.parametrize("drafter_name", ["plain", "ngram"])
def test_greedy_generation_matches_transformers(setup, reference_outputs, drafter_name):
  target, params, tokenizer, prompts = setup
  drafter = NgramDrafter() if drafter_name == "ngram" else None
  generator = Generator(target, drafter, k_max=4 if drafter else 0, max_prompt_len=128,
                        max_new_tokens=MAX_NEW, batch_size=1, eos_ids=tokenizer.eos_ids)
  result = generator.generate(params, {}, prompts)
  for row, expected in zip(result.rows, reference_outputs):
    assert row.output_ids == expected, tokenizer.decode(row.output_ids)
  # The copy-heavy prompt must actually exercise acceptance.
  if drafter:
    assert sum(result.rows[1].accepted_per_step) > 0
  assert any(len(o) >= 16 for o in reference_outputs)
  assert np.mean([len(o) for o in reference_outputs]) > 8
