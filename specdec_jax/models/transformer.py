"""Llama-family decoder as a pure function over a params pytree.

Linen modules define one block; the stack of identical blocks is run with
``lax.scan`` over params stacked on a leading L axis, so compile time does not
grow with depth. The KV cache is explicit: it goes in and comes out.

Params layout (kernels are [in, out]):
  embed/embedding [V, D]
  layers/attn_norm/scale [L, D]
  layers/attn/{q,k,v}/kernel [L, D, N*H | G*H]   (+ bias when qkv_bias)
  layers/attn/o/kernel [L, N*H, D]
  layers/mlp_norm/scale [L, D]
  layers/mlp/{gate,up}/kernel [L, D, F], layers/mlp/down/kernel [L, F, D]
  final_norm/scale [D]
  lm_head/kernel [D, V]   (only when the head is not tied)

A restricted head (``cfg.head_size = N > 0``, used by distilled drafts) has
  lm_head/kernel [D, N], lm_head/token_ids [N] int32 (the vocabulary id of
  each output, not trained)
and ``apply`` spreads its N logits into full-vocabulary logits that are -inf
elsewhere, so every consumer still sees logits_BTV.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from specdec_jax.models import kv_cache as kv_cache_lib
from specdec_jax.models.config import ModelConfig

_MASKED = -1e30


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x_BTD):
    scale_D = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), self.dtype)
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale_D.astype(jnp.float32)).astype(self.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the half-split layout used by Hugging Face Llama."""
  head_dim = x_BTNH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x32 = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, k_LBSGH, v_LBSGH, layer):
    cfg = self.cfg
    dtype = cfg.jnp_dtype
    batch, seq = x_BTD.shape[:2]
    n, g, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = lambda feats, name, bias: nn.Dense(
        feats, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)
    q_BTNH = dense(n * h, "q", cfg.qkv_bias)(x_BTD).reshape(batch, seq, n, h)
    k_BTGH = dense(g * h, "k", cfg.qkv_bias)(x_BTD).reshape(batch, seq, g, h)
    v_BTGH = dense(g * h, "v", cfg.qkv_bias)(x_BTD).reshape(batch, seq, g, h)
    q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta)
    k_BTGH = rope(k_BTGH, positions_BT, cfg.rope_theta)

    # Write before attend: the block's own keys are visible to its queries.
    k_LBSGH = kv_cache_lib.write_layer(k_LBSGH, layer, k_BTGH, positions_BT)
    v_LBSGH = kv_cache_lib.write_layer(v_LBSGH, layer, v_BTGH, positions_BT)
    keys_BSGH = k_LBSGH[layer]
    values_BSGH = v_LBSGH[layer]
    num_slots = keys_BSGH.shape[1]

    q_BTGMH = q_BTNH.reshape(batch, seq, g, n // g, h)
    scores = jnp.einsum("btgmh,bsgh->bgmts", q_BTGMH, keys_BSGH,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    visible_BTS = jnp.arange(num_slots)[None, None, :] <= positions_BT[:, :, None]
    scores = jnp.where(visible_BTS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out_BTGMH = jnp.einsum("bgmts,bsgh->btgmh", probs, values_BSGH)
    out_BTD = dense(cfg.d_model, "o", False)(out_BTGMH.reshape(batch, seq, n * h))
    return out_BTD, k_LBSGH, v_LBSGH


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    dtype = self.cfg.jnp_dtype
    dense = lambda feats, name: nn.Dense(
        feats, use_bias=False, dtype=dtype, param_dtype=dtype, name=name)
    gate = dense(self.cfg.ffn_dim, "gate")(x_BTD)
    up = dense(self.cfg.ffn_dim, "up")(x_BTD)
    return dense(self.cfg.d_model, "down")(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, k_LBSGH, v_LBSGH, layer):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_eps, cfg.jnp_dtype, name=name)
    attn_out, k_LBSGH, v_LBSGH = Attention(cfg, name="attn")(
        norm("attn_norm")(x_BTD), positions_BT, k_LBSGH, v_LBSGH, layer)
    x_BTD = x_BTD + attn_out
    x_BTD = x_BTD + MLP(cfg, name="mlp")(norm("mlp_norm")(x_BTD))
    return x_BTD, k_LBSGH, v_LBSGH


@dataclasses.dataclass(frozen=True)
class Transformer:
  """A decoder bound to its config. Hashable; every method is pure."""

  cfg: ModelConfig

  def init_params(self, key: jax.Array, init_scale: float = 0.2,
                  logit_scale: float = 4.0) -> dict:
    """Random params from a key.

    Kernels and biases ~ normal(init_scale), norm scales 1; embeddings and the
    head are scaled so that logits have std ~logit_scale, which keeps a random
    model's next-token distributions neither flat nor one-hot.
    """
    cfg = self.cfg
    dtype = cfg.jnp_dtype
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    block = Block(cfg)
    dummy_x = jnp.zeros((1, 1, cfg.d_model), dtype)
    dummy_pos = jnp.zeros((1, 1), jnp.int32)
    dummy_cache = kv_cache_lib.init_cache(cfg, 1, 1)

    def init_layer(layer_key):
      variables = block.init(layer_key, dummy_x, dummy_pos, dummy_cache.k_LBSGH,
                             dummy_cache.v_LBSGH, 0)
      return variables["params"]

    layers = jax.vmap(init_layer)(jax.random.split(k_layers, cfg.num_layers))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(layers)
    new_leaves = []
    for i, (path, leaf) in enumerate(leaves):
      if "scale" in jax.tree_util.keystr(path):
        new_leaves.append(leaf)
      else:
        noise = jax.random.normal(jax.random.fold_in(k_layers, i), leaf.shape, dtype)
        new_leaves.append(noise * init_scale)
    layers = jax.tree_util.tree_unflatten(treedef, new_leaves)
    embed_std = logit_scale / cfg.d_model ** 0.5
    params = {
        "embed": {"embedding": jax.random.normal(
            k_embed, (cfg.vocab_size, cfg.d_model), dtype) * embed_std},
        "layers": layers,
        "final_norm": {"scale": jnp.ones((cfg.d_model,), dtype)},
    }
    if not cfg.tie_embeddings:
      params["lm_head"] = {"kernel": jax.random.normal(
          k_head, (cfg.d_model, cfg.head_size or cfg.vocab_size), dtype) * embed_std}
    if cfg.head_size:
      params["lm_head"]["token_ids"] = jnp.arange(cfg.head_size, dtype=jnp.int32)
    return params

  def init_cache(self, batch_size: int, num_slots: int) -> kv_cache_lib.KVCache:
    return kv_cache_lib.init_cache(self.cfg, batch_size, num_slots)

  def expected_params_shapes(self) -> dict:
    """Pytree of jax.ShapeDtypeStruct that params for this config must match."""
    return jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))

  def apply(self, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
            cache: kv_cache_lib.KVCache, full_vocab: bool = True):
    """Runs the decoder over a block of tokens at the given absolute positions.

    Args:
      params: the params pytree (layout in the module docstring).
      tokens_BT: int32 token ids.
      positions_BT: int32 absolute positions; slot j of the cache is position j.
      cache: KVCache with shapes [L, B, S, G, H].
      full_vocab: with a restricted head, False returns the head's own
        logits_BTN (for training) instead of logits_BTV.

    Returns:
      (logits_BTV float32, updated cache).
    """
    logits_BTV, _, cache = self.apply_with_hidden(params, tokens_BT, positions_BT, cache,
                                                  full_vocab)
    return logits_BTV, cache

  def apply_with_hidden(self, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
                        cache: kv_cache_lib.KVCache, full_vocab: bool = True):
    """``apply`` that also returns hidden_BTD: the final-normed states the head
    reads (the features a feature drafter conditions on).

    Returns:
      (logits_BTV float32, hidden_BTD, updated cache).
    """
    cfg = self.cfg
    embedding_VD = params["embed"]["embedding"]
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(cfg.jnp_dtype)
    x_BTD, cache = run_blocks(cfg, params["layers"], x_BTD, positions_BT, cache)
    hidden_BTD = RMSNorm(cfg.rms_eps, cfg.jnp_dtype).apply(
        {"params": params["final_norm"]}, x_BTD)
    return self.head_logits(params, hidden_BTD, full_vocab), hidden_BTD, cache

  def head_logits(self, params: dict, hidden_BTD: jax.Array,
                  full_vocab: bool = True) -> jax.Array:
    """float32 logits_BTV (logits_BTN for a restricted head and not full_vocab)."""
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, params["embed"]["embedding"],
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, params["lm_head"]["kernel"],
                              preferred_element_type=jnp.float32)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.head_size and full_vocab:
      logits_BTV = expand_head_logits(logits_BTV, params["lm_head"]["token_ids"],
                                      cfg.vocab_size)
    return logits_BTV


