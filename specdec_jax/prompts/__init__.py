"""Benchmark prompt suite in the spirit of Spec-Bench, plus user prompt files.

Acceptance rates depend strongly on the kind of text being generated:
copy-heavy tasks (rewrite, code editing, summarisation of a given passage)
let a drafter reuse prompt text, while open-ended chat does not. Reports
therefore break results down by category.

The built-in prompts live in one JSON file per category next to this module
(``specdec_jax/prompts/*.json``, shipped as package data). Each file holds::

    {"category": "...", "description": "...",
     "prompts": [{"prompt": "..."} | {"messages": [{"role": ..., "content": ...}, ...]}]}

A user file given as ``prompts_file`` is JSONL, one object per line::

    {"prompt": "Summarise ...", "category": "summarization"}
    {"messages": [{"role": "user", "content": "..."}, ...], "category": "chat"}

``category`` defaults to ``"custom"``.
"""

import dataclasses
import importlib.resources
import json
import os

# Categories that make up the "all" selection, in report order.
CATEGORIES = ("chat", "summarization", "rewrite", "code", "qa", "math")
# Selectable by name, but not part of "all": used to evaluate a distilled
# draft on prompts it was not trained on.
HELD_OUT = "held_out"
ROLES = ("system", "user", "assistant")
DEFAULT_CUSTOM_CATEGORY = "custom"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One benchmark prompt.

  Attributes:
    id: unique name, ``f"{category}-{index}"`` with a 0-based index.
    category: e.g. "code".
    messages: tuple of ``{"role": ..., "content": ...}`` dicts, oldest first;
      the last one is the user turn to answer. Pass ``list(messages)`` to a
      tokenizer's ``apply_chat_template``. Treat the dicts as read-only.
  """

  id: str
  category: str
  messages: tuple

  def __hash__(self):
    # Explicit because the dicts in `messages` are not hashable.
    pairs = tuple((m["role"], m["content"]) for m in self.messages)
    return hash((self.id, self.category, pairs))

  def text(self) -> str:
    """Plain text of the final user turn (for base or byte-level models)."""
    for message in reversed(self.messages):
      if message["role"] == "user":
        return message["content"]
    raise ValueError(f"prompt {self.id} has no user turn")


def load_prompts(selection: str = "all", prompts_file: str | None = None) -> list[Prompt]:
  """Returns the prompts of the selected categories.

  Args:
    selection: "all" (every category in ``CATEGORIES``), one category name,
      or a comma-separated list of names (e.g. "code,rewrite"). "held_out" is
      only returned when named explicitly.
    prompts_file: optional JSONL file that replaces the built-in suite. Then
      "all" means every prompt in the file, and category names refer to the
      categories used in the file.

  Raises:
    ValueError: unknown category, or a missing / malformed prompts file.
  """
  if prompts_file is not None:
    prompts = _load_jsonl(prompts_file)
    available = _unique([p.category for p in prompts])
    everything = available
  else:
    available = list(CATEGORIES) + [HELD_OUT]
    everything = list(CATEGORIES)
    prompts = [p for category in available for p in _load_builtin(category)]
  wanted = _parse_selection(selection, available, everything)
  return [p for category in wanted for p in prompts if p.category == category]


def _unique(items: list) -> list:
  """Removes duplicates, keeping the first occurrence's order."""
  return list(dict.fromkeys(items))


def _parse_selection(selection: str, available: list, everything: list) -> list:
  """Turns "all" / "a" / "a,b" into a list of category names."""
  names = []
  if isinstance(selection, str):
    names = _unique([name.strip() for name in selection.split(",") if name.strip()])
  if not names:
    raise ValueError(f"empty prompt selection {selection!r}; use 'all' or a comma list of {available}")
  if names == ["all"]:
    return list(everything)
  for name in names:
    if name not in available:
      raise ValueError(
          f"unknown prompt category {name!r}; valid: 'all' or a comma list of {available}")
  return names


def _load_builtin(category: str) -> list[Prompt]:
  """Reads ``<category>.json`` from the package data."""
  resource = importlib.resources.files(__name__).joinpath(f"{category}.json")
  data = json.loads(resource.read_text(encoding="utf-8"))
  prompts = []
  for index, item in enumerate(data["prompts"]):
    where = f"{category}.json prompt {index}"
    messages = _messages_from_item(item, where)
    prompts.append(Prompt(f"{category}-{index}", category, messages))
  return prompts


def _load_jsonl(path: str) -> list[Prompt]:
  """Reads a user prompt file; every error names the file and line number."""
  if not os.path.isfile(path):
    raise ValueError(f"prompts file {path} does not exist or is not a file")
  prompts = []
  counts = {}
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      item = _parse_line(line, where)
      category = item.get("category", DEFAULT_CUSTOM_CATEGORY)
      if not isinstance(category, str) or not category.strip() or "," in category:
        raise ValueError(f"{where}: 'category' must be a non-empty string without commas")
      messages = _messages_from_item(item, where)
      index = counts.get(category, 0)
      counts[category] = index + 1
      prompts.append(Prompt(f"{category}-{index}", category, messages))
  if not prompts:
    raise ValueError(f"prompts file {path} contains no prompts")
  return prompts


def _parse_line(line: str, where: str) -> dict:
  """Parses one JSONL line into a dict."""
  try:
    item = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
  if not isinstance(item, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
  return item


def _messages_from_item(item: dict, where: str) -> tuple:
  """Builds the message tuple from a ``prompt`` string or a ``messages`` list."""
  if "messages" in item:
    return _check_messages(item["messages"], where)
  if "prompt" not in item:
    raise ValueError(f"{where}: missing 'prompt' (or 'messages')")
  text = item["prompt"]
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{where}: 'prompt' must be a non-empty string")
  return ({"role": "user", "content": text},)


def _check_messages(messages, where: str) -> tuple:
  """Validates a chat message list; the last turn must be the user's."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list")
  checked = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise ValueError(f"{where}: message {i} needs a 'role' in {ROLES}")
    if not isinstance(m.get("content"), str) or not m["content"].strip():
      raise ValueError(f"{where}: message {i} needs a non-empty string 'content'")
    checked.append({"role": m["role"], "content": m["content"]})
  if checked[-1]["role"] != "user":
    raise ValueError(f"{where}: the last message must have role 'user'")
  return tuple(checked)
