"""The decoder and its KV cache: cached decoding, causality, padding, drops.

The cache invariant (docs/design.md) is what makes speculative rollback free, so
these tests pin it down directly on the model, before any decode loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assert_close_in_float32
from specdec_jax.generation import Generator
from specdec_jax import tree
from specdec_jax.drafters.base import Proposal
from specdec_jax.models import kv_cache
from specdec_jax.models.kv_cache import KVCache
from specdec_jax.models import transformer
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

VOCAB = 259
PAD_TOKEN = 7  # a real token id: padded slots get real, stale keys


def make_model(*, tie=True, num_kv_heads=2, qkv_bias=False, num_heads=4, vocab=VOCAB,
               layer_loop="scan"):
  return Transformer(ModelConfig(
      vocab_size=vocab, num_layers=2, d_model=64, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=16, ffn_dim=128,
      tie_embeddings=tie, qkv_bias=qkv_bias), layer_loop)


@functools.lru_cache(maxsize=None)
def jitted(model):
  return jax.jit(model.init_params), jax.jit(model.apply)


def init(model, seed):
  return jitted(model)[0](jax.random.PRNGKey(seed))


def full_forward(model, params, seq):
  """Logits [T, V] of one uncached forward over the whole sequence."""
  apply = jitted(model)[1]
  tokens = jnp.asarray([seq], jnp.int32)
  positions = jnp.arange(len(seq), dtype=jnp.int32)[None]
  logits, _ = apply(params, tokens, positions, model.init_cache(1, len(seq)))
  return np.asarray(logits[0])


# ----------------------------------------------------------------------------
# Cached decoding == full forward.

PROMPT_LENS = (5, 11, 2)   # ragged: rows 0 and 2 are right-padded in prefill
TOTAL_LEN = 16             # every full sequence; rows take 11, 5, 14 cached steps


@pytest.mark.parametrize(
    "tie,num_kv_heads,qkv_bias,layer_loop",
    # Each feature on and off, each pair of features seen together.
    [(True, 2, False, "scan"), (False, 2, True, "unrolled"), (True, 4, True, "scan"),
     (False, 4, False, "unrolled")],
    ids=lambda v: str(v))
def test_cached_decoding_matches_full_forward(tie, num_kv_heads, qkv_bias, layer_loop):
  model = make_model(tie=tie, num_kv_heads=num_kv_heads, qkv_bias=qkv_bias,
                     layer_loop=layer_loop)
  params = jitted_init_scaled(model)(jax.random.PRNGKey(3))
  assert ("bias" in params["layers"]["attn"]["q"]) == qkv_bias
  assert ("lm_head" in params) == (not tie)
  params = model.prepare_params(params)
  apply = jitted(model)[1]
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, VOCAB, size=(len(PROMPT_LENS), TOTAL_LEN)).astype(np.int32)
  batch, pmax = len(seqs), max(PROMPT_LENS)
  num_steps = TOTAL_LEN - min(PROMPT_LENS)
  num_slots = TOTAL_LEN + 4

  prompt = np.full((batch, pmax), PAD_TOKEN, np.int32)
  for b, p in enumerate(PROMPT_LENS):
    prompt[b, :p] = seqs[b, :p]
  positions = np.broadcast_to(np.arange(pmax, dtype=np.int32), prompt.shape)
  prefill_logits, cache = apply(params, jnp.asarray(prompt), jnp.asarray(positions),
                                model.init_cache(batch, num_slots))
  got = np.full((batch, TOTAL_LEN, VOCAB), np.nan, np.float32)
  for b, p in enumerate(PROMPT_LENS):
    got[b, :p] = np.asarray(prefill_logits)[b, :p]

  for i in range(num_steps):
    # Per-row positions: each row continues at its own length, overwriting
    # the stale padded slots before any query can read them. A row that has
    # reached TOTAL_LEN keeps writing pad tokens beyond it (ignored).
    pos = np.array([p + i for p in PROMPT_LENS], np.int32)
    tok = np.array([seqs[b, pos[b]] if pos[b] < TOTAL_LEN else PAD_TOKEN
                    for b in range(batch)], np.int32)
    logits, cache = apply(params, jnp.asarray(tok[:, None]), jnp.asarray(pos[:, None]), cache)
    for b in range(batch):
      if pos[b] < TOTAL_LEN:
        got[b, pos[b]] = np.asarray(logits)[b, 0]

  # One uncached forward over the full sequences (no padding: equal lengths).
  ref, _ = apply(params, jnp.asarray(seqs),
                 jnp.broadcast_to(jnp.arange(TOTAL_LEN, dtype=jnp.int32), seqs.shape),
                 model.init_cache(batch, TOTAL_LEN))
  ref = np.asarray(ref)
  assert not np.isnan(got).any()
  for b in range(batch):
    assert_close_in_float32(got[b], ref[b], what=f"row {b}: cached vs full forward")
  # Not vacuous: logits vary by position and row.
  assert np.std(ref) > 0.5


@functools.lru_cache(maxsize=None)
def jitted_init_scaled(model):
  return jax.jit(functools.partial(model.init_params, logit_scale=1.0))


def _with_kv_heads_expanded(params, groups: int, order: str):
  """MHA params equivalent to GQA ``params``: each of the G kv heads repeated
  for its N/G query heads (``order="repeat"``: heads g, g, .., g+1, ..) or
  tiled (``"tile"``: 0, 1, .., 0, 1, ..; the wrong assignment)."""
  def expand(kernel_LDX):
    layers, d, width = kernel_LDX.shape
    heads_LDGH = kernel_LDX.reshape(layers, d, width // 16, 16)
    fn = jnp.repeat if order == "repeat" else (lambda x, r, axis: jnp.tile(x, (1, 1, r, 1)))
    return fn(heads_LDGH, groups, axis=2).reshape(layers, d, -1)
  attn = dict(params["layers"]["attn"])
  for name in ("k", "v"):
    attn[name] = {"kernel": expand(attn[name]["kernel"])}
  return {**params, "layers": {**params["layers"], "attn": attn}}


def test_gqa_query_heads_share_their_groups_kv_head():
  """Query head n attends kv head n // (N/G): a GQA model (N=4, G=2) equals
  the MHA model whose kv heads repeat each GQA kv head for its query heads,
  and differs from the one that assigns them round-robin."""
  gqa, mha = make_model(num_kv_heads=2), make_model(num_kv_heads=4)
  params = init(gqa, 0)
  seq = np.random.default_rng(7).integers(0, VOCAB, size=10).tolist()
  ref = full_forward(gqa, params, seq)
  same = full_forward(mha, _with_kv_heads_expanded(params, 2, "repeat"), seq)
  assert_close_in_float32(same, ref, what="GQA vs expanded MHA")
  wrong = full_forward(mha, _with_kv_heads_expanded(params, 2, "tile"), seq)
  assert np.max(np.abs(wrong - ref)) > 1e-2 * np.max(np.abs(ref))


# ----------------------------------------------------------------------------
# The unrolled layout (per-layer params, fused q/k/v and gate/up).

@pytest.mark.parametrize("tie,qkv_bias", [(True, False), (False, True)])
def test_unrolled_layout_computes_what_the_stacked_one_does(tie, qkv_bias):
  stacked = make_model(tie=tie, qkv_bias=qkv_bias)
  unrolled = make_model(tie=tie, qkv_bias=qkv_bias, layer_loop="unrolled")
  params = init(stacked, 8)
  prepared = unrolled.prepare_params(params)
  layers = prepared["layers"]
  assert isinstance(layers, tuple) and len(layers) == 2
  assert layers[0]["attn"]["qkv"]["kernel"].shape == (64, (4 + 2 * 2) * 16)
  assert layers[1]["mlp"]["gate_up"]["kernel"].shape == (64, 2 * 128)
  assert ("bias" in layers[0]["attn"]["qkv"]) == qkv_bias
  # The conversion is lossless both ways.
  back = transformer.stack_params(prepared, stacked.cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A prompt then two cached steps: the same logits and cache entries.
  tokens = jnp.asarray(np.random.default_rng(9).integers(0, VOCAB, size=(2, 7)), jnp.int32)
  runs = {}
  for name, model, p in (("stacked", stacked, params), ("unrolled", unrolled, prepared)):
    apply = jax.jit(model.apply)
    logits, cache = apply(p, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)),
                          model.init_cache(2, 12))
    steps = [logits]
    for t in (5, 6):
      logits, cache = apply(p, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
      steps.append(logits)
    runs[name] = (steps, cache.stacked())
  for a, b in zip(runs["unrolled"][0], runs["stacked"][0]):
    assert_close_in_float32(a, b, what="unrolled vs stacked logits")
  assert_close_in_float32(runs["unrolled"][1].k_LBSGH, runs["stacked"][1].k_LBSGH,
                          what="cached keys")
  with pytest.raises(TypeError, match="LayerCaches"):
    unrolled.apply(prepared, tokens[:, :2], jnp.zeros((2, 2), jnp.int32),
                   stacked.init_cache(2, 4))


def test_unknown_layer_loop_is_refused():
  with pytest.raises(ValueError, match="layer_loop"):
    make_model(layer_loop="vmap")


# ----------------------------------------------------------------------------
# Attention windows: a step reads the cache slots the text has reached.

def test_attention_windows_hand_values():
  assert transformer.attention_windows(2117, 256) == (256, 512, 1024, 2117)
  assert transformer.attention_windows(581, 256) == (256, 581)
  assert transformer.attention_windows(325, 256) == (325,)     # too small to halve
  assert transformer.attention_windows(2117, 0) == (2117,)     # windows off
  windows = (4, 8, 16, 40)
  index = lambda positions: int(transformer.window_index(windows, jnp.asarray(positions)))
  # The largest position of any row picks the window: slots <= it must be inside.
  assert [index([[p]]) for p in (0, 3, 4, 7, 8, 15, 16, 39)] == [0, 0, 1, 1, 2, 2, 3, 3]
  assert index([[1, 2, 3, 4]]) == 1 and index([[2], [9]]) == 2
  with pytest.raises(ValueError, match="min_window"):
    Transformer(make_model().cfg, min_window=-1)


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_windowed_attention_equals_the_whole_cache(layer_loop, monkeypatch):
  """Ragged rows decoded through every window boundary (4, 8, 16, then the
  whole 40-slot cache) give the whole-cache logits; a chooser that picks too
  small a window (the negative control) does not."""
  whole = make_model(layer_loop=layer_loop)
  assert whole.min_window == transformer.DEFAULT_MIN_WINDOW   # 40 slots: no windows
  windowed = Transformer(whole.cfg, layer_loop, min_window=4)
  params = whole.prepare_params(init(make_model(), 5))
  rng = np.random.default_rng(4)
  prompt_lens, total, num_slots = (3, 6), 30, 40
  seqs = rng.integers(0, VOCAB, size=(2, total)).astype(np.int32)

  def decode(model):
    apply = jax.jit(model.apply)
    prompt = np.where(np.arange(6) < np.array(prompt_lens)[:, None], seqs[:, :6], PAD_TOKEN)
    logits, cache = apply(params, jnp.asarray(prompt, jnp.int32),
                          jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6)),
                          model.init_cache(2, num_slots))
    steps = [np.asarray(logits)]
    for i in range(total - max(prompt_lens)):
      # Each row at its own length; a 2-token block as a verify pass has.
      pos = np.array([[p + 2 * i, p + 2 * i + 1] for p in prompt_lens], np.int32)
      pos = np.minimum(pos, total - 1)
      tok = np.take_along_axis(seqs, pos, axis=1)
      logits, cache = apply(params, jnp.asarray(tok), jnp.asarray(pos), cache)
      steps.append(np.asarray(logits))
    return steps

  ref = decode(whole)
  for i, (a, b) in enumerate(zip(decode(windowed), ref)):
    assert_close_in_float32(a, b, what=f"windowed vs whole cache, call {i}")
  monkeypatch.setattr(transformer, "window_index",
                      lambda windows, positions: jnp.int32(0))   # always 4 slots
  wrong = decode(windowed)
  assert max(np.max(np.abs(a - b)) for a, b in zip(wrong, ref)) > 1e-2


def test_windowed_tree_pass_equals_the_whole_cache(monkeypatch):
  """A draft tree's verify pass under windows gives every node the logits of
  the whole cache, also where its nodes' slots (named past the text) reach
  the next window before their positions do; the negative control, the
  window its positions alone would pick, misses those nodes."""
  whole = make_model(layer_loop="unrolled")
  windowed = Transformer(whole.cfg, "unrolled", min_window=4)
  params = whole.prepare_params(init(make_model(), 5))
  num_slots = 40
  assert transformer.attention_windows(num_slots, 4) == (4, 8, 16, 40)
  rng = np.random.default_rng(8)
  tokens_BS = jnp.asarray(rng.integers(0, VOCAB, size=(2, num_slots)), jnp.int32)
  length_B = jnp.asarray([6, 5], jnp.int32)
  _, cache = whole.apply(params, tokens_BS[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)),
                         whole.init_cache(2, num_slots))
  # Four nodes, two per depth: positions reach 5 + 2 = 7 (window 8), their
  # slots 6 + 3 = 9 (window 16).
  proposal = Proposal(draft_BK=jnp.asarray(rng.integers(0, VOCAB, size=(2, 4)), jnp.int32),
                      q_BKV=None, num_proposed_B=jnp.asarray([4, 4], jnp.int32),
                      parent_BK=jnp.asarray([[-1, -1, 0, 1]] * 2, jnp.int32),
                      depth_BK=jnp.asarray([[1, 1, 2, 2]] * 2, jnp.int32))
  block = tree.verify_block(tokens_BS, length_B, proposal, num_slots, 2)
  tokens_BW, positions_BW, slots_BW, visible_BWS = block
  assert int(jnp.max(positions_BW)) == 7 and int(jnp.max(slots_BW)) == 9

  def logits(model):
    return np.asarray(model.forward(params, tokens_BW, positions_BW, cache, slots_BT=slots_BW,
                                    visible_BTS=visible_BWS)[0])

  ref = logits(whole)
  assert_close_in_float32(logits(windowed), ref, what="windowed vs whole-cache tree pass")
  monkeypatch.setattr(transformer, "window_index", lambda windows, reach: jnp.int32(1))
  assert np.max(np.abs(logits(windowed) - ref)) > 1e-2


# ----------------------------------------------------------------------------
# Causality.

@pytest.mark.parametrize("change_at", [0, 4, 9])
def test_causality(change_at):
  model = make_model()
  params = init(model, 1)
  rng = np.random.default_rng(1)
  seq = rng.integers(0, VOCAB, size=12).tolist()
  changed = list(seq)
  changed[change_at] = (seq[change_at] + 1) % VOCAB
  a, b = full_forward(model, params, seq), full_forward(model, params, changed)
  np.testing.assert_array_equal(a[:change_at], b[:change_at])
  # The change is visible from its own position on (the test can fail).
  assert np.max(np.abs(a[change_at:] - b[change_at:])) > 1e-3


def test_causality_in_cached_block():
  """Within one multi-token block (a verify call), a later token in the block
  does not affect earlier positions' logits."""
  model = make_model()
  params = init(model, 2)
  apply = jitted(model)[1]
  rng = np.random.default_rng(2)
  prompt = rng.integers(0, VOCAB, size=(1, 6)).astype(np.int32)
  _, cache = apply(params, jnp.asarray(prompt), jnp.arange(6)[None], model.init_cache(1, 16))
  block = rng.integers(0, VOCAB, size=(1, 4)).astype(np.int32)
  other = block.copy()
  other[0, 3] = (other[0, 3] + 5) % VOCAB
  pos = jnp.arange(6, 10)[None]
  la, _ = apply(params, jnp.asarray(block), pos, cache)
  lb, _ = apply(params, jnp.asarray(other), pos, cache)
  np.testing.assert_array_equal(np.asarray(la)[0, :3], np.asarray(lb)[0, :3])
  assert np.max(np.abs(np.asarray(la)[0, 3] - np.asarray(lb)[0, 3])) > 1e-3


