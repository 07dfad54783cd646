"""The draft model: its config, its restricted head, its initial params.

Initialising from the target (``distill.init_from_target``) gives the draft
the target's token embeddings (projected onto their top principal directions
when the draft is narrower), and, when the draft's blocks have the target's
shapes, copies of chosen target layers and the final norm: a truncated target
that training then adapts. The head starts as the (projected) target head
rows of the head's tokens.
"""

import numpy as np

import jax
import jax.numpy as jnp

from specdec_jax.distill import checkpoints
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.feature_draft import FeatureDraft
from specdec_jax.models.transformer import Transformer, stack_params

# A random draft trained from scratch: GPT-2-style small weights.
SCRATCH_INIT_SCALE = 0.02
SCRATCH_LOGIT_SCALE = 1.0


def draft_config(config, target_cfg: ModelConfig) -> ModelConfig:
  """The draft's ModelConfig from ``config.draft`` and ``distill.head_size``.

  Raises:
    ValueError: the draft's vocabulary differs from the target's, or a
      feature draft's width differs from the target's.
  """
  c, d = config.draft, config.distill
  if d.draft_kind not in checkpoints.DRAFT_KINDS:
    raise ValueError(f"config.distill.draft_kind={d.draft_kind!r}; expected one of "
                     f"{checkpoints.DRAFT_KINDS}")
  if c.vocab_size != target_cfg.vocab_size:
    raise ValueError(
        f"config.draft.vocab_size={c.vocab_size} differs from the target's vocab size "
        f"{target_cfg.vocab_size}; the draft must share the target's tokenizer")
  feature = d.draft_kind == checkpoints.FEATURE
  if feature and c.d_model != target_cfg.d_model:
    raise ValueError(f"config.draft.d_model={c.d_model} must equal the target's "
                     f"{target_cfg.d_model} for draft_kind='feature' (it reads the "
                     "target's features)")
  head_size = int(d.head_size)
  if head_size >= target_cfg.vocab_size:
    head_size = 0          # a "restricted" head over everything is the full head
  return ModelConfig(
      vocab_size=c.vocab_size, num_layers=c.num_layers, d_model=c.d_model,
      num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
      ffn_dim=c.ffn_dim, rope_theta=float(c.rope_theta), rms_eps=target_cfg.rms_eps,
      tie_embeddings=bool(c.tie_embeddings) and head_size == 0 and not feature,
      qkv_bias=c.qkv_bias, dtype=c.dtype, head_size=head_size)


def select_head_ids(scores_V: np.ndarray, head_size: int, always=()) -> np.ndarray:
  """The ``head_size`` highest-scoring token ids (plus ``always``), ascending.

  Ties break towards the smaller id, so the choice is deterministic.
  """
  forced = [int(t) for t in dict.fromkeys(always)]
  if len(forced) > head_size:
    raise ValueError(f"head_size={head_size} is smaller than the {len(forced)} "
                     "tokens it must contain (EOS ids)")
  order = np.lexsort((np.arange(len(scores_V)), -scores_V))
  chosen = list(forced)
  taken = set(forced)
  for t in order:
    if len(chosen) == head_size:
      break
    if int(t) not in taken:
      chosen.append(int(t))
      taken.add(int(t))
  return np.sort(np.asarray(chosen, np.int32))


def vocab_to_head(head_ids_N: np.ndarray | None, vocab_size: int) -> np.ndarray:
  """int32 [V]: the head index of each token, -1 where the head lacks it."""
  if head_ids_N is None:
    return np.arange(vocab_size, dtype=np.int32)
  out = np.full((vocab_size,), -1, np.int32)
  out[head_ids_N] = np.arange(len(head_ids_N), dtype=np.int32)
  return out


def parse_layers(spec: str, num_layers: int, target_layers: int) -> list[int]:
  """Target layer indices to copy: "" means the first ``num_layers``."""
  if not spec:
    layers = list(range(num_layers))
  else:
    try:
      layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
      raise ValueError(f"config.distill.init_layers={spec!r} must be a comma list "
                       "of target layer indices") from None
  if len(layers) != num_layers or not all(0 <= i < target_layers for i in layers):
    raise ValueError(f"config.distill.init_layers={spec!r} must name {num_layers} "
                     f"layers in [0, {target_layers})")
  return layers


def _projection(embedding_VD: np.ndarray, width: int) -> np.ndarray:
  """[D_target, width]: the embeddings' top principal directions (orthonormal)."""
  e = np.asarray(embedding_VD, np.float64)
  _, _, vt = np.linalg.svd(e.T @ e)
  return vt[:width].T.astype(np.float32)


