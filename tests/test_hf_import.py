"""HF safetensors import: tiny random transformers models, and bad folders."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from specdec_jax.models import hf_import
from specdec_jax.models import tokenizers as tokenizers_lib
from specdec_jax.models.transformer import Transformer

T = 11
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             initializer_range=0.3)  # large init so logits are O(1), not O(0.01)

# name -> (config class, model class, extra config, save kwargs)
CASES = {
    "llama_sharded_untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                             dict(tie_word_embeddings=False, rope_theta=5e4),
                             dict(max_shard_size="20KB")),
    "llama_head_dim_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                            dict(tie_word_embeddings=True, head_dim=16), {}),
    "qwen2_bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=True), {}),
    "mistral_sharded": (transformers.MistralConfig, transformers.MistralForCausalLM,
                        dict(tie_word_embeddings=False, sliding_window=None),
                        dict(max_shard_size="30KB")),
}


def _make(folder, case, dtype=torch.float32):
  config_cls, model_cls, extra, save_kwargs = CASES[case]
  kwargs = dict(SMALL, **extra)
  theta = kwargs.pop("rope_theta", None)
  config = config_cls(**kwargs)
  if theta is not None:  # transformers 5 keeps rope_theta under rope_parameters
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:  # non-trivial biases and scales
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
  model = model.to(dtype)
  model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
  return model


def _logits(model, cfg, params, ids_BT):
  with torch.no_grad():
    ref = model.float()(torch.tensor(ids_BT)).logits.numpy()
  ours = Transformer(cfg)
  batch, seq = ids_BT.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  out, _ = ours.apply(params, jnp.asarray(ids_BT, jnp.int32), positions,
                      ours.init_cache(batch, seq + 3))
  return np.asarray(out), ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  model = _make(str(tmp_path), case)
  cfg, params, tok = hf_import.load_hf_dir(str(tmp_path))
  assert tok is None
  hf = model.config
  assert cfg.qkv_bias == case.startswith("qwen2")
  assert cfg.tie_embeddings == hf.tie_word_embeddings
  assert cfg.head_dim == (hf.head_dim if getattr(hf, "head_dim", None) else 8)
  if case == "llama_sharded_untied":
    assert cfg.rope_theta == 5e4
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  ids = np.random.RandomState(1).randint(0, SMALL["vocab_size"], (2, T))
  out, ref = _logits(model, cfg, params, ids)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_bfloat16_safetensors(tmp_path):
  _make(str(tmp_path), "llama_sharded_untied", dtype=torch.bfloat16)
  # Reload in float32: casting the bf16 model back would keep its bf16 RoPE
  # inv_freq buffer, a worse reference than ours.
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  cfg, params, _ = hf_import.load_hf_dir(str(tmp_path))
  np.testing.assert_array_equal(
      np.asarray(params["embed"]["embedding"]),
      model.model.embed_tokens.weight.detach().numpy())
  ids = np.random.RandomState(2).randint(0, SMALL["vocab_size"], (1, T))
  out, ref = _logits(model.eval(), cfg, params, ids)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_tokenizer_json_and_config(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
  _make(str(tmp_path), "qwen2_bias")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|im_start|>assistant\n' }}{% endif %}")
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|im_end|>", "bos_token": None, "chat_template": template}, f)
  _, _, ours = hf_import.load_hf_dir(str(tmp_path))
  assert isinstance(ours, tokenizers_lib.HFTokenizer)
  assert ours.eos_ids[0] == 2 and 0 in ours.eos_ids
  text = "<|im_start|>user\nhello  the cat ✓<|im_end|>"
  assert ours.encode(text) == tok.encode(text).ids
  assert ours.decode(ours.encode(text)) == text
  msgs = [{"role": "user", "content": "hi"}]
  assert ours.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- bad input


@pytest.fixture
def good_dir(tmp_path):
  folder = tmp_path / "model"
  _make(str(folder), "qwen2_bias")
  return folder


def _edit_config(folder, **changes):
  path = folder / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_missing_dir(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    hf_import.load_hf_dir(str(tmp_path / "nope"))


def test_missing_config(good_dir):
  os.remove(good_dir / "config.json")
  with pytest.raises(ValueError, match=r"config\.json.*missing"):
    hf_import.load_hf_dir(str(good_dir))


def test_missing_weights(good_dir):
  os.remove(good_dir / "model.safetensors")
  with pytest.raises(ValueError, match=r"no \*\.safetensors"):
    hf_import.load_hf_dir(str(good_dir))


def test_pickle_only_is_refused(good_dir):
  os.remove(good_dir / "model.safetensors")
  # Not a valid pickle: if the importer ever tried to load it, the error would differ.
  (good_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin.*Convert them to safetensors"):
    hf_import.load_hf_dir(str(good_dir))


@pytest.mark.parametrize("keep", [4, 100, -50])
def test_truncated_safetensors(good_dir, keep):
  path = good_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:keep])
  with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
    hf_import.load_hf_dir(str(good_dir))


def test_missing_shard(tmp_path):
  _make(str(tmp_path), "llama_sharded_untied")
  shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(ValueError, match=f"{shard}.*missing"):
    hf_import.load_hf_dir(str(tmp_path))


def test_wrong_architecture(good_dir):
  _edit_config(good_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel.*not supported"):
    hf_import.load_hf_dir(str(good_dir))


def test_config_shape_mismatch(good_dir):
  _edit_config(good_dir, intermediate_size=64)
  with pytest.raises(ValueError, match=r"model\.safetensors.*mlp\.gate_proj\.weight.*shape "
                                       r"\(48, 32\).*config\.json implies \(64, 32\)"):
    hf_import.load_hf_dir(str(good_dir))


def test_fewer_layers_in_config_is_refused(good_dir):
  _edit_config(good_dir, num_hidden_layers=1)
  with pytest.raises(ValueError, match=r"not used.*layers\.1"):
    hf_import.load_hf_dir(str(good_dir))


def test_rope_scaling_refused(good_dir):
  _edit_config(good_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
    hf_import.load_hf_dir(str(good_dir))