# ----------------------------------------------------------------------------
# Padding invariance.

@pytest.fixture(scope="session")
def padding_setup():
  model = make_model()
  params = init(model, 4)
  rng = np.random.default_rng(4)
  row = rng.integers(0, VOCAB, size=7).tolist()
  longer = rng.integers(0, VOCAB, size=20).tolist()
  shorter = rng.integers(0, VOCAB, size=3).tolist()
  return model, params, row, longer, shorter


def test_padding_invariance_logits(padding_setup):
  model, params, row, longer, shorter = padding_setup
  apply = jitted(model)[1]
  alone = full_forward(model, params, row)
  batch = np.full((3, len(longer)), PAD_TOKEN, np.int32)
  for b, seq in enumerate([longer, row, shorter]):
    batch[b, :len(seq)] = seq
  positions = np.broadcast_to(np.arange(batch.shape[1], dtype=np.int32), batch.shape)
  logits, _ = apply(params, jnp.asarray(batch), jnp.asarray(positions),
                    model.init_cache(3, batch.shape[1] + 4))
  in_batch = np.asarray(logits)[1, :len(row)]
  assert_close_in_float32(in_batch, alone, what="row in a padded batch vs alone")
  # The other rows differ from it (the batch really holds other text).
  assert np.max(np.abs(np.asarray(logits)[0, :len(row)] - alone)) > 1e-2


