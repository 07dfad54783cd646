"""Llama-family decoder as pure functions over a params pytree.

One block, two params layouts (``Transformer.layer_loop``):

``"scan"`` (stacked; storage, training and sharded runs). Every layer's
params are stacked on a leading L axis and the blocks run under ``lax.scan``,
so compile time does not grow with depth (kernels are [in, out]):
  embed/embedding [V, D]
  layers/attn_norm/scale [L, D]
  layers/attn/{q,k,v}/kernel [L, D, N*H | G*H]   (+ bias [L, N*H | G*H] when qkv_bias)
  layers/attn/o/kernel [L, N*H, D]
  layers/mlp_norm/scale [L, D]
  layers/mlp/{gate,up}/kernel [L, D, F], layers/mlp/down/kernel [L, F, D]
  final_norm/scale [D]
  lm_head/kernel [D, V]   (only when the head is not tied)

``"unrolled"`` (decoding on one device). ``layers`` is a tuple of L
per-layer dicts, q/k/v fused into attn/qkv/kernel [D, (N+2G)*H] (+ bias) and
gate/up into mlp/gate_up/kernel [D, 2F]; the blocks run in a Python loop.
A scan over stacked weights reads each layer's weights through a dynamic
slice, and XLA:CPU copies that slice out of the stack before the dot: a
decode step then moved every weight twice (measured: 53 vs 36 ms for a
SmolLM2-shaped forward at T=1). Fused projections halve the number of dots
(27-33 vs 38-39 ms). ``Transformer.prepare_params`` converts stacked params
into the layout of its Transformer, ``stack_params`` back.

A restricted head (``cfg.head_size = N > 0``, used by distilled drafts) has
  lm_head/kernel [D, N], lm_head/token_ids [N] int32 (the vocabulary id of
  each output, not trained)
and ``apply`` spreads its N logits into full-vocabulary logits that are -inf
elsewhere, so every consumer still sees logits_BTV.

The KV cache follows the layout (``models/kv_cache.py``) and the invariant of
docs/design.md: slot j holds position j; a block attends as if it had been
written first. ``apply`` writes each layer's entries before attending;
``Transformer.forward`` only reads the cache and returns the block's entries
for a later ``kv_cache.write_block`` (``run_blocks`` says when each avoids a
copy of the cache).
"""

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from specdec_jax.kernels import cpu_attention
from specdec_jax.kernels import cpu_matmul
from specdec_jax.models import kv_cache as kv_cache_lib
from specdec_jax.models.config import ModelConfig

_MASKED = -1e30
LAYER_LOOPS = ("scan", "unrolled")
# How the weight products are computed: XLA's dot, or the CPU kernel for the
# few rows of a decode step (kernels/cpu_matmul.py; weights stored [out, in]).
MATMULS = ("xla", "kernel")
# Smallest attention window (``attention_windows``): a step's attention reads
# 256, 512, ... slots as the text grows, not the whole cache.
DEFAULT_MIN_WINDOW = 256


# ----------------------------------------------------------------------------
# The block, as functions of one layer's params.

def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """RMS normalisation in float32, returned in the input's dtype."""
  x32 = x_BTD.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


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


def head_product(head: dict, hidden_BTD: jax.Array) -> jax.Array:
  """An untied head's logits, accumulated in float32: ``kernel`` [D, V] by
  XLA, ``kernel_t`` [V, D] (``dense_to_rows``) through ``cpu_matmul.dense_t``."""
  if "kernel_t" in head:
    return cpu_matmul.dense_t(hidden_BTD, head["kernel_t"], preferred_element_type=jnp.float32)
  return jnp.einsum("btd,dv->btv", hidden_BTD, head["kernel"],
                    preferred_element_type=jnp.float32)


def dense(p: dict, x: jax.Array) -> jax.Array:
  """x @ kernel (+ bias); a ``kernel_t`` [out, in] (``matmul="kernel"``)
  goes through ``cpu_matmul.dense_t``."""
  if "kernel_t" in p:
    y = cpu_matmul.dense_t(x, p["kernel_t"])
  else:
    y = x @ p["kernel"].astype(x.dtype)
  return y + p["bias"].astype(x.dtype) if "bias" in p else y


