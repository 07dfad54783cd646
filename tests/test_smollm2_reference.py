"""SmolLM2-135M-Instruct (Q4_1 GGUF): our import, model and tokenizer against
transformers loading the same file.

Both sides dequantize with gguf.quants, so float32 logits agree to float32
rounding (~2e-4 at logits of ~20).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference
from common import assert_close_in_float32

pytestmark = pytest.mark.slow

TOKENIZER_STRINGS = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "x = [1, 2, 3]; y = {'k': None, \"v\": 3.14}  # comment",
    "The year 2024 had 366 days; pi ~ 3.14159 and 1,000,000 people.",
    "12345678901234567890 007 -42 +3e-10",
    "naïve café — Ελληνικά, 日本語のテキスト, русский текст, עברית",
    "emoji: 😀👍🏽 🇫🇷 family 👨‍👩‍👧 ✓ ★",
    "spaces    and\t\ttabs\n\n\n   trailing   ",
    "   leading spaces and\r\nwindows newlines",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|><repo_name>repo<file_sep>",
    "it's don't I'll we've THEY'RE",
    "a" * 40 + " " + "ab" * 20,
    "\u00a0no-break space, zero\u200bwidth",
    "",
]


@pytest.fixture(scope="session")
def ours(smollm2):
  target, params, tokenizer = smollm2
  return target, params, tokenizer


def _prompts(tokenizer):
  chat = tokenizer.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France? Answer briefly."}])
  return {
      "plain": "The quick brown fox jumps over the lazy dog. The capital of France is",
      "chatml": chat,
      "code": "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot =",
  }


def test_logits_match_transformers(ours, hf_smollm2):
  import torch  # pylint: disable=g-import-not-at-top
  model, params, tokenizer = ours
  hf_model = hf_smollm2
  apply = jax.jit(model.apply)
  for name, text in _prompts(tokenizer).items():
    ids = tokenizer.encode(text)
    seq = len(ids)
    with torch.no_grad():
      ref_TV = hf_model(torch.tensor([ids])).logits[0].numpy()
    logits_BTV, _ = apply(params, jnp.asarray([ids], jnp.int32),
                          jnp.arange(seq, dtype=jnp.int32)[None], model.init_cache(1, seq + 4))
    out_TV = np.asarray(logits_BTV[0])
    max_diff = float(np.abs(out_TV - ref_TV).max())
    print(f"{name}: T={seq} max|diff|={max_diff:.2e} max|logit|={np.abs(ref_TV).max():.1f}")
    assert_close_in_float32(out_TV, ref_TV, what=name)
    # The argmax agrees wherever the reference's top-2 gap is beyond that error.
    top2_T2 = np.sort(ref_TV, axis=-1)[:, -2:]
    clear_T = top2_T2[:, 1] - top2_T2[:, 0] > 20 * max_diff
    assert clear_T.sum() >= seq // 2, name
    np.testing.assert_array_equal(out_TV.argmax(-1)[clear_T], ref_TV.argmax(-1)[clear_T],
                                  err_msg=name)


def test_tokenizer_ids_match_transformers(ours):
  tokenizer = ours[2]
  ref = hf_reference.hf_smollm2_tokenizer()
  for text in TOKENIZER_STRINGS:
    assert tokenizer.encode(text) == ref(text)["input_ids"], text


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_decode_round_trip(ours, text):
  tokenizer = ours[2]
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids(ours):
  tokenizer = ours[2]
  assert tokenizer.vocab_size == 49152
  assert tokenizer.bos_id == 1 and not tokenizer.wants_bos
  assert tokenizer.eos_ids == (2, 0)  # <|im_end|>, <|endoftext|>
  assert tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
  assert tokenizer.decode([1, 28120, 2], skip_special=True) == "hello"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 😀"},
     {"role": "user", "content": "Write code:\n```py\nx = 1\n```"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, messages, add_generation_prompt):
  tokenizer = ours[2]
  ref = hf_reference.hf_smollm2_tokenizer()
  expected = ref.apply_chat_template(messages, tokenize=False,
                                     add_generation_prompt=add_generation_prompt)
  assert tokenizer.apply_chat_template(messages, add_generation_prompt) == expected
  if messages[0]["role"] != "system":  # SmolLM2 inserts a default system prompt
    assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
