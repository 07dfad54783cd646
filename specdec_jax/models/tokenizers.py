"""Tokenizers behind one interface.

``Tokenizer`` is what the rest of the package uses: encode/decode, special ids,
vocab size and chat formatting. Implementations: ``ByteTokenizer`` (256 bytes
plus specials, for the tiny random models), ``HFTokenizer`` (a
``tokenizers.Tokenizer`` from a tokenizer.json or from GGUF byte-level BPE
metadata) and ``SentencePieceTokenizer`` (a ``.model`` file).
"""

import abc
import json
import os
import re
from typing import Sequence


class Tokenizer(abc.ABC):
  """Text <-> token ids."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (<= the model's vocab)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None when the model uses none."""

  @property
  @abc.abstractmethod
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end a generation (e.g. <|im_end|> and <|endoftext|>)."""

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of ``text``; special-token strings in it map to their ids."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of ``ids``."""

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str:
    """Formats [{'role': ..., 'content': ...}] as the model expects.

    The default is plain concatenation of contents (base models).
    """
    del add_generation_prompt
    return "\n".join(m["content"] for m in messages)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, then <bos>=256, <eos>=257, <pad>=258."""

  SPECIALS = ("<bos>", "<eos>", "<pad>")

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.SPECIALS)

  @property
  def bos_id(self) -> int:
    return 256

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (257,)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.bos_id] if add_bos else []
    rest = text
    while rest:
      for offset, special in enumerate(self.SPECIALS):
        if rest.startswith(special):
          ids.append(256 + offset)
          rest = rest[len(special):]
          break
      else:
        ids.extend(rest[0].encode("utf-8"))
        rest = rest[1:]
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    out = bytearray()
    pieces = []
    for i in ids:
      i = int(i)
      if i < 256:
        out.append(i)
        continue
      pieces.append(out.decode("utf-8", errors="replace"))
      out = bytearray()
      if not skip_special and i < self.vocab_size:
        pieces.append(self.SPECIALS[i - 256])
    pieces.append(out.decode("utf-8", errors="replace"))
    return "".join(pieces)


# ---------------------------------------------------------------------------
# Chat templates.

# A whole single-quoted Jinja literal '<|im_start|>system\n...<|im_end|>'; the
# body has no unescaped quote, so "'...system\n' + messages[0]..." is no match.
_CHATML_DEFAULT_SYSTEM = re.compile(
    r"'<\|im_start\|>system(?:\n|\\n)((?:[^'\\]|\\.)*?)<\|im_end\|>", re.S)


def chatml_default_system(chat_template: str | None) -> str | None:
  """The system prompt a ChatML template inserts when none is given, if any.

  SmolLM2-Instruct's template inserts "You are a helpful AI assistant named
  SmolLM, trained by Hugging Face" when the first message is not a system one.
  """
  if not chat_template:
    return None
  match = _CHATML_DEFAULT_SYSTEM.search(chat_template)
  if not match:
    return None
  return match.group(1).replace("\\n", "\n").replace("\\'", "'")


def is_chatml(chat_template: str | None) -> bool:
  return bool(chat_template) and "<|im_start|>" in chat_template


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = True,
                  default_system: str | None = None) -> str:
  """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then the
  assistant header; ``default_system`` is prepended when the first message is
  not a system message."""
  parts = []
  # SmolLM2's template inserts it inside the message loop: never for no messages.
  if default_system is not None and messages and messages[0]["role"] != "system":
    parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
  for m in messages:
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)


def _render_jinja(template: str, messages, add_generation_prompt, **special) -> str:
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError("this chat template is not ChatML and needs jinja2") from e

  def raise_exception(message):
    raise ValueError(f"chat template error: {message}")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **special)


class _LoadedTokenizer:
  """What the tokenizers loaded from files share: special ids kept in
  ``_bos_id`` / ``_eos_ids``, and apply_chat_template from a template string.

  ChatML templates (SmolLM2, Qwen) are rendered in Python (plain messages; a
  template's tool-calling branches are not reproduced), anything else with
  jinja2 when it is installed.
  """

  chat_template: str | None = None
  _bos_id: int | None = None
  _eos_ids: tuple[int, ...] = ()

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos_ids

  def _special_strings(self) -> dict:
    return {}

  def apply_chat_template(self, messages: Sequence[dict],
                          add_generation_prompt: bool = True) -> str:
    """Formats [{'role': ..., 'content': ...}] exactly as the model's template."""
    template = self.chat_template
    if not template:
      return Tokenizer.apply_chat_template(self, messages, add_generation_prompt)
    if is_chatml(template):
      return render_chatml(messages, add_generation_prompt, chatml_default_system(template))
    return _render_jinja(template, messages, add_generation_prompt, **self._special_strings())


# ---------------------------------------------------------------------------
# Hugging Face `tokenizers` backend.

_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                "<end_of_turn>", "</s>")
_CONTROL, _USER_DEFINED = 3, 4