def attention_inputs(cfg: ModelConfig, p: dict, x_BTD: jax.Array, positions_BT: jax.Array):
  """(q_BTNH, k_BTGH, v_BTGH) of one layer, rotated; fused or separate q/k/v."""
  batch, seq = x_BTD.shape[:2]
  n, g, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x_BTD = rms_norm(x_BTD, p["attn_norm"]["scale"], cfg.rms_eps)
  attn = p["attn"]
  if "qkv" in attn:
    qkv = dense(attn["qkv"], x_BTD)
    q, k, v = qkv[..., :n * h], qkv[..., n * h:(n + g) * h], qkv[..., (n + g) * h:]
  else:
    q, k, v = (dense(attn[name], x_BTD) for name in ("q", "k", "v"))
  q_BTNH = rope(q.reshape(batch, seq, n, h), positions_BT, cfg.rope_theta)
  k_BTGH = rope(k.reshape(batch, seq, g, h), positions_BT, cfg.rope_theta)
  return q_BTNH, k_BTGH, v.reshape(batch, seq, g, h)


def attention_windows(num_slots: int, smallest: int) -> tuple[int, ...]:
  """The static key windows attention chooses from for a cache of ``num_slots``:
  smallest, 2 * smallest, ... while a window is at most half the cache, then
  the whole cache. ``smallest <= 0`` (or a cache too small to halve) gives
  the one window ``(num_slots,)``: no switch."""
  windows = []
  width = smallest
  while 0 < width and 2 * width <= num_slots:
    windows.append(width)
    width *= 2
  return tuple(windows) + (num_slots,)


def window_index(windows: tuple[int, ...], reach_BT: jax.Array) -> jax.Array:
  """Index of the smallest window holding every query's visible slots, from
  ``reach_BT``, the largest slot each query may see (its position; under a
  tree's mask, also the slots its block's entries stand for), over all rows."""
  needed = jnp.max(reach_BT) + 1
  index = jnp.sum(jnp.asarray(windows[:-1], jnp.int32) < needed)
  return index.astype(jnp.int32)


@flax.struct.dataclass
class PendingBlock:
  """A block's keys and values not yet written to the cache, and where they
  go: ``taken_BS`` the slots the block writes, ``entry_BS`` which of its T
  entries each slot gets (entries for slots outside [0, S) go nowhere).
  ``k_BTGH`` / ``v_BTGH`` are one layer's."""

  k_BTGH: jax.Array
  v_BTGH: jax.Array
  taken_BS: jax.Array
  entry_BS: jax.Array