def run_blocks(cfg: ModelConfig, layers_params: dict, x_BTD: jax.Array,
               positions_BT: jax.Array, cache: kv_cache_lib.KVCache):
  """The stack of decoder blocks under ``lax.scan`` (params stacked on L).

  Returns (x_BTD after the last block, updated cache).
  """
  block = Block(cfg)

  def layer_step(carry, layer_inputs):
    x, k_all, v_all = carry
    layer_params, layer = layer_inputs
    x, k_all, v_all = block.apply({"params": layer_params}, x, positions_BT,
                                  k_all, v_all, layer)
    return (x, k_all, v_all), None

  (x_BTD, k_LBSGH, v_LBSGH), _ = jax.lax.scan(
      layer_step, (x_BTD, cache.k_LBSGH, cache.v_LBSGH),
      (layers_params, jnp.arange(cfg.num_layers)))
  return x_BTD, kv_cache_lib.KVCache(k_LBSGH, v_LBSGH)


def expand_head_logits(logits_BTN: jax.Array, token_ids_N: jax.Array,
                       vocab_size: int) -> jax.Array:
  """Full-vocabulary logits_BTV from a restricted head's: -inf off the head.

  Probability 0 outside the head keeps rejection sampling exact: such tokens
  are never drafted, and the residual max(0, p - q) keeps their target mass.
  """
  full_BTV = jnp.full(logits_BTN.shape[:-1] + (vocab_size,), -jnp.inf, logits_BTN.dtype)
  return full_BTV.at[..., token_ids_N].set(logits_BTN)