def _same_block_shapes(a: ModelConfig, b: ModelConfig) -> bool:
  names = ("d_model", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "qkv_bias", "dtype")
  return all(getattr(a, n) == getattr(b, n) for n in names)


def init_params(draft_cfg: ModelConfig, target_cfg: ModelConfig, target_params,
                head_ids_N: np.ndarray | None, d, key: jax.Array) -> dict:
  """Initial draft params (see the module docstring).

  Args:
    head_ids_N: the restricted head's token ids, or None for a full head.
    d: ``config.distill`` (init_from_target, init_layers).
  """
  target_params = stack_params(target_params, target_cfg)
  model = Transformer(draft_cfg)
  params = jax.jit(lambda k: model.init_params(
      k, init_scale=SCRATCH_INIT_SCALE, logit_scale=SCRATCH_LOGIT_SCALE))(key)
  params = jax.tree.map(np.asarray, params)
  if draft_cfg.head_size:
    params["lm_head"]["token_ids"] = np.asarray(head_ids_N, np.int32)
  if not d.init_from_target:
    return jax.tree.map(jnp.asarray, params)

  t_embed_VD = np.asarray(target_params["embed"]["embedding"], np.float32)
  same_width = draft_cfg.d_model == target_cfg.d_model
  proj = None if same_width else _projection(t_embed_VD, draft_cfg.d_model)
  project = (lambda x: x) if same_width else (lambda x: x @ proj)
  params["embed"]["embedding"] = project(t_embed_VD)
  if target_cfg.tie_embeddings:
    t_head_DV = t_embed_VD.T
  else:
    t_head_DV = np.asarray(target_params["lm_head"]["kernel"], np.float32)
  if not draft_cfg.tie_embeddings:
    cols = head_ids_N if draft_cfg.head_size else np.arange(draft_cfg.vocab_size)
    params["lm_head"]["kernel"] = project(t_head_DV[:, cols].T).T
  if _same_block_shapes(draft_cfg, target_cfg):
    layers = parse_layers(d.init_layers, draft_cfg.num_layers, target_cfg.num_layers)
    params["layers"] = jax.tree.map(lambda x: np.asarray(x)[np.asarray(layers)],
                                    target_params["layers"])
    params["final_norm"] = jax.tree.map(np.asarray, target_params["final_norm"])
  return jax.tree.map(jnp.asarray, params)


def init_feature_params(draft_cfg: ModelConfig, target_cfg: ModelConfig, target_params,
                        head_ids_N: np.ndarray | None, d, key: jax.Array) -> dict:
  """Initial params of a feature draft.

  The embedding, final-norm scale and head rows are the target's (the draft's
  g lives in the target's feature space, which the target's head reads). The
  fusion layer and blocks start random, or, with ``distill.init_layers``, the
  blocks are copies of those target layers (same block shapes needed).
  """
  target_params = stack_params(target_params, target_cfg)
  params = jax.tree.map(np.asarray, jax.jit(FeatureDraft(draft_cfg).init_params)(key))
  t_embed_VD = np.asarray(target_params["embed"]["embedding"], np.float32)
  params["embed"]["embedding"] = t_embed_VD.astype(params["embed"]["embedding"].dtype)
  if target_cfg.tie_embeddings:
    t_head_DV = t_embed_VD.T
  else:
    t_head_DV = np.asarray(target_params["lm_head"]["kernel"], np.float32)
  cols = head_ids_N if draft_cfg.head_size else np.arange(draft_cfg.vocab_size)
  params["lm_head"]["kernel"] = np.ascontiguousarray(t_head_DV[:, cols])
  if draft_cfg.head_size:
    params["lm_head"]["token_ids"] = np.asarray(head_ids_N, np.int32)
  params["final_norm"] = jax.tree.map(np.asarray, target_params["final_norm"])
  if d.init_layers:
    if not _same_block_shapes(draft_cfg, target_cfg):
      raise ValueError("config.distill.init_layers needs the draft's block shapes "
                       "(config.draft) to equal the target's")
    layers = parse_layers(d.init_layers, draft_cfg.num_layers, target_cfg.num_layers)
    params["layers"] = jax.tree.map(lambda x: np.asarray(x)[np.asarray(layers)],
                                    target_params["layers"])
  # the draft's own dtypes (the target's may differ): checkpoints are checked
  # against them on restore
  expected = FeatureDraft(draft_cfg).expected_params_shapes()
  return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)
