"""Session set-up for the whole suite.

* A persistent XLA compilation cache in a fresh temporary folder, for this
  process and the job subprocesses the tests start: a program compiled once
  (the same Generator setup in two modules, the same job in two CLI runs) is
  read back instead of compiled again. Compile counting still sees every
  compile request, cache hits included (``compile_count`` listens to the
  event that wraps both), so "no recompiles" checks lose nothing.
* The real SmolLM2 (converted from the GGUF once, through the orbax cache
  path users take) and transformers' reference model, once per session.
* Every test that uses the real SmolLM2 runs in one pytest-xdist worker
  (group "smollm2"), so the model and the reference load once per run.
* ``--durations`` is on (launch/test.sh), so the next slow test is visible
  in CI's output.
"""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

# pytest-xdist workers inherit the controller's environment: all processes of
# one run share the cache folder, and the controller (which made it) removes it.
if "SPECDEC_TEST_XLA_CACHE" not in os.environ:
  os.environ["SPECDEC_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="specdec_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["SPECDEC_TEST_XLA_CACHE"], ignore_errors=True)
_CACHE_DIR = os.environ["SPECDEC_TEST_XLA_CACHE"]
_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": _CACHE_DIR,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
os.environ.update(_CACHE_ENV)   # inherited by the CLI subprocesses
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from specdec_jax import compile_count  # noqa: E402  (after the cache settings)

compile_count.install()


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("smollm2_cache"))


@pytest.fixture(scope="session")
def smollm2(smollm2_cache_dir):
  """(Transformer, params, tokenizer) of the real SmolLM2-135M-Instruct, float32,
  converted from the GGUF into this session's orbax cache (load_smollm2), in
  the layout single-device runs use (``layer_loop="auto"``: unrolled)."""
  from specdec_jax.models import checkpoint
  from specdec_jax.models.transformer import Transformer
  cfg, params, tokenizer = checkpoint.load_smollm2(smollm2_cache_dir)
  target = Transformer(cfg, "unrolled")
  return target, target.prepare_params(params), tokenizer


@pytest.fixture(scope="session")
def hf_smollm2():
  """transformers' LlamaForCausalLM from the same GGUF (float32, eval mode)."""
  import hf_reference
  return hf_reference.hf_smollm2_model()


def pytest_collection_modifyitems(items):
  """xdist groups (``--dist loadgroup``): the tests that use the real model
  share one worker; every other test runs in the worker of its module, so a
  module's fixtures are built once."""
  for item in items:
    if {"smollm2", "hf_smollm2", "smollm2_cache_dir"} & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.xdist_group("smollm2"))
    else:
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))


_COMPILE_SECONDS = [0, 0.0]


def _on_duration(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_SECONDS[0] += 1
    _COMPILE_SECONDS[1] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def pytest_terminal_summary(terminalreporter):
  count, seconds = _COMPILE_SECONDS
  if count:
    terminalreporter.write_line(f"XLA compiles in this process: {count}, {seconds:.0f} s")