def test_padding_invariance_greedy_generation(padding_setup):
  model, params, row, longer, shorter = padding_setup
  kwargs = dict(max_prompt_len=32, max_new_tokens=16)
  single = Generator(model, batch_size=1, **kwargs)
  triple = Generator(model, batch_size=3, **kwargs)
  alone = single.generate(params, None, [row]).rows[0]
  rows = triple.generate(params, None, [longer, row, shorter]).rows
  assert rows[1].prompt_ids == row
  assert alone.prompt_ids == row
  assert len(alone.output_ids) == 16
  assert rows[1].output_ids == alone.output_ids
  # The other rows are really different (otherwise the test proves nothing).
  assert rows[0].output_ids != alone.output_ids or rows[2].output_ids != alone.output_ids
  # The row also runs fine in another slot and alongside a partial batch.
  rows2 = triple.generate(params, None, [shorter, row]).rows
  assert rows2[1].output_ids == alone.output_ids
  assert rows2[0].output_ids == rows[2].output_ids


# ----------------------------------------------------------------------------
# KV cache writes out of range are dropped.

def _cache_and_values(num_slots=6, width=1):
  """A stacked cache (L=2, B=2, S, G=1, H=4) and a block of ``width`` new
  entries per layer and row."""
  rng = np.random.default_rng(5)
  cache = KVCache(*(jnp.asarray(rng.normal(size=(2, 2, num_slots, 1, 4)).astype(np.float32))
                    for _ in range(2)))
  block = KVCache(*(jnp.asarray(rng.normal(size=(2, 2, width, 1, 4)).astype(np.float32))
                    for _ in range(2)))
  return cache, block