class HFTokenizer(_LoadedTokenizer, Tokenizer):
  """Wraps a ``tokenizers.Tokenizer``.

  Special-token strings in the text (``<|im_start|>``...) map to their ids;
  ``add_bos`` is explicit (the tokenizer's own post-processor is not run).
  ``wants_bos`` records whether the model was trained with a leading BOS.
  """

  def __init__(self, tokenizer, bos_id: int | None, eos_ids: Sequence[int],
               chat_template: str | None = None, wants_bos: bool = False):
    self._tok = tokenizer
    self._bos_id = bos_id
    self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
    self.chat_template = chat_template
    self.wants_bos = wants_bos

  @property
  def backend(self):
    """The underlying ``tokenizers.Tokenizer``."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self._bos_id is None:
        raise ValueError("this tokenizer has no BOS token")
      ids = [self._bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def _special_strings(self) -> dict:
    to_str = lambda i: None if i is None else self._tok.id_to_token(i)
    return {"bos_token": to_str(self._bos_id),
            "eos_token": to_str(self._eos_ids[0] if self._eos_ids else None)}

  def save(self, folder: str) -> None:
    """Writes tokenizer.json + specdec_tokenizer.json (ids, template)."""
    os.makedirs(folder, exist_ok=True)
    self._tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "specdec_tokenizer.json"), "w") as f:
      json.dump({"bos_id": self._bos_id, "eos_ids": list(self._eos_ids),
                 "chat_template": self.chat_template, "wants_bos": self.wants_bos}, f)

  @classmethod
  def load(cls, folder: str) -> "HFTokenizer":
    """Inverse of ``save``."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    with open(os.path.join(folder, "specdec_tokenizer.json")) as f:
      meta = json.load(f)
    return cls(tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json")),
               meta["bos_id"], meta["eos_ids"], meta["chat_template"], meta["wants_bos"])


def _end_ids(names_to_ids: dict, candidates: Sequence[int | None]) -> list[int]:
  ids = [i for i in candidates if i is not None]
  ids += [names_to_ids[name] for name in _END_MARKERS if name in names_to_ids]
  return list(dict.fromkeys(ids))


