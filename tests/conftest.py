"""Session set-up for the whole suite.

* A persistent XLA compilation cache in a fresh temporary folder, for this
  process and the job subprocesses the tests start: a program compiled once
  (the same Generator setup in two modules, the same job in two CLI runs) is
  read back instead of compiled again. Compile counting still sees every
  compile request, cache hits included (``compile_count`` listens to the
  event that wraps both), so "no recompiles" checks lose nothing.
* The real SmolLM2 (converted from the GGUF once, through the orbax cache
  path users take) and transformers' reference model, once per session.
* The tests that use the real SmolLM2 run in two pytest-xdist groups (with
  and without transformers' reference), so the models load at most once per
  worker and the two halves run side by side.
* XLA's optimisation passes are off (``jax_disable_most_optimizations``,
  here and in the subprocesses) except while a SmolLM2 test runs: the tiny
  models' programs are compiled once and run briefly, so compiling is most
  of their cost (off: about 40% less compile time), while the real model's
  programs run long enough to need the optimised code (off: its steps run
  1.3-2.6x slower). Exactness checks compare two decodes compiled the same
  way, so they check the same thing either way.
* Fixtures that build something expensive are session-scoped, not
  module-scoped: a pytest-xdist worker interleaves modules, and a module
  fixture is torn down (and later rebuilt) whenever the next test is in
  another module.
* XLA:CPU's older fusion code generator for the tiny models' compiles
  (``--xla_cpu_use_fusion_emitters=false``; the real model's keep the newer
  one): their compile time halves (641 s to 328 s over the suite, measured).
* The slowest xdist groups are handed out first, so neither worker idles
  at the end (``SLOWEST_GROUPS``).
* ``--durations`` is on (launch/test.sh), so the next slow test is visible
  in CI's output, with each worker's busy time.
"""

import atexit
import os
import shutil
import tempfile

import jax
from jax._src import compiler as _jax_compiler   # see _with_emitters_for_optimised_compiles
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
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# XLA:CPU's older fusion code generator: the tiny models' programs compile in
# about half the time (~200 small kernels each). XLA_FLAGS is read when this
# process's backend starts, and by every subprocess; the real model's
# optimised compiles here switch the newer emitters back on (below), which
# compile its programs 2.4x faster and run them as fast.
from common import TINY_XLA_FLAGS  # noqa: E402
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TINY_XLA_FLAGS}".strip()
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

jax.config.update("jax_disable_most_optimizations", True)


def _with_emitters_for_optimised_compiles(get_compile_options):
  """``get_compile_options`` that turns XLA:CPU's fusion emitters back on for
  a compile made with the optimisation passes on (the SmolLM2 tests). (JAX
  has no public per-compile switch for an XLA flag besides ``jax.jit``'s
  ``compiler_options``, which would need every jit in the package changed.)"""
  def wrapped(*args, env_options_overrides=None, **kwargs):
    if not jax.config.read("jax_disable_most_optimizations"):
      env_options_overrides = {"xla_cpu_use_fusion_emitters": True,
                               **(env_options_overrides or {})}
    return get_compile_options(*args, env_options_overrides=env_options_overrides, **kwargs)
  return wrapped


_jax_compiler.get_compile_options = _with_emitters_for_optimised_compiles(
    _jax_compiler.get_compile_options)

from specdec_jax import compile_count  # noqa: E402  (after the cache settings)

compile_count.install()
SMOLLM2_FIXTURES = {"smollm2", "smollm2_scan", "hf_smollm2", "smollm2_cache_dir"}


def _uses_smollm2(item) -> bool:
  return bool(SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())))


def _optimised(item) -> bool:
  """The real model's tests, and those marked ``optimized_xla`` (whose
  subject is the optimised program's numerics, such as bf16 rounding)."""
  return _uses_smollm2(item) or item.get_closest_marker("optimized_xla") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Optimised XLA where ``_optimised`` (before the test's fixtures run)."""
  jax.config.update("jax_disable_most_optimizations", not _optimised(item))


@pytest.fixture(scope="session")
def smollm2_cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("smollm2_cache"))


@pytest.fixture(scope="session")
def _smollm2_stacked(smollm2_cache_dir):
  """(ModelConfig, stacked params, tokenizer) of the real SmolLM2-135M-Instruct,
  float32, converted from the GGUF into this session's orbax cache."""
  from specdec_jax.models import checkpoint
  return checkpoint.load_smollm2(smollm2_cache_dir)


