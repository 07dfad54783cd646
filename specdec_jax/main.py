"""Command-line entry point.

  python -m specdec_jax.main --config=configs/tiny.py --workdir=/tmp/run \
      [--config.job=generate|benchmark|fidelity|sweep|trace|diagnose|distill] \
      [--config.decode.k=4 --config.decode.drafter=ngram ...]

Bad flags or config values exit non-zero with one line naming the problem.
Library INFO logs (orbax, absl) are hidden unless ``--verbosity`` (or ``-v``)
is given: the job's own output is what a run prints.
"""

import importlib
import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")


def run_job(config, workdir: str, log=print):
  """Runs ``config.job`` and returns its summary dict.

  With ``config.distributed`` every host runs this; only process 0 logs.
  """
  from specdec_jax import multihost
  multihost.initialize(config)  # before anything touches a device
  from specdec_jax import runtime
  runtime.check_job(config.job)   # the rest is checked where the job builds from the config
  if not multihost.is_writer():
    log = lambda *args, **kwargs: None
  module = importlib.import_module(f"specdec_jax.jobs.{config.job}")
  return module.run(config, workdir, log=log)


def quiet_libraries() -> None:
  """WARNING and above from libraries, unless the user asked for --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger().setLevel(pylogging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_libraries()
  from specdec_jax import compile_count
  compile_count.install()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/tiny.py)")
  from specdec_jax import multihost
  multihost.initialize(config)  # multi-host: first, before anything touches a device
  try:
    run_job(config, _WORKDIR.value or "")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing with one-line errors (config_flags raises deep inside).
  Flat names of grouped fields (``--config.k``) still parse, with a note."""
  from specdec_jax import config_defaults
  argv = config_defaults.upgrade_flags(argv, lambda line: print(line, file=sys.stderr))
  sys.argv = argv   # config_flags reads the overrides from sys.argv itself
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    if isinstance(e, (AttributeError, KeyError)):
      message = f"unknown config field or flag: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def entry():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  entry()
