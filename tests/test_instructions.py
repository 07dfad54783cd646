"""Distillation prompts: templated instructions and the target's own
(self-instructed, Magpie-style) ones: the pre-query prefix, the filters and
determinism."""

import dataclasses

import pytest

from specdec_jax.distill import instructions
from specdec_jax.models.tokenizers import ByteTokenizer


def test_templated_instructions_are_distinct_and_deterministic():
  a = instructions.templated_instructions(200, seed=3)
  assert len(a) == 200 and len(set(a)) == 200
  assert a == instructions.templated_instructions(200, seed=3)
  assert a != instructions.templated_instructions(200, seed=4)
  # Asking for more than the pool gives the whole pool, once.
  everything = instructions.templated_instructions(10**6, seed=3)
  assert len(everything) == len(set(everything)) > 200


class _ChatBytes(ByteTokenizer):
  """Byte tokenizer with a configurable chat template text."""

  def __init__(self, before: str, show_user: bool = True):
    self.before, self.show_user = before, show_user

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return self.before + (messages[0]["content"] if self.show_user else "") + "\n"


class _NoBos(ByteTokenizer):
  @property
  def bos_id(self):
    return None


def test_pre_query_prefix():
  tok = _ChatBytes("<user>")
  assert instructions.pre_query_prefix(tok, chat=True) == tok.encode("<user>")
  # A template with nothing before the user's words starts from BOS.
  assert instructions.pre_query_prefix(_ChatBytes(""), chat=True) == [256]
  assert instructions.pre_query_prefix(ByteTokenizer(), chat=False) == [256]
  with pytest.raises(ValueError, match="does not show the user's message"):
    instructions.pre_query_prefix(_ChatBytes("<user>", show_user=False), chat=True)
  with pytest.raises(ValueError, match="BOS"):
    instructions.pre_query_prefix(_NoBos(), chat=False)


@dataclasses.dataclass
class _Row:
  output_ids: list
  finish_reason: str


@dataclasses.dataclass
class _Result:
  rows: list


class _ScriptedGenerator:
  """Returns scripted completions in order, a batch at a time, and records
  the seeds it was asked for."""

  def __init__(self, completions, batch_size=4):
    self.completions, self.batch_size, self.seeds = list(completions), batch_size, []

  def generate(self, params, draft_params, prompts, seeds, temperature, top_p):
    assert temperature == instructions.SELF_INSTRUCT_TEMPERATURE
    assert top_p == instructions.SELF_INSTRUCT_TOP_P
    self.seeds.extend(seeds)
    rows = []
    for _ in prompts:
      text, reason = self.completions.pop(0) if self.completions else ("", "length")
      rows.append(_Row(ByteTokenizer().encode(text) + ([257] if reason == "eos" else []), reason))
    return _Result(rows)


def test_self_instruct_filters_and_draws_more_rounds():
  script = [("Write a poem about rain", "eos"),
            ("too short", "eos"),                       # < 3 words
            ("Explain how tides work in detail", "length"),  # hit the cap
            ("Write a poem about rain", "eos"),         # repeat
            ("Summarise the held out text", "eos"),     # excluded
            ("List three uses of copper", "eos"),
            ("Describe a day at the beach", "eos")]
  gen = _ScriptedGenerator(script)
  got = instructions.self_instruct(gen, None, ByteTokenizer(), [256], count=3, seed=5,
                                   exclude=[" Summarise the held out text "], log=lambda *_: None)
  assert got == ["Write a poem about rain", "List three uses of copper",
                 "Describe a day at the beach"]
  assert len(gen.seeds) == 8 and len(set(gen.seeds)) == 8      # two rounds of 4
  again = _ScriptedGenerator(script)
  instructions.self_instruct(again, None, ByteTokenizer(), [256], count=3, seed=5,
                             log=lambda *_: None)
  assert again.seeds == gen.seeds                             # a function of the seed


def test_self_instruct_gives_up_with_a_clear_error():
  gen = _ScriptedGenerator([("no", "eos")] * 100)
  with pytest.raises(ValueError, match="only 0 of 2 usable instructions"):
    instructions.self_instruct(gen, None, ByteTokenizer(), [256], count=2, seed=0,
                               log=lambda *_: None)
