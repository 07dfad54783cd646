"""Tokenizers that need no downloads: SentencePiece trained here, bytes, ChatML."""

import random
import shutil

import pytest

from specdec_jax.models import tokenizers as tokenizers_lib

WORDS = ("the a cat dog sat on mat and ran quickly over lazy fox jumps hello world "
         "code def return if else for in range print value 42 7 x y z").split()

STRINGS = [
    "the cat sat on the mat",
    "  two  spaces\n\nand newlines\t tab",
    "naïve café — 日本語 😀👍🏽",
    "def f(x):\n    return x + 42\n",
    "1234567890",
    " leading space",
    "trailing space ",
    "unseen words: zyxwvut qqq",
    "",
]


def sample_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15)))
          for _ in range(num_lines)]


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tiny.model"
  return tokenizers_lib.train_sentencepiece(sample_corpus(), str(path), vocab_size=400)


@pytest.mark.parametrize("text", STRINGS)
def test_sentencepiece_round_trip(sp_tokenizer, text):
  ids = sp_tokenizer.encode(text)
  assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
  assert sp_tokenizer.decode(ids) == text


def test_sentencepiece_learned_pieces(sp_tokenizer):
  # Frequent training words become single pieces (the model really trained).
  assert len(sp_tokenizer.encode("the cat")) == 2
  assert len(sp_tokenizer.encode("zyxwvut")) >= 7


def test_sentencepiece_specials(sp_tokenizer):
  assert sp_tokenizer.vocab_size == 400
  assert sp_tokenizer.bos_id == 1 and sp_tokenizer.eos_ids == (2,)
  ids = sp_tokenizer.encode("hello world", add_bos=True)
  assert ids[0] == 1 and ids[1:] == sp_tokenizer.encode("hello world")
  text = "<s>hello</s> world</s>"
  ids = sp_tokenizer.encode(text)
  assert ids[0] == 1 and ids.count(2) == 2
  assert sp_tokenizer.decode(ids) == text
  assert sp_tokenizer.decode(ids, skip_special=True) == "hello world"


def test_sentencepiece_from_hf_dir(tmp_path, sp_tokenizer):
  shutil.copy(sp_tokenizer.model_file, tmp_path / "tokenizer.model")
  (tmp_path / "config.json").write_text('{"eos_token_id": [2, 5]}')
  tok = tokenizers_lib.load_tokenizer_from_hf_dir(str(tmp_path))
  assert isinstance(tok, tokenizers_lib.SentencePieceTokenizer)
  assert tok.eos_ids == (2, 5) and tok.bos_id == 1
  assert tok.encode("the cat") == sp_tokenizer.encode("the cat")


def test_sentencepiece_missing_file(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    tokenizers_lib.SentencePieceTokenizer(str(tmp_path / "nope.model"))


def test_no_tokenizer_in_dir(tmp_path):
  assert tokenizers_lib.load_tokenizer_from_hf_dir(str(tmp_path)) is None


@pytest.mark.parametrize("text", STRINGS + ["<bos>x<eos>y<pad>"])
def test_byte_tokenizer_round_trip(text):
  tok = tokenizers_lib.ByteTokenizer()
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode(text, add_bos=True)[0] == tok.bos_id


def test_hf_tokenizer_save_load(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.train_from_iterator(sample_corpus(200), trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = tokenizers_lib.HFTokenizer(backend, None, [2, 0], "{{ '<|im_start|>' }}")
  tok.save(str(tmp_path))
  again = tokenizers_lib.HFTokenizer.load(str(tmp_path))
  for text in STRINGS + ["<|im_start|>user\nhi<|im_end|>"]:
    assert again.encode(text) == tok.encode(text)
    assert again.decode(again.encode(text)) == text
  assert again.eos_ids == (2, 0) and again.bos_id is None
  with pytest.raises(ValueError, match="no BOS"):
    again.encode("x", add_bos=True)


SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chatml_default_system():
  assert tokenizers_lib.chatml_default_system(SMOL_TEMPLATE) == (
      "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
  plain = "{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'}}"
  assert tokenizers_lib.chatml_default_system(plain) is None
  qwen_like = ("{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + "
               "messages[0]['content'] + '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>"
               "system\\nYou\\'re Qwen.<|im_end|>\\n' }}{% endif %}")
  assert tokenizers_lib.chatml_default_system(qwen_like) == "You're Qwen."


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "assistant", "content": "first"}],
])
@pytest.mark.parametrize("gen", [True, False])
def test_chatml_matches_jinja_rendering(messages, gen):
  python = tokenizers_lib.render_chatml(
      messages, gen, tokenizers_lib.chatml_default_system(SMOL_TEMPLATE))
  jinja = tokenizers_lib._render_jinja(SMOL_TEMPLATE, messages, gen)
  assert python == jinja
