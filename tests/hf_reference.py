"""Reference objects from transformers, loaded once per test session.

Loading SmolLM2 through transformers' GGUF path takes ~20 s on 2 cores, so
every test shares these cached instances (conftest's ``hf_smollm2`` fixture
is the model; our own import of the file is conftest's ``smollm2``).
"""

import functools
import os

from specdec_jax.models import gguf_import


@functools.lru_cache(maxsize=None)
def smollm2_path() -> str:
  return gguf_import.smollm2_gguf_path()


@functools.lru_cache(maxsize=None)
def hf_smollm2_tokenizer():
  """transformers' tokenizer built from the GGUF metadata."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = smollm2_path()
  return AutoTokenizer.from_pretrained(os.path.dirname(path),
                                       gguf_file=os.path.basename(path))


@functools.lru_cache(maxsize=None)
def hf_smollm2_model():
  """transformers' LlamaForCausalLM from the GGUF, float32, eval mode.

  transformers' loader builds gguf's tensor-name map once per submodule
  (~400 times, 8 s of its ~35 s here) and parses the file's metadata once
  for the config and again for the weights: during the load both are
  memoised (the same pure function of (arch, layers); the same read-only
  reader of one file), which changes nothing it computes.
  """
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import gguf  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  path = smollm2_path()
  name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
  reader = functools.lru_cache(maxsize=None)(gguf.GGUFReader)
  with mock.patch.object(gguf, "get_tensor_name_map", name_map), \
       mock.patch.object(gguf, "GGUFReader", reader):
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()