@pytest.mark.parametrize("bad_pos", [6, -1, 7, 100])
def test_kv_write_out_of_range_is_dropped(bad_pos):
  cache, block = _cache_and_values()
  out = kv_cache.write_block(cache, block, jnp.full((2, 1), bad_pos, jnp.int32))
  np.testing.assert_array_equal(np.asarray(out.k_LBSGH), np.asarray(cache.k_LBSGH))
  np.testing.assert_array_equal(np.asarray(out.v_LBSGH), np.asarray(cache.v_LBSGH))


def test_kv_write_block_running_past_end():
  """A block at positions [S-2, S-1, S, S+1]: the first two land, the rest
  are dropped (clamping would overwrite slot S-1 with a later token)."""
  cache, block = _cache_and_values(width=4)
  num_slots = cache.num_slots
  positions = jnp.asarray([[num_slots - 2 + i for i in range(4)],
                           [-1, 0, 1, num_slots]], jnp.int32)
  out = np.asarray(kv_cache.write_block(cache, block, positions).k_LBSGH)
  expected = np.asarray(cache.k_LBSGH).copy()
  new = np.asarray(block.k_LBSGH)
  expected[:, 0, num_slots - 2] = new[:, 0, 0]
  expected[:, 0, num_slots - 1] = new[:, 0, 1]
  expected[:, 1, 0] = new[:, 1, 1]
  expected[:, 1, 1] = new[:, 1, 2]
  np.testing.assert_array_equal(out, expected)