def pending_slots(slots_BT: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
  """(taken_BS, entry_BS) of ``PendingBlock`` for a block bound for
  ``slots_BT``: what a write of it would do to each slot."""
  batch, seq = slots_BT.shape
  rows_B1 = jnp.arange(batch)[:, None]
  safe_BT = jnp.where((slots_BT >= 0) & (slots_BT < num_slots), slots_BT, num_slots)
  # Entry t + 1 (0: none) per slot (a slot named twice would get the later).
  entry_BS = jnp.zeros((batch, num_slots), jnp.int32).at[rows_B1, safe_BT].max(
      jnp.broadcast_to(jnp.arange(1, seq + 1, dtype=jnp.int32), (batch, seq)), mode="drop")
  return entry_BS > 0, jnp.maximum(entry_BS - 1, 0)


def _with_pending(keys_BSGH, values_BSGH, pending: PendingBlock):
  """The cache's keys and values as a write of ``pending`` would leave them
  (over the slots given: a window's prefix of the cache): elementwise
  selects, which XLA can merge into the layout copy it makes of the keys
  and values for the attention dots anyway."""
  width = keys_BSGH.shape[1]
  seq = pending.k_BTGH.shape[1]
  # One select per entry (T is a verify width, small): a gather by entry_BS
  # instead made a SmolLM2 width-1 verify cost 1.11 plain steps, these 1.00.
  # gets_BS11[t]: the slots that entry t goes to.
  gets_BS11 = [(pending.taken_BS[:, :width] & (pending.entry_BS[:, :width] == t))[
      :, :, None, None] for t in range(seq)]

  def overlay(cached_BSGH, new_BTGH):
    for t in range(seq):
      cached_BSGH = jnp.where(gets_BS11[t], new_BTGH[:, t:t + 1], cached_BSGH)
    return cached_BSGH

  return overlay(keys_BSGH, pending.k_BTGH), overlay(values_BSGH, pending.v_BTGH)


def attend(cfg: ModelConfig, q_BTNH, keys_BSGH, values_BSGH, positions_BT,
           window: int | None = None, visible_BTS: jax.Array | None = None,
           pending: PendingBlock | None = None) -> jax.Array:
  """Causal attention over the cache (a query at position t sees slots <= t),
  reading only its first ``window`` slots (default: all). Every visible slot
  must lie inside, which the caller's window choice ensures (``run_blocks``:
  from the block's positions and, under a tree's mask, its slots; a mask
  that shows other slots past those needs the whole cache). ``visible_BTS`` (a draft tree's mask,
  docs/design.md) replaces the causal mask. ``pending``: a block not yet
  written, read as if it were (the same values in the same slots, so the
  same bits as attending the written cache). Returns [B, T, N*H]."""
  batch, seq, n, h = q_BTNH.shape
  g = cfg.num_kv_heads
  if window is not None:
    keys_BSGH, values_BSGH = keys_BSGH[:, :window], values_BSGH[:, :window]
  if pending is not None:
    keys_BSGH, values_BSGH = _with_pending(keys_BSGH, values_BSGH, pending)
  q_BTGMH = q_BTNH.reshape(batch, seq, g, n // g, h)
  scores = jnp.einsum("btgmh,bsgh->bgmts", q_BTGMH, keys_BSGH,
                      preferred_element_type=jnp.float32) * (h ** -0.5)
  if visible_BTS is None:
    visible_BTS = jnp.arange(keys_BSGH.shape[1])[None, None, :] <= positions_BT[:, :, None]
  else:
    visible_BTS = visible_BTS[:, :, :keys_BSGH.shape[1]]
  scores = jnp.where(visible_BTS[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BTNH.dtype)
  out_BTGMH = jnp.einsum("bgmts,bsgh->btgmh", probs, values_BSGH)
  return out_BTGMH.reshape(batch, seq, n * h)


def windowed_attend(cfg: ModelConfig, windows, index, q_BTNH, keys_BSGH, values_BSGH,
                    positions_BT, visible_BTS: jax.Array | None = None,
                    pending: PendingBlock | None = None) -> jax.Array:
  """``attend`` over the window ``windows[index]`` (one ``lax.switch`` over
  the static windows; a single window needs none). A step's attention then
  reads the slots the text has reached, not the whole buffer."""
  if len(windows) == 1:
    return attend(cfg, q_BTNH, keys_BSGH, values_BSGH, positions_BT,
                  visible_BTS=visible_BTS, pending=pending)

  def branch(window, q_BTNH, keys_BSGH, values_BSGH, positions_BT, visible_BTS, pending):
    return attend(cfg, q_BTNH, keys_BSGH, values_BSGH, positions_BT, window, visible_BTS,
                  pending)

  branches = [functools.partial(branch, w) for w in windows]
  return jax.lax.switch(index, branches, q_BTNH, keys_BSGH, values_BSGH, positions_BT,
                        visible_BTS, pending)


def block_output(cfg: ModelConfig, p: dict, x_BTD, q_BTNH, keys_BSGH, values_BSGH,
                 positions_BT, windows=None, which_window=None,
                 visible_BTS=None, pending: PendingBlock | None = None,
                 kernel_inputs=None) -> jax.Array:
  """The rest of the block once its keys are in the cache (or ``pending``):
  attention (over ``windows[which_window]`` when given; under
  ``visible_BTS`` when given; on the CPU kernel when ``kernel_inputs`` is
  given and ``cpu_attention.applies``), output projection, MLP (fused or
  separate gate/up), both residuals.

  kernel_inputs: ``cpu_attention.KernelInputs`` (``kernel_inputs``), what
  each query sees, for ``cpu_attention.decode_attention``; it stands for
  ``positions_BT`` and ``visible_BTS`` there.
  """
  if kernel_inputs is not None and cpu_attention.applies(q_BTNH, keys_BSGH):
    # Without a pending block no slot takes an entry; the stand-in must not
    # read the cache (a slice of a just-written cache made XLA keep, and so
    # copy, the unwritten one: 60 cache copies per SmolLM2 step).
    none_B1GH = jnp.zeros(keys_BSGH.shape[:1] + (1,) + keys_BSGH.shape[2:], keys_BSGH.dtype)
    new_k_BTGH = pending.k_BTGH if pending is not None else none_B1GH
    new_v_BTGH = pending.v_BTGH if pending is not None else none_B1GH
    attended = cpu_attention.decode_attention(q_BTNH, keys_BSGH, values_BSGH, new_k_BTGH,
                                              new_v_BTGH, *kernel_inputs)
  else:
    attended = windowed_attend(cfg, windows or (keys_BSGH.shape[1],), which_window, q_BTNH,
                               keys_BSGH, values_BSGH, positions_BT, visible_BTS, pending)
  x_BTD = x_BTD + dense(p["attn"]["o"], attended)
  h_BTD = rms_norm(x_BTD, p["mlp_norm"]["scale"], cfg.rms_eps)
  mlp = p["mlp"]
  if "gate_up" in mlp:
    gate_up = dense(mlp["gate_up"], h_BTD)
    gate, up = gate_up[..., :cfg.ffn_dim], gate_up[..., cfg.ffn_dim:]
  else:
    gate, up = dense(mlp["gate"], h_BTD), dense(mlp["up"], h_BTD)
  return x_BTD + dense(mlp["down"], jax.nn.silu(gate) * up)


def kernel_inputs(positions_BT: jax.Array, slots_BT: jax.Array, num_slots: int,
                  taken_BS: jax.Array | None, entry_BS: jax.Array | None,
                  visible_BTS: jax.Array | None = None):
  """``kernel_inputs`` of ``block_output`` (``cpu_attention.KernelInputs``),
  or None where the kernel cannot take the pass. ``taken_BS, entry_BS``: a
  read-only pass's ``pending_slots`` (where its entries will be written),
  None for a pass that wrote first (the cache holds the block). Causal, or
  under a draft tree's mask for a read-only pass (its entries are read from
  the block; a writing pass under a mask stays on XLA)."""
  if taken_BS is None:
    if visible_BTS is not None:
      return None
    entry_BS = jnp.full((slots_BT.shape[0], num_slots), -1, jnp.int32)
  else:
    entry_BS = jnp.where(taken_BS, entry_BS, -1)
  if visible_BTS is None:
    return cpu_attention.causal_inputs(entry_BS, positions_BT)
  return cpu_attention.masked_inputs(entry_BS, positions_BT, slots_BT, visible_BTS)


def run_blocks(cfg: ModelConfig, layers, x_BTD: jax.Array, positions_BT: jax.Array, cache,
               min_window: int = 0, slots_BT: jax.Array | None = None,
               visible_BTS: jax.Array | None = None, write: bool = True,
               kernels: bool = False):
  """The stack of blocks. ``layers`` stacked on L (a dict, with a
  ``KVCache``): ``lax.scan``; a tuple of per-layer dicts (with
  ``LayerCaches``): a Python loop. ``min_window`` > 0: attention reads the
  smallest of ``attention_windows(num_slots, min_window)`` that holds the
  block's positions (and, under a tree's mask, the slots its entries stand
  for), chosen once for every layer. A draft tree's pass gives the cache
  slots its keys go to (``slots_BT``, default the positions) and its mask
  (``visible_BTS``).

  ``write=True``: each layer writes its keys and values into its cache
  before its attention reads the buffer (XLA then updates it in place).
  ``write=False``: the cache is only read, each layer's attention sees its
  new entries where the write would put them (``PendingBlock``), and the
  caller writes ``block`` later (``kv_cache.write_block``). Inside a
  ``lax.switch`` only the second avoids a copy of the whole cache into and
  out of the branch; outside one, only the first does (XLA copies a buffer
  that is read before an unrelated in-place write). Both attend the same
  values in the same slots, so the results are the same bits (tested on
  CPU), provided no slot is named twice with different entries (a scatter's
  choice between two updates of one index is implementation-defined).

  ``kernels``: a decode step's attention (causal, or a read-only pass under
  a draft tree's mask) runs on the CPU kernel (``cpu_attention``, where it
  applies; the Transformer's ``matmul="kernel"``), which reads the cache
  where it lies (no window) and the block's entries from the block.

  Returns (x_BTD, cache: updated when ``write``, block: the block's keys and
  values in the cache's layout with T slots).
  """
  num_slots = cache.num_slots
  windows = attention_windows(num_slots, min_window)
  slots_BT = positions_BT if slots_BT is None else slots_BT
  # The window must hold every slot a query may see: those <= its position
  # and, with a tree's mask, the slots its block's entries stand for.
  reach_BT = positions_BT if visible_BTS is None else jnp.maximum(
      positions_BT, jnp.where(slots_BT < num_slots, slots_BT, 0))
  index = window_index(windows, reach_BT)
  # Where a read-only pass's entries would go (a writing pass has them in place).
  taken_BS, entry_BS = (None, None) if write else pending_slots(slots_BT, num_slots)
  kernel = (kernel_inputs(positions_BT, slots_BT, num_slots, taken_BS, entry_BS, visible_BTS)
            if kernels else None)

  def attend_layer(p, x, q_BTNH, k_BSGH, v_BSGH, k_BTGH, v_BTGH):
    pending = None if write else PendingBlock(k_BTGH, v_BTGH, taken_BS, entry_BS)
    return block_output(cfg, p, x, q_BTNH, k_BSGH, v_BSGH, positions_BT, windows, index,
                        visible_BTS, pending, kernel)

  if isinstance(layers, (tuple, list)):
    if not isinstance(cache, kv_cache_lib.LayerCaches):
      raise TypeError("unrolled layers need LayerCaches (Transformer.init_cache)")
    keys, values, new_keys, new_values = [], [], [], []
    for p, k_BSGH, v_BSGH in zip(layers, cache.k, cache.v):
      q_BTNH, k_BTGH, v_BTGH = attention_inputs(cfg, p, x_BTD, positions_BT)
      k_BTGH, v_BTGH = k_BTGH.astype(k_BSGH.dtype), v_BTGH.astype(v_BSGH.dtype)
      if write:
        k_BSGH = kv_cache_lib.write(k_BSGH, k_BTGH, slots_BT)
        v_BSGH = kv_cache_lib.write(v_BSGH, v_BTGH, slots_BT)
      x_BTD = attend_layer(p, x_BTD, q_BTNH, k_BSGH, v_BSGH, k_BTGH, v_BTGH)
      keys.append(k_BSGH)
      values.append(v_BSGH)
      new_keys.append(k_BTGH)
      new_values.append(v_BTGH)
    return (x_BTD, kv_cache_lib.LayerCaches(tuple(keys), tuple(values)),
            kv_cache_lib.LayerCaches(tuple(new_keys), tuple(new_values)))
  if not isinstance(cache, kv_cache_lib.KVCache):
    raise TypeError("stacked layers need a stacked KVCache (Transformer.init_cache)")

  def new_entries(p, x):
    q_BTNH, k_BTGH, v_BTGH = attention_inputs(cfg, p, x, positions_BT)
    dtype = cache.k_LBSGH.dtype
    return q_BTNH, k_BTGH.astype(dtype), v_BTGH.astype(dtype)

  if write:
    def layer_step(carry, layer_inputs):
      x, k_all, v_all = carry
      p, layer = layer_inputs
      q_BTNH, k_BTGH, v_BTGH = new_entries(p, x)
      # One scatter into the loop-carried buffer, updated in place.
      k_all = kv_cache_lib.write_layer(k_all, layer, k_BTGH, slots_BT)
      v_all = kv_cache_lib.write_layer(v_all, layer, v_BTGH, slots_BT)
      x = attend_layer(p, x, q_BTNH, k_all[layer], v_all[layer], k_BTGH, v_BTGH)
      return (x, k_all, v_all), (k_BTGH, v_BTGH)

    (x_BTD, k_LBSGH, v_LBSGH), (k_LBTGH, v_LBTGH) = jax.lax.scan(
        layer_step, (x_BTD, cache.k_LBSGH, cache.v_LBSGH), (layers, jnp.arange(cfg.num_layers)))
    cache = kv_cache_lib.KVCache(k_LBSGH, v_LBSGH)
  else:
    def layer_step(x, layer_inputs):
      p, k_BSGH, v_BSGH = layer_inputs
      q_BTNH, k_BTGH, v_BTGH = new_entries(p, x)
      return attend_layer(p, x, q_BTNH, k_BSGH, v_BSGH, k_BTGH, v_BTGH), (k_BTGH, v_BTGH)

    x_BTD, (k_LBTGH, v_LBTGH) = jax.lax.scan(
        layer_step, x_BTD, (layers, cache.k_LBSGH, cache.v_LBSGH))
  return x_BTD, cache, kv_cache_lib.KVCache(k_LBTGH, v_LBTGH)


# ----------------------------------------------------------------------------
# Layouts.

def layer_param_shapes(cfg: ModelConfig) -> dict:
  """One layer's stacked-layout params: {path: shape} (no L axis)."""
  d, f, h = cfg.d_model, cfg.ffn_dim, cfg.head_dim
  n, g = cfg.num_heads * h, cfg.num_kv_heads * h
  shapes = {"attn_norm": {"scale": (d,)}, "mlp_norm": {"scale": (d,)},
            "attn": {"q": {"kernel": (d, n)}, "k": {"kernel": (d, g)},
                     "v": {"kernel": (d, g)}, "o": {"kernel": (n, d)}},
            "mlp": {"gate": {"kernel": (d, f)}, "up": {"kernel": (d, f)},
                    "down": {"kernel": (f, d)}}}
  if cfg.qkv_bias:
    for name, width in (("q", n), ("k", g), ("v", g)):
      shapes["attn"][name]["bias"] = (width,)
  return shapes


def unstack_layers(layers: dict, num_layers: int) -> tuple:
  """Stacked layers -> one dict per layer, q/k/v and gate/up fused."""
  out = []
  for i in range(num_layers):
    p = jax.tree.map(lambda x: x[i], layers)
    attn, mlp = p["attn"], p["mlp"]
    qkv = {"kernel": jnp.concatenate([attn[n]["kernel"] for n in ("q", "k", "v")], axis=-1)}
    if "bias" in attn["q"]:
      qkv["bias"] = jnp.concatenate([attn[n]["bias"] for n in ("q", "k", "v")], axis=-1)
    out.append({"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
                "attn": {"qkv": qkv, "o": attn["o"]},
                "mlp": {"gate_up": {"kernel": jnp.concatenate(
                    [mlp["gate"]["kernel"], mlp["up"]["kernel"]], axis=-1)},
                        "down": mlp["down"]}})
  return tuple(out)


def stack_layers(layers: tuple, cfg: ModelConfig) -> dict:
  """The inverse of ``unstack_layers``."""
  n, g, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.ffn_dim
  split = {"q": slice(0, n), "k": slice(n, n + g), "v": slice(n + g, n + 2 * g)}

  def canonical(p):
    attn = {name: {"kernel": p["attn"]["qkv"]["kernel"][..., cut]} for name, cut in split.items()}
    if "bias" in p["attn"]["qkv"]:
      for name, cut in split.items():
        attn[name]["bias"] = p["attn"]["qkv"]["bias"][..., cut]
    attn["o"] = p["attn"]["o"]
    gate_up = p["mlp"]["gate_up"]["kernel"]
    return {"attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"], "attn": attn,
            "mlp": {"gate": {"kernel": gate_up[..., :f]}, "up": {"kernel": gate_up[..., f:]},
                    "down": p["mlp"]["down"]}}

  return jax.tree.map(lambda *xs: jnp.stack(xs), *[canonical(p) for p in layers])


def is_unrolled(params: dict) -> bool:
  return isinstance(params["layers"], (tuple, list))


def _map_dense(tree, fn):
  """``tree`` with every dense layer's dict (one holding "kernel" or
  "kernel_t") replaced by ``fn(dict)``."""
  if isinstance(tree, dict):
    if "kernel" in tree or "kernel_t" in tree:
      return fn(tree)
    return {name: _map_dense(sub, fn) for name, sub in tree.items()}
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_dense(sub, fn) for sub in tree)
  return tree


def dense_to_rows(p: dict) -> dict:
  """One dense layer's params with its kernel stored [out, in] (``kernel_t``,
  what ``dense`` sends to the CPU kernel); other entries kept."""
  return {("kernel_t" if k == "kernel" else k): (v.T if k == "kernel" else v)
          for k, v in p.items()}


def dense_from_rows(p: dict) -> dict:
  """The inverse of ``dense_to_rows`` (a no-op on an [in, out] kernel)."""
  return {("kernel" if k == "kernel_t" else k): (v.T if k == "kernel_t" else v)
          for k, v in p.items()}


def to_rows_layout(params: dict, extra_dense: tuple[str, ...] = ()) -> dict:
  """Unrolled params with every kernel stored [out, in] (``kernel_t``), the
  layout of ``matmul="kernel"``: the layers', an untied head's and those of
  the top-level dense layers named in ``extra_dense`` (a feature draft's
  ``fc``)."""
  return _map_layout(params, dense_to_rows, extra_dense)


def from_rows_layout(params: dict, extra_dense: tuple[str, ...] = ()) -> dict:
  """The inverse of ``to_rows_layout`` (a no-op on [in, out] params)."""
  return _map_layout(params, dense_from_rows, extra_dense)


def _map_layout(params: dict, fn, extra_dense: tuple[str, ...]) -> dict:
  out = dict(params, layers=_map_dense(params["layers"], fn))
  for name in ("lm_head",) + tuple(extra_dense):
    if name in params:
      out[name] = fn(params[name])
  return out


def stack_params(params: dict, cfg: ModelConfig) -> dict:
  """Params in the stacked layout (for saving, training, sharding), whatever
  layout they are in."""
  if not is_unrolled(params):
    return params
  params = from_rows_layout(params)
  return dict(params, layers=stack_layers(params["layers"], cfg))


@dataclasses.dataclass(frozen=True)
class Transformer:
  """A decoder bound to its config and layer loop. Hashable; every method is pure.

  ``init_params`` and checkpoints use the stacked layout; ``prepare_params``
  turns them into this Transformer's layout (a no-op for ``"scan"``).
  """

  cfg: ModelConfig
  layer_loop: str = "scan"
  # Attention reads a window of the cache, the smallest of ``min_window``,
  # 2 * min_window, ... and the whole cache that holds the block's positions
  # (``attention_windows``); 0 always reads the whole cache.
  min_window: int = DEFAULT_MIN_WINDOW
  # "kernel": the weight products of up to cpu_matmul.MAX_ROWS rows run on the
  # CPU kernel, from kernels stored [out, in] (``prepare_params``); the
  # unrolled layout only (``runtime.matmul`` picks it on a CPU).
  matmul: str = "xla"

  def __post_init__(self):
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={self.layer_loop!r}; expected one of {LAYER_LOOPS}")
    if self.matmul not in MATMULS:
      raise ValueError(f"matmul={self.matmul!r}; expected one of {MATMULS}")
    if self.matmul == "kernel" and self.layer_loop != "unrolled":
      raise ValueError("matmul='kernel' needs layer_loop='unrolled'")
    if not isinstance(self.min_window, int) or self.min_window < 0:
      raise ValueError(f"min_window={self.min_window!r} must be an int >= 0 (0: no windows)")

  def init_params(self, key: jax.Array, init_scale: float = 0.2,
                  logit_scale: float = 4.0) -> dict:
    """Random params from a key, in the stacked layout.

    Kernels and biases ~ normal(init_scale), norm scales 1; embeddings and the
    head are scaled so that logits have std ~logit_scale, which keeps a random
    model's next-token distributions neither flat nor one-hot.
    """
    cfg = self.cfg
    dtype = cfg.jnp_dtype
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    shapes = layer_param_shapes(cfg)
    paths_shapes, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    leaves = []
    for i, (path, shape) in enumerate(paths_shapes):
      full = (cfg.num_layers,) + shape
      if "scale" in jax.tree_util.keystr(path):
        leaves.append(jnp.ones(full, dtype))
      else:
        leaves.append(jax.random.normal(jax.random.fold_in(k_layers, i), full, dtype)
                      * init_scale)
    embed_std = logit_scale / cfg.d_model ** 0.5
    params = {
        "embed": {"embedding": jax.random.normal(
            k_embed, (cfg.vocab_size, cfg.d_model), dtype) * embed_std},
        "layers": jax.tree_util.tree_unflatten(treedef, leaves),
        "final_norm": {"scale": jnp.ones((cfg.d_model,), dtype)},
    }
    if not cfg.tie_embeddings:
      params["lm_head"] = {"kernel": jax.random.normal(
          k_head, (cfg.d_model, cfg.head_size or cfg.vocab_size), dtype) * embed_std}
    if cfg.head_size:
      params["lm_head"]["token_ids"] = jnp.arange(cfg.head_size, dtype=jnp.int32)
    return params

  def prepare_params(self, params: dict, extra_dense: tuple[str, ...] = ()) -> dict:
    """Stacked-layout params in this Transformer's layout (decode-ready);
    ``extra_dense``: top-level dense layers that follow the layout too."""
    if self.layer_loop == "scan":
      return params
    if not is_unrolled(params):
      params = dict(params, layers=unstack_layers(params["layers"], self.cfg.num_layers))
    layout = to_rows_layout if self.matmul == "kernel" else from_rows_layout
    return layout(params, extra_dense)

  def init_cache(self, batch_size: int, num_slots: int):
    """Zero KV cache for this layout: ``KVCache`` or ``LayerCaches``."""
    if self.layer_loop == "unrolled":
      return kv_cache_lib.init_layer_caches(self.cfg, batch_size, num_slots)
    return kv_cache_lib.init_cache(self.cfg, batch_size, num_slots)

  def expected_params_shapes(self) -> dict:
    """Pytree of jax.ShapeDtypeStruct that stacked params for this config must match."""
    return jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))

  def apply(self, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array, cache,
            full_vocab: bool = True, slots_BT=None, visible_BTS=None):
    """Runs the decoder over a block of tokens at the given absolute positions.

    Args:
      params: the params pytree, in this Transformer's layout.
      tokens_BT: int32 token ids.
      positions_BT: int32 absolute positions; slot j of the cache is position j.
      cache: from ``init_cache`` (or a previous call).
      full_vocab: with a restricted head, False returns the head's own
        logits_BTN (for training) instead of logits_BTV.
      slots_BT, visible_BTS: a draft tree's pass (``run_blocks``): the cache
        slots its keys go to and its attention mask.

    Returns:
      (logits_BTV float32, updated cache).
    """
    logits_BTV, _, cache = self.apply_with_hidden(params, tokens_BT, positions_BT, cache,
                                                  full_vocab, slots_BT, visible_BTS)
    return logits_BTV, cache

  def forward(self, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array, cache,
              full_vocab: bool = True, slots_BT=None, visible_BTS=None):
    """``apply_with_hidden`` that reads the cache and writes nothing: returns
    (logits_BTV, hidden_BTD, block), ``block`` the block's keys and values
    for ``kv_cache.write_block`` (the same logits; ``run_blocks``). For
    a pass inside a ``lax.switch`` (the verify widths), which then writes
    once, in place, after it."""
    logits_BTV, hidden_BTD, _, block = self._run(params, tokens_BT, positions_BT, cache,
                                                 full_vocab, slots_BT, visible_BTS, write=False)
    return logits_BTV, hidden_BTD, block

  def apply_with_hidden(self, params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
                        cache, full_vocab: bool = True, slots_BT=None, visible_BTS=None):
    """``apply`` that also returns hidden_BTD: the final-normed states the head
    reads (the features a feature drafter conditions on).

    Returns:
      (logits_BTV float32, hidden_BTD, updated cache).
    """
    logits_BTV, hidden_BTD, cache, _ = self._run(params, tokens_BT, positions_BT, cache,
                                                 full_vocab, slots_BT, visible_BTS, write=True)
    return logits_BTV, hidden_BTD, cache

  def _run(self, params, tokens_BT, positions_BT, cache, full_vocab, slots_BT, visible_BTS,
           write: bool):
    cfg = self.cfg
    embedding_VD = params["embed"]["embedding"]
    x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(cfg.jnp_dtype)
    x_BTD, cache, block = run_blocks(cfg, params["layers"], x_BTD, positions_BT, cache,
                                     self.min_window, slots_BT, visible_BTS, write,
                                     kernels=self.matmul == "kernel")
    hidden_BTD = rms_norm(x_BTD, params["final_norm"]["scale"], cfg.rms_eps)
    return self.head_logits(params, hidden_BTD, full_vocab), hidden_BTD, cache, block

  def head_logits(self, params: dict, hidden_BTD: jax.Array,
                  full_vocab: bool = True) -> jax.Array:
    """float32 logits_BTV (logits_BTN for a restricted head and not full_vocab)."""
    cfg = self.cfg
    if cfg.tie_embeddings and self.matmul == "kernel":
      logits_BTV = cpu_matmul.dense_t(hidden_BTD, params["embed"]["embedding"],
                                      preferred_element_type=jnp.float32)
    elif cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", hidden_BTD, params["embed"]["embedding"],
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = head_product(params["lm_head"], hidden_BTD)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if cfg.head_size and full_vocab:
      logits_BTV = expand_head_logits(logits_BTV, params["lm_head"]["token_ids"],
                                      cfg.vocab_size)
    return logits_BTV


def expand_head_logits(logits_BTN: jax.Array, token_ids_N: jax.Array,
                       vocab_size: int) -> jax.Array:
  """Full-vocabulary logits_BTV from a restricted head's: -inf off the head.

  Probability 0 outside the head keeps rejection sampling exact: such tokens
  are never drafted, and the residual max(0, p - q) keeps their target mass.
  """
  full_BTV = jnp.full(logits_BTN.shape[:-1] + (vocab_size,), -jnp.inf, logits_BTN.dtype)
  return full_BTV.at[..., token_ids_N].set(logits_BTN)
