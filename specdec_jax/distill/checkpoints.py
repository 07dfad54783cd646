"""Training checkpoints of a draft (orbax CheckpointManager) and their restore.

Layout: ``WORKDIR/checkpoints/<step>/`` with three items:
  params     the full draft params (restricted-head token ids included)
  opt_state  the optax state
  meta       JSON: the draft ModelConfig and kind (``model``: a Transformer;
             ``feature``: a FeatureDraft), the step, the data-order state
             (seed; the batch of step s is a pure function of (seed, s)),
             the data fingerprint and the last training metrics

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest one.
``restore_latest_draft`` is what ``--config.decode.drafter=model`` (or ``feature``)
``--config.draft_checkpoint=WORKDIR`` uses.
"""

import dataclasses
import logging
import os

import jax

from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft
from specdec_jax.models.transformer import Transformer

CHECKPOINT_DIR = "checkpoints"
MODEL, FEATURE = "model", "feature"
DRAFT_KINDS = (MODEL, FEATURE)


def draft_model(kind: str, cfg: ModelConfig):
  """The draft of a kind: a Transformer (``model``) or a FeatureDraft (``feature``)."""
  if kind == MODEL:
    return Transformer(cfg)
  if kind == FEATURE:
    return FeatureDraft(cfg)
  raise ValueError(f"draft kind {kind!r}; expected one of {DRAFT_KINDS}")


def meta_field(meta: dict, key: str):
  """A checkpoint meta field; checkpoints from before draft kinds are ``model``."""
  return meta.get(key, MODEL if key == "draft_kind" else None)


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, or ``workdir`` itself when it is that folder."""
  workdir = os.path.abspath(os.fspath(workdir))
  nested = os.path.join(workdir, CHECKPOINT_DIR)
  if os.path.isdir(nested) or os.path.basename(workdir) != CHECKPOINT_DIR:
    return nested
  return workdir


def _quiet_orbax() -> None:
  """Drops orbax's INFO lines (dozens per save) from the absl log."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())


class _OrbaxInfoFilter(logging.Filter):

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= logging.WARNING and not record.getMessage().startswith(
        "Given directory is read only")


def manager(workdir: str, keep: int = 3, read_only: bool = False):
  """An orbax CheckpointManager over WORKDIR/checkpoints."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _quiet_orbax()
  # A reader keeps nothing and saves never (orbax warns once per manager
  # about each setting a read-only manager overrides, and that it is one).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
  handlers = {"params": ocp.StandardCheckpointHandler(),
              "opt_state": ocp.StandardCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=handlers)


def save(mngr, step: int, params, opt_state, meta: dict) -> None:
  """Saves asynchronously; orbax copies the arrays before returning."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)))


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def _where(mngr, step) -> str:
  return f"draft checkpoint {os.path.join(str(mngr.directory), str(step))!r}"


def read_meta(mngr, step: int) -> tuple[dict, ModelConfig]:
  """(meta dict, draft ModelConfig) of a step; ValueError if unreadable."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return meta, ModelConfig(**meta["model_config"])
  except Exception as e:  # orbax / JSON / missing-field errors alike
    raise ValueError(f"{_where(mngr, step)} has unreadable metadata: "
                     f"{type(e).__name__}: {e}") from None


def restore(mngr, step: int, abstract_params, abstract_opt_state=None) -> tuple:
  """(params, opt_state or None) of ``step``, shaped like the abstract trees.

  Raises:
    ValueError: missing, damaged or differently shaped checkpoint data.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  items = {"params": ocp.args.StandardRestore(_abstract(abstract_params))}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(_abstract(abstract_opt_state))
  try:
    metadata = mngr.item_metadata(step)["params"]
    want = {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
    have = {jax.tree_util.keystr(p): (tuple(m.shape), str(m.dtype))
            for p, m in jax.tree_util.tree_leaves_with_path(metadata)}
  except Exception as e:
    raise ValueError(f"{_where(mngr, step)} could not be read: {type(e).__name__}: {e}") from None
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f"{_where(mngr, step)} does not match its ModelConfig: "
                     f"params {diff[:5]} differ")
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # tensorstore / orbax errors on damaged files
    raise ValueError(f"{_where(mngr, step)} could not be restored: "
                     f"{type(e).__name__}: {e}") from None
  return out["params"], out.get("opt_state") if abstract_opt_state is not None else None


def restore_latest_draft(workdir: str) -> tuple:
  """(draft model, params) of the latest checkpoint of a distill workdir.

  The model is a Transformer or a FeatureDraft (the checkpoint's kind). A
  restricted head's token ids come with the params (``lm_head/token_ids``)
  and the model uses them, so the drafter built from the result drafts over
  exactly the head it was trained with.

  Raises:
    ValueError: no checkpoint there, or a damaged one.
  """
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    raise ValueError(f"no draft checkpoints: {folder!r} does not exist (run job=distill "
                     "with this workdir first)")
  mngr = manager(workdir, read_only=True)
  try:
    step = mngr.latest_step()
    if step is None:
      raise ValueError(f"no complete draft checkpoint in {folder!r}")
    meta, cfg = read_meta(mngr, step)
    model = draft_model(meta_field(meta, "draft_kind"), cfg)
    params, _ = restore(mngr, step, model.expected_params_shapes())
    return model, params
  finally:
    mngr.close()


def config_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)