def test_kv_write_per_row_positions_in_both_layouts():
  cache, block = _cache_and_values()
  slots = jnp.asarray([[2], [4]], jnp.int32)
  out = np.asarray(kv_cache.write_block(cache, block, slots).v_LBSGH)
  expected = np.asarray(cache.v_LBSGH).copy()
  expected[:, 0, 2] = np.asarray(block.v_LBSGH)[:, 0, 0]
  expected[:, 1, 4] = np.asarray(block.v_LBSGH)[:, 1, 0]
  np.testing.assert_array_equal(out, expected)
  per_layer = lambda c: kv_cache.LayerCaches(tuple(c.k_LBSGH), tuple(c.v_LBSGH))
  unrolled = kv_cache.write_block(per_layer(cache), per_layer(block), slots)
  np.testing.assert_array_equal(np.asarray(unrolled.stacked().v_LBSGH), expected)


def test_forward_reads_the_cache_and_equals_writing_first():
  """``forward`` attends as if the block were written first, whatever stale
  entries the cache holds at its slots: the same bits as ``apply``, for a
  chain block and for a block with permuted and out-of-range slots; the
  negative control (the stale entries read as they are) differs."""
  model = make_model(layer_loop="unrolled")
  params = model.prepare_params(init(make_model(), 3))
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(2, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  _, cache = model.apply(params, tokens[:, :6], positions[:, :6], model.init_cache(2, 12))
  # Stale entries at the slots the next block stands for (6..8).
  stale = model.apply(params, tokens[:, 3:6], positions[:, 6:9], cache)[1]
  odd_slots = jnp.asarray([[6, 8, 7], [7, 12, -1]], jnp.int32)
  for slots in (None, odd_slots):
    ref, _, written = model.apply_with_hidden(params, tokens[:, 6:9], positions[:, 6:9], stale,
                                              slots_BT=slots)
    logits, _, block = model.forward(params, tokens[:, 6:9], positions[:, 6:9], stale,
                                     slots_BT=slots)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
    assert block.num_slots == 3   # the block's own entries, for write_block
    again = kv_cache.write_block(stale, block, positions[:, 6:9] if slots is None else slots)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(written)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  clean, _ = model.apply(params, tokens[:, 6:9], positions[:, 6:9], cache)
  with pytest.MonkeyPatch.context() as patch:
    nothing_pending = lambda slots_BT, num_slots: (
        jnp.zeros((2, num_slots), bool), jnp.zeros((2, num_slots), jnp.int32))
    patch.setattr(transformer, "pending_slots", nothing_pending)
    wrong = model.forward(params, tokens[:, 6:9], positions[:, 6:9], stale)[0]
  ref = model.forward(params, tokens[:, 6:9], positions[:, 6:9], stale)[0]
  assert_close_in_float32(ref, clean, what="forward over stale slots vs a clean cache")
  assert np.max(np.abs(np.asarray(wrong) - np.asarray(ref))) > 1e-3