@pytest.fixture(scope="session")
def smollm2(_smollm2_stacked):
  """(Transformer, params, tokenizer) of SmolLM2 in the layout single-device
  runs use (``layer_loop="auto"``: unrolled, and ``matmul="auto"``: the CPU
  kernel where it builds), as users decode it."""
  from specdec_jax import runtime
  cfg, params, tokenizer = _smollm2_stacked
  target = runtime.default_decoder(cfg)
  return target, target.prepare_params(params), tokenizer


@pytest.fixture(scope="session")
def smollm2_scan(_smollm2_stacked):
  """The same model in the scanned layout (the same function; its programs
  compile about 4x faster, for the tests whose subject is not the layout)."""
  from specdec_jax.models.transformer import Transformer
  cfg, params, tokenizer = _smollm2_stacked
  return Transformer(cfg, "scan"), params, tokenizer


@pytest.fixture(scope="session")
def hf_smollm2():
  """transformers' LlamaForCausalLM from the same GGUF (float32, eval mode)."""
  import hf_reference
  return hf_reference.hf_smollm2_model()


def pytest_itemcollected(item):
  """xdist groups (``--dist loadgroup``): the tests that compare the real
  model with transformers' share one worker (its ~20 s load happens once),
  the other SmolLM2 tests another group (the model's conversion, ~10 s, is
  the only work both repeat); every other test runs in the worker of its
  module. (Added
  as each test is collected: xdist reads the groups in its own
  ``pytest_collection_modifyitems``, which runs before a conftest's.)"""
  if "hf_smollm2" in getattr(item, "fixturenames", ()):
    item.add_marker(pytest.mark.xdist_group("smollm2_and_transformers"))
  elif _uses_smollm2(item):
    item.add_marker(pytest.mark.xdist_group("smollm2"))
  else:
    item.add_marker(pytest.mark.xdist_group(item.module.__name__))


# The xdist groups that take longest (core-seconds measured on the 2-core
# machine: ~290, 130, 120, 110, 90, 90, 50, 45), handed out first: a long
# group started last would leave the other worker idle at the end.
SLOWEST_GROUPS = ("smollm2", "test_fidelity", "test_distill", "test_speculative",
                  "smollm2_and_transformers", "test_sharding", "test_jobs",
                  "test_hybrid_drafter", "test_tree")


def _group(item) -> str:
  marker = item.get_closest_marker("xdist_group")
  return marker.args[0] if marker else ""


def pytest_collection_modifyitems(items):
  """Slowest groups first (launch/test.sh passes ``--no-loadscope-reorder``,
  so xdist hands groups out in this order), the rest in collection order."""
  rank = {name: i for i, name in enumerate(SLOWEST_GROUPS)}
  items.sort(key=lambda item: rank.get(_group(item), len(rank)))


# XLA compiles (count, seconds) in this process, and at the last report.
_COMPILES = {"now": [0, 0.0], "reported": [0, 0.0]}


def _on_duration(event, duration, **kwargs):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES["now"][0] += 1
    _COMPILES["now"][1] += duration


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Each setup/call/teardown report carries the XLA compiles it caused
  (its user_properties travel from xdist workers to the controller)."""
  outcome = yield
  now, last = _COMPILES["now"], _COMPILES["reported"]
  report = outcome.get_result()
  report.user_properties.append(("xla_compiles", (now[0] - last[0], now[1] - last[1])))
  report.user_properties.append(
      ("worker_span", (os.environ.get("PYTEST_XDIST_WORKER", "main"), call.start, call.stop)))
  _COMPILES["reported"] = list(now)


def pytest_terminal_summary(terminalreporter):
  """XLA compiles of the whole run (all workers), and the tests that
  compiled longest (subprocesses not included)."""
  per_test, count, spans = {}, 0, {}
  for reports in terminalreporter.stats.values():
    for report in reports:
      for name, value in getattr(report, "user_properties", ()):
        if name == "xla_compiles":
          count += value[0]
          per_test[report.nodeid] = per_test.get(report.nodeid, 0.0) + value[1]
        elif name == "worker_span":
          spans.setdefault(value[0], []).append(value[1:])
  for worker, worker_spans in sorted(spans.items()):
    first, last = min(s for s, _ in worker_spans), max(e for _, e in worker_spans)
    terminalreporter.write_line(
        f"worker {worker}: {sum(e - s for s, e in worker_spans):.0f} s in tests, "
        f"{last - first:.0f} s from its first test's start to its last's end")
  if not count:
    return
  terminalreporter.write_line(
      f"XLA compiles in the test processes: {count}, {sum(per_test.values()):.0f} s")
  for nodeid, seconds in sorted(per_test.items(), key=lambda kv: -kv[1])[:10]:
    terminalreporter.write_line(f"  {seconds:6.1f} s compiling  {nodeid}")
