"""Tests for the built-in prompt suite and user prompt files."""

import json

import pytest

from specdec_jax import prompts as prompts_lib
from specdec_jax.prompts import CATEGORIES, Prompt, load_prompts


def _approx_tokens(prompt: Prompt) -> float:
  """~4 characters per token of English; good enough for a size limit."""
  return sum(len(m["content"]) for m in prompt.messages) / 4


def test_all_has_every_category_with_enough_prompts():
  prompts = load_prompts("all")
  assert len(CATEGORIES) >= 6
  for category in ("chat", "summarization", "rewrite", "code", "qa", "math"):
    assert category in CATEGORIES
    assert sum(p.category == category for p in prompts) >= 5
  assert {p.category for p in prompts} == set(CATEGORIES)


def test_held_out_is_separate():
  held_out = load_prompts("held_out")
  assert len(held_out) >= 6
  assert all(p.category == "held_out" for p in held_out)
  all_texts = {p.text() for p in load_prompts("all")}
  assert not all_texts & {p.text() for p in held_out}


def test_ids_unique_and_prompts_well_formed():
  prompts = load_prompts("all") + load_prompts("held_out")
  assert len({p.id for p in prompts}) == len(prompts)
  for p in prompts:
    assert p.id.startswith(p.category + "-")
    assert p.messages[-1]["role"] == "user"
    assert p.text() == p.messages[-1]["content"]
    assert p.text().strip()
    assert _approx_tokens(p) < 350, p.id
    hash(p)  # usable in sets / as dict keys


def test_chat_prompts_are_multi_turn():
  for p in load_prompts("chat"):
    roles = [m["role"] for m in p.messages]
    assert "assistant" in roles and roles.count("user") >= 2, p.id


def test_summarization_passages_have_expected_length():
  for p in load_prompts("summarization"):
    passage = p.text().split("\n\n", 1)[1]
    assert 120 <= len(passage.split()) <= 200, p.id


def test_selection_single_and_comma_list():
  code = load_prompts("code")
  assert code and all(p.category == "code" for p in code)
  mixed = load_prompts(" code , math,code")
  assert [p.category for p in mixed] == ["code"] * len(code) + ["math"] * len(load_prompts("math"))


def test_loading_is_deterministic():
  assert [p.id for p in load_prompts()] == [p.id for p in load_prompts()]
  assert load_prompts("qa") == load_prompts("qa")


@pytest.mark.parametrize("selection", ["poetry", "code,poetry", "", " , "])
def test_unknown_or_empty_selection_raises(selection):
  with pytest.raises(ValueError) as e:
    load_prompts(selection)
  assert "chat" in str(e.value)  # lists the valid categories
  if "poetry" in selection:
    assert "poetry" in str(e.value)


def _write(tmp_path, lines, name="p.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_prompts_file_replaces_builtin(tmp_path):
  path = _write(tmp_path, [
      json.dumps({"prompt": "Hello there"}),
      "",
      json.dumps({"prompt": "Fix this code", "category": "code"}),
      json.dumps({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "how are you?"}],
                  "category": "chat"}),
      json.dumps({"prompt": "Second custom"}),
  ])
  prompts = load_prompts("all", prompts_file=path)
  assert [p.id for p in prompts] == ["custom-0", "custom-1", "code-0", "chat-0"]
  assert prompts[0].messages == ({"role": "user", "content": "Hello there"},)
  assert prompts[3].text() == "how are you?"
  assert len(prompts[3].messages) == 3
  assert [p.id for p in load_prompts("chat", prompts_file=path)] == ["chat-0"]
  with pytest.raises(ValueError, match="math"):
    load_prompts("math", prompts_file=path)


@pytest.mark.parametrize("bad_line", [
    "{not json",
    json.dumps({"text": "no prompt key"}),
    json.dumps({"prompt": 42}),
    json.dumps({"prompt": "   "}),
    json.dumps(["a", "list"]),
    json.dumps({"prompt": "ok", "category": 7}),
    json.dumps({"messages": []}),
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": "x"},
                             {"role": "assistant", "content": "y"}]}),
])
def test_malformed_prompts_file_names_file_and_line(tmp_path, bad_line):
  path = _write(tmp_path, [json.dumps({"prompt": "fine"}), bad_line])
  with pytest.raises(ValueError) as e:
    load_prompts("all", prompts_file=path)
  assert f"{path}:2" in str(e.value)


def test_empty_and_missing_prompts_file(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n", encoding="utf-8")
  with pytest.raises(ValueError, match="empty.jsonl"):
    load_prompts("all", prompts_file=str(empty))
  with pytest.raises(ValueError, match="nope.jsonl"):
    load_prompts("all", prompts_file=str(tmp_path / "nope.jsonl"))


def test_builtin_data_files_exist_for_every_category():
  import importlib.resources
  files = importlib.resources.files(prompts_lib.__name__)
  for category in list(CATEGORIES) + [prompts_lib.HELD_OUT]:
    assert files.joinpath(f"{category}.json").is_file()