def load_tokenizer_from_gguf(info) -> HFTokenizer:
  """Byte-level BPE tokenizer from a ``gguf_import.GGUFInfo``.

  Mirrors what transformers builds for such files: a BPE model over the GGUF
  vocab and merges, GPT-2 byte-level pre-tokenizer (regex split, no prefix
  space) and decoder; control tokens are special added tokens. eos_ids are
  the file's eos/eot ids plus end markers present among the control tokens
  (SmolLM2: <|im_end|>=2 and <|endoftext|>=0).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  if info.tokenizer_model != "gpt2":
    raise ValueError(f"GGUF file {info.path!r}: tokenizer model {info.tokenizer_model!r} "
                     "is not supported (only byte-level BPE, 'gpt2')")
  vocab = {tok: i for i, tok in enumerate(info.tokens)}
  merges = [tuple(m.split(" ", 1)) for m in info.merges]
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  types = info.token_types or (1,) * len(info.tokens)
  added = [tokenizers.AddedToken(info.tokens[i], special=(t == _CONTROL), normalized=False)
           for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
  tok.add_tokens(added)
  control = {info.tokens[i]: i for i, t in enumerate(types) if t == _CONTROL}
  return HFTokenizer(tok, info.bos_id, _end_ids(control, [info.eos_id, info.eot_id]),
                     info.chat_template, info.add_bos)


# ---------------------------------------------------------------------------
# SentencePiece backend.


class SentencePieceTokenizer(_LoadedTokenizer, Tokenizer):
  """A SentencePiece ``.model`` file.

  Control pieces written in the text (``<s>``, ``</s>``) map to their ids;
  the text between them is encoded by SentencePiece. Round-trips exactly when
  the model was trained with identity normalization and byte fallback.
  """

  def __init__(self, model_file: str, bos_id: int | None = None,
               eos_ids: Sequence[int] | None = None, chat_template: str | None = None):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(model_file):
      raise ValueError(f"SentencePiece model {model_file!r} does not exist")
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    except Exception as e:
      raise ValueError(f"SentencePiece model {model_file!r} is corrupt: {e}") from e
    self.model_file = model_file
    sp = self._sp
    self._bos_id = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
    if eos_ids is None:
      eos_ids = (sp.eos_id(),) if sp.eos_id() >= 0 else ()
    self._eos_ids = tuple(int(i) for i in eos_ids)
    self._control = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                     if sp.is_control(i) and sp.id_to_piece(i)}
    self._split = (re.compile("(" + "|".join(map(re.escape, sorted(
        self._control, key=len, reverse=True))) + ")") if self._control else None)
    self.chat_template = chat_template

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self._bos_id] if add_bos else []
    chunks = self._split.split(text) if self._split else [text]
    for chunk in chunks:
      if chunk in self._control:
        ids.append(self._control[chunk])
      elif chunk:
        ids.extend(self._sp.encode(chunk))
    return ids

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if self._sp.is_control(i):
        pieces.append(self._sp.decode(run))
        run = []
        if not skip_special:
          pieces.append(self._sp.id_to_piece(i))
      else:
        run.append(i)
    pieces.append(self._sp.decode(run))
    return "".join(pieces)

  def _special_strings(self) -> dict:
    sp = self._sp
    return {"bos_token": sp.id_to_piece(self._bos_id) if self._bos_id is not None else None,
            "eos_token": sp.id_to_piece(self._eos_ids[0]) if self._eos_ids else None}


# ---------------------------------------------------------------------------
# Hugging Face model folders.


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path!r} is not valid JSON: {e}") from e


def _token_str(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def _hf_chat_template(folder: str, tok_cfg: dict) -> str | None:
  jinja_file = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      return f.read()
  template = tok_cfg.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template


def load_tokenizer_from_hf_dir(folder: str) -> Tokenizer | None:
  """Tokenizer of a Hugging Face model folder, or None when it has none.

  Uses tokenizer.json when present, else tokenizer.model (SentencePiece).
  Special ids come from tokenizer_config.json, generation_config.json and
  config.json; the chat template from chat_template.jinja or
  tokenizer_config.json.
  """
  tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
  gen_cfg = _read_json(os.path.join(folder, "generation_config.json"))
  model_cfg = _read_json(os.path.join(folder, "config.json"))
  template = _hf_chat_template(folder, tok_cfg)
  as_list = lambda v: [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])
  eos_candidates = as_list(gen_cfg.get("eos_token_id")) + as_list(model_cfg.get("eos_token_id"))
  bos_id = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))

  json_file = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(json_file):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      tok = tokenizers.Tokenizer.from_file(json_file)
    except Exception as e:
      raise ValueError(f"{json_file!r} is not a valid tokenizer.json: {e}") from e
    by_name = lambda name: None if name is None else tok.token_to_id(name)
    bos_from_cfg = by_name(_token_str(tok_cfg.get("bos_token")))
    bos_id = bos_from_cfg if bos_from_cfg is not None else bos_id
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    eos_ids = _end_ids(specials, [by_name(_token_str(tok_cfg.get("eos_token")))] + eos_candidates)
    return HFTokenizer(tok, bos_id, eos_ids, template,
                       bool(tok_cfg.get("add_bos_token", False)))
  sp_file = os.path.join(folder, "tokenizer.model")
  if os.path.isfile(sp_file):
    sp_tok = SentencePieceTokenizer(sp_file, chat_template=template)
    eos_ids = list(dict.fromkeys(eos_candidates + list(sp_tok.eos_ids)))
    return SentencePieceTokenizer(sp_file, bos_id if bos_id is not None else sp_tok.bos_id,
                                  eos_ids, template)
  return None


def train_sentencepiece(texts, model_file: str, vocab_size: int = 400,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a small lossless SentencePiece model (for tests and toy models).

  Identity normalization, no whitespace folding, byte fallback and split
  digits, so that decode(encode(s)) == s for any text. Ids: <unk>=0,
  <s>=1, </s>=2; vocab_size must exceed 256 byte pieces + 3.

  Args:
    texts: iterable of training sentences.
    model_file: where to write the ``.model`` file.
    vocab_size: number of pieces.
    model_type: "bpe" or "unigram".
  """
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
      model_type=model_type, normalization_rule_name="identity",
      remove_extra_whitespaces=False, byte_fallback=True, split_digits=True,
      character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(model_file)), exist_ok=True)
  with open(model_file, "wb") as f:
    f.write(buffer.getvalue())
  return SentencePieceTokenizer(model_file)
