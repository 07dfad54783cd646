"""A feature-conditioned draft (EAGLE-style): a decoder block that reads the
target's own hidden states.

The draft for the token at position t+1 is computed from the token x_t and
the target's feature f_{t-1}, the final-normed hidden state its head read at
position t-1 (``Transformer.apply_with_hidden``). Both are RMS-normalised
(a Llama's features are ~15x larger than its token embeddings, which would
otherwise drown the token), then a linear layer fuses them into one vector, the draft's own decoder block(s) (with
their own KV cache, same invariant as the target's) turn it into g_t, an
estimate of the target's f_t, and the head maps g_t to next-token logits.
Drafting several tokens feeds g_t back where the target's f_t is not known
yet. The target's features carry most of what the next token depends on, so
one block predicts far better than a small standalone draft (Li et al. 2024,
EAGLE).

Params (kernels are [in, out]; width D is the target's):
  embed/embedding [V, D]     the target's token embeddings (frozen in training)
  embed_norm/scale [D], feature_norm/scale [D]
  fc/kernel [2D, D], fc/bias [D]
  layers/...  [L, ...]       Llama blocks, laid out as in transformer.py
  final_norm/scale [D]
  lm_head/kernel [D, N], lm_head/token_ids [N] (restricted head, N = head_size)
  or lm_head/kernel [D, V] (full head, head_size 0)
"""

import dataclasses

import jax
import jax.numpy as jnp

from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import (Transformer, dense, expand_head_logits,
                                            head_product, rms_norm, run_blocks)


def check_compatible(cfg: ModelConfig, target_cfg: ModelConfig) -> None:
  """ValueError unless a feature draft of ``cfg`` can read ``target_cfg``'s features."""
  if cfg.vocab_size != target_cfg.vocab_size:
    raise ValueError(f"feature draft vocab size {cfg.vocab_size} differs from the "
                     f"target's {target_cfg.vocab_size}; they must share a tokenizer")
  if cfg.d_model != target_cfg.d_model:
    raise ValueError(f"feature draft width d_model={cfg.d_model} differs from the "
                     f"target's {target_cfg.d_model}; it reads the target's features")


@dataclasses.dataclass(frozen=True)
class FeatureDraft:
  """The draft bound to its config (``tie_embeddings`` must be False), its
  blocks' layer loop (``transformer.LAYER_LOOPS``; params and caches follow it
  as a Transformer's do) and its products (``matmul``, as a Transformer's:
  ``"kernel"`` runs the fusion layer, the block and the head on the CPU
  kernels, their weights stored [out, in])."""

  cfg: ModelConfig
  layer_loop: str = "scan"
  matmul: str = "xla"

  def __post_init__(self):
    if self.cfg.tie_embeddings:
      raise ValueError("a feature draft has its own head: tie_embeddings must be False")
    self.blocks   # checks layer_loop and matmul  pylint: disable=pointless-statement

  @property
  def blocks(self) -> Transformer:
    """A Transformer of the same config, loop and products: its init gives
    the block params, its init_cache the cache."""
    return Transformer(self.cfg, self.layer_loop, matmul=self.matmul)

  def prepare_params(self, params: dict) -> dict:
    """Stacked-layout params in this draft's layout (on the kernels, the
    fusion layer's kernel too is stored [out, in])."""
    return self.blocks.prepare_params(params, extra_dense=("fc",))

  def init_params(self, key: jax.Array, init_scale: float = 0.02) -> dict:
    """Random params (tests; training starts from ``distill.model``'s init)."""
    cfg = self.cfg
    k_base, k_fc = jax.random.split(key)
    params = self.blocks.init_params(k_base, init_scale=init_scale, logit_scale=1.0)
    d = cfg.d_model
    params["fc"] = {
        "kernel": jax.random.normal(k_fc, (2 * d, d), cfg.jnp_dtype) * (2 * d) ** -0.5,
        "bias": jnp.zeros((d,), cfg.jnp_dtype)}
    params["embed_norm"] = {"scale": jnp.ones((d,), cfg.jnp_dtype)}
    params["feature_norm"] = {"scale": jnp.ones((d,), cfg.jnp_dtype)}
    return params

  def expected_params_shapes(self) -> dict:
    return jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))

  def init_cache(self, batch_size: int, num_slots: int):
    return self.blocks.init_cache(batch_size, num_slots)

  def hidden(self, params: dict, tokens_BT: jax.Array, prev_features_BTD: jax.Array,
             positions_BT: jax.Array, cache, slots_BT=None, visible_BTS=None):
    """g_BTD, the draft's estimates of the target's features, and the cache.

    Args:
      tokens_BT: int32 token x_t at each position t.
      prev_features_BTD: the target's feature f_{t-1} (or the draft's own
        estimate of it while drafting); zeros at position 0.
      positions_BT: int32 absolute positions (cache slots).
      slots_BT, visible_BTS: a draft tree's pass (``run_blocks``): the cache
        slots its keys go to and its attention mask.
    """
    cfg = self.cfg
    norm = lambda name, x: rms_norm(x.astype(cfg.jnp_dtype), params[name]["scale"], cfg.rms_eps)
    embed_BTD = jnp.take(params["embed"]["embedding"], tokens_BT, axis=0)
    fused_BT2D = jnp.concatenate(
        [norm("embed_norm", embed_BTD), norm("feature_norm", prev_features_BTD)], axis=-1)
    x_BTD = dense(params["fc"], fused_BT2D)
    x_BTD, cache, _ = run_blocks(cfg, params["layers"], x_BTD, positions_BT, cache,
                                 slots_BT=slots_BT, visible_BTS=visible_BTS,
                                 kernels=self.matmul == "kernel")
    g_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], cfg.rms_eps)
    return g_BTD, cache

  def logits(self, params: dict, g_BTD: jax.Array, full_vocab: bool = True) -> jax.Array:
    """float32 logits_BTV from g (logits_BTN of a restricted head if not full_vocab)."""
    logits_BTN = head_product(params["lm_head"], g_BTD).astype(jnp.float32)
    if self.cfg.head_size and full_vocab:
      return expand_head_logits(logits_BTN, params["lm_head"]["token_ids"],
                                self.cfg.vocab_size)
    return logits_BTN
