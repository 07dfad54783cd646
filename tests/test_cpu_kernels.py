"""The CPU kernels (kernels/): the matmul and the decode-step attention are
exact against independent references, give a row the same bits whatever
the pass's width, run where they apply and nowhere else, are
differentiable, and a Transformer on them computes what one on XLA does.

The kernels need a C++ compiler; on a machine without one these tests are
skipped with that reason (everything then runs on XLA), and
``test_kernels_build_where_a_compiler_exists`` fails if one exists but the
kernels do not build.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import assert_close_in_float32
from specdec_jax.kernels import build
from specdec_jax.kernels import cpu_attention
from specdec_jax.kernels import cpu_matmul
from specdec_jax.models import transformer
from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

needs_kernel = pytest.mark.skipif(build.compiler() is None,
                                  reason="no C++ compiler: the kernels cannot be built here")


def test_kernels_build_where_a_compiler_exists():
  if build.compiler() is None:
    pytest.skip("no C++ compiler")
  assert build.available(), build.why_unavailable()


def _reference(x_MD, w_ND):
  """float64 numpy: an independent computation of x @ w.T."""
  return np.asarray(x_MD, np.float64) @ np.asarray(w_ND, np.float64).T


@needs_kernel
@pytest.mark.parametrize("d", [16, 50, 576])          # 50: a tail past the 16-lane blocks
@pytest.mark.parametrize("n", [1, 7, 130])            # 7, 130: not multiples of 4 or 64
def test_kernel_equals_the_reference_for_every_row_count(d, n):
  rng = np.random.default_rng(d * 1000 + n)
  w_ND = rng.standard_normal((n, d), dtype=np.float32)
  fn = jax.jit(cpu_matmul.rows_matmul)
  for m in range(1, cpu_matmul.MAX_ROWS + 1):
    x_MD = rng.standard_normal((m, d), dtype=np.float32)
    got = np.asarray(fn(x_MD, w_ND))
    want = _reference(x_MD, w_ND)
    # float32 sums of d products: a few ulps of the sum of magnitudes.
    scale = np.abs(x_MD).astype(np.float64) @ np.abs(w_ND).astype(np.float64).T
    assert np.all(np.abs(got - want) <= 1e-5 * scale + 1e-30), (m, d, n)
    # Not vacuous: the bound tells the rows of w apart.
    if n > 1:
      assert np.any(np.abs(got - _reference(x_MD, w_ND[::-1])) > 1e-5 * scale[:, ::-1])


@needs_kernel
def test_a_rows_result_is_the_same_bits_in_any_pass_width():
  """Row m of an M-row product equals the 1-row product of x[m] bit for bit,
  for every M (the verify pass and the plain step agree exactly)."""
  rng = np.random.default_rng(0)
  w_ND = rng.standard_normal((200, 576), dtype=np.float32)
  x_MD = rng.standard_normal((8, 576), dtype=np.float32)
  fn = jax.jit(cpu_matmul.rows_matmul)
  single = np.concatenate([np.asarray(fn(x_MD[m:m + 1], w_ND)) for m in range(8)])
  for m in range(2, 9):
    np.testing.assert_array_equal(np.asarray(fn(x_MD[:m], w_ND)), single[:m], err_msg=f"M={m}")
  # XLA's dot, by contrast, need not agree with the kernel bit for bit.
  assert np.max(np.abs(np.asarray(x_MD @ w_ND.T) - single)) < 1e-3


@needs_kernel
def test_every_chunk_is_done_when_the_call_returns():
  """A product with many chunks for the helper threads (a head-sized N),
  called repeatedly: each result is complete and equals the 1-row products
  (a caller that returned before the helpers' chunks were done would leave
  stale values)."""
  rng = np.random.default_rng(3)
  w_ND = rng.standard_normal((1000, 16384), dtype=np.float32)
  x_MD = rng.standard_normal((3, 16384), dtype=np.float32)
  fn = jax.jit(cpu_matmul.rows_matmul)
  want = np.concatenate([np.asarray(fn(x_MD[m:m + 1], w_ND)) for m in range(3)])
  for _ in range(20):
    np.testing.assert_array_equal(np.asarray(fn(x_MD, w_ND)), want)


def _custom_calls(fn, *args) -> int:
  return jax.jit(fn).lower(*args).as_text().count(cpu_matmul.TARGET_NAME)


@needs_kernel
def test_dense_t_takes_the_kernel_only_where_it_applies():
  w = jnp.ones((32, 64), jnp.float32)
  assert _custom_calls(cpu_matmul.dense_t, jnp.ones((2, 4, 64)), w) == 1      # 8 rows
  assert _custom_calls(cpu_matmul.dense_t, jnp.ones((3, 3, 64)), w) == 0      # 9 rows: XLA
  assert _custom_calls(cpu_matmul.dense_t, jnp.ones((1, 64), jnp.bfloat16),
                       w.astype(jnp.bfloat16)) == 0                          # not float32
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 64)), jnp.float32)
  assert_close_in_float32(jax.jit(cpu_matmul.dense_t)(x, w * 0.5), x @ (w * 0.5).T,
                          what="dense_t vs x @ w.T")


@needs_kernel
def test_kernel_gradients_equal_xlas():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((20, 48)), jnp.float32)
  loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))
  got = jax.grad(loss(cpu_matmul.rows_matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    assert_close_in_float32(a, b, what="gradient")


def _model(matmul: str, tie: bool) -> Transformer:
  return Transformer(ModelConfig(vocab_size=259, num_layers=2, d_model=64, num_heads=4,
                                 num_kv_heads=2, head_dim=16, ffn_dim=128,
                                 tie_embeddings=tie, qkv_bias=not tie),
                     "unrolled", matmul=matmul)


@needs_kernel
@pytest.mark.parametrize("tie", [True, False])
def test_transformer_on_the_kernel_computes_what_xlas_does(tie):
  """Prefill (10 rows: XLA) then cached steps of 1 and 3 tokens (the
  kernel): the same logits as the XLA model, the kernels stored [out, in],
  and ``stack_params`` restores the checkpoint layout exactly."""
  xla, kernel = _model("xla", tie), _model("kernel", tie)
  stacked = jax.jit(Transformer(xla.cfg).init_params)(jax.random.PRNGKey(4))
  p_xla, p_kernel = xla.prepare_params(stacked), kernel.prepare_params(stacked)
  assert p_kernel["layers"][0]["attn"]["qkv"]["kernel_t"].shape == ((4 + 2 * 2) * 16, 64)
  assert ("kernel_t" in p_kernel.get("lm_head", {})) == (not tie)
  for a, b in zip(jax.tree.leaves(transformer.stack_params(p_kernel, kernel.cfg)),
                  jax.tree.leaves(stacked)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 259, size=(2, 9)), jnp.int32)
  logits = {}
  for name, model, params in (("xla", xla, p_xla), ("kernel", kernel, p_kernel)):
    apply = jax.jit(model.apply)
    out, cache = apply(params, tokens[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)),
                       model.init_cache(2, 12))
    steps = [out]
    for start, width in ((5, 1), (6, 3)):
      out, cache = apply(params, tokens[:, start:start + width],
                         jnp.broadcast_to(jnp.arange(start, start + width), (2, width)), cache)
      steps.append(out)
    logits[name] = steps
    hlo = apply.lower(params, tokens[:, :3], jnp.zeros((2, 3), jnp.int32),
                      model.init_cache(2, 12)).as_text()
    assert (cpu_matmul.TARGET_NAME in hlo) == (name == "kernel")
  for a, b in zip(logits["kernel"], logits["xla"]):
    assert_close_in_float32(a, b, what="kernel vs XLA logits")


@needs_kernel
def test_runtime_picks_the_kernel_for_unrolled_float32_models_on_the_cpu():
  import ml_collections
  from specdec_jax import runtime
  entry = lambda choice="auto": ml_collections.ConfigDict(dict(matmul=choice))
  assert runtime.matmul(entry(), "unrolled", "float32") == "kernel"
  assert runtime.matmul(entry(), "scan", "float32") == "xla"
  # The loaded model's dtype decides (an orbax checkpoint brings its own).
  assert runtime.matmul(entry(), "unrolled", "bfloat16") == "xla"
  assert runtime.matmul(entry("xla"), "unrolled", "float32") == "xla"
  with pytest.raises(ValueError, match="unrolled"):
    runtime.matmul(entry("kernel"), "scan", "float32")
  with pytest.raises(ValueError, match="bfloat16"):
    runtime.matmul(entry("kernel"), "unrolled", "bfloat16")
  with pytest.raises(ValueError, match="matmul"):
    runtime.matmul(entry("blas"), "unrolled", "float32")


def test_a_bad_matmul_setting_is_refused_before_anything_loads():
  from specdec_jax import runtime
  from configs import tiny
  config = tiny.get_config()
  config.model.matmul = "blas"
  with pytest.raises(ValueError, match=r"config\.model\.matmul='blas'"):
    runtime.validate_config(config)


def test_kernel_needs_the_unrolled_layout():
  with pytest.raises(ValueError, match="unrolled"):
    Transformer(_model("xla", True).cfg, "scan", matmul="kernel")
  with pytest.raises(ValueError, match="matmul"):
    Transformer(_model("xla", True).cfg, "unrolled", matmul="blas")


def test_without_a_compiler_everything_runs_on_xla(monkeypatch, tmp_path):
  """No compiler: ``available()`` says why, ``dense_t`` falls back, and the
  runtime's "auto" picks XLA while "kernel" is refused with the reason."""
  from specdec_jax import runtime
  import ml_collections
  monkeypatch.setattr(build, "_state", {"loaded": None, "why": ""})
  monkeypatch.setattr(build, "compiler", lambda: None)
  monkeypatch.setenv("SPECDEC_KERNEL_CACHE", str(tmp_path))
  assert not build.available()
  assert "compiler" in build.why_unavailable()
  assert not cpu_attention.applies(jnp.ones((1, 1, 4, 16)), jnp.ones((1, 8, 2, 16)))
  assert _custom_calls(cpu_matmul.dense_t, jnp.ones((1, 64)), jnp.ones((8, 64))) == 0
  entry = ml_collections.ConfigDict(dict(matmul="auto"))
  assert runtime.matmul(entry, "unrolled", "float32") == "xla"
  entry.matmul = "kernel"
  with pytest.raises(ValueError, match="compiler"):
    runtime.matmul(entry, "unrolled", "float32")
  # A direct call lowers XLA's dot instead of the missing kernel.
  x, w = jnp.ones((2, 64)), jnp.ones((8, 64))
  assert _custom_calls(cpu_matmul.rows_matmul, x, w) == 0
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matmul.rows_matmul)(x, w)),
                                np.full((2, 8), 64.0))


# ----------------------------------------------------------------------------
# The decode-step attention.

ATTN_CFG = ModelConfig(vocab_size=32, num_layers=1, d_model=64, num_heads=6, num_kv_heads=2,
                       head_dim=64, ffn_dim=64)


def _attention_case(seq, seed=0, slots=48):
  """Queries of 2 rows at ragged positions (row 0 from 9, row 1 from 30),
  a cache whose slots past each row's text hold garbage, and the block's
  entries pending at the slots of its positions (the cache there is stale)."""
  rng = np.random.default_rng(seed)
  b, n, g, h = 2, ATTN_CFG.num_heads, ATTN_CFG.num_kv_heads, ATTN_CFG.head_dim
  q = rng.standard_normal((b, seq, n, h), dtype=np.float32)
  k = rng.standard_normal((b, slots, g, h), dtype=np.float32)
  v = rng.standard_normal((b, slots, g, h), dtype=np.float32)
  positions = np.stack([9 + np.arange(seq), 30 + np.arange(seq)]).astype(np.int32)
  for row in range(b):
    k[row, positions[row, 0]:] = 50.0 * (1 + row)      # never read: past the text ...
    v[row, positions[row, 0]:] = -70.0                 # ... or overlaid by the block
  new_k = rng.standard_normal((b, seq, g, h), dtype=np.float32)
  new_v = rng.standard_normal((b, seq, g, h), dtype=np.float32)
  taken, entry = transformer.pending_slots(jnp.asarray(positions), slots)
  pending = transformer.PendingBlock(jnp.asarray(new_k), jnp.asarray(new_v), taken, entry)
  inputs = transformer.kernel_inputs(jnp.asarray(positions), jnp.asarray(positions), slots,
                                     taken, entry)
  return q, k, v, positions, pending, inputs


@needs_kernel
@pytest.mark.parametrize("seq", [1, 3, 8])
def test_attention_kernel_equals_xlas_attention(seq):
  """Against the decoder's own XLA attention (GQA, ragged positions, the
  block pending over stale slots, garbage past the text), and against the
  kernel's XLA reference."""
  q, k, v, positions, pending, inputs = _attention_case(seq)
  got = jax.jit(cpu_attention.decode_attention)(q, k, v, pending.k_BTGH, pending.v_BTGH,
                                                *inputs)
  want = jax.jit(lambda *a: transformer.attend(ATTN_CFG, *a, pending=pending))(q, k, v, positions)
  assert_close_in_float32(got, want, what="kernel vs transformer.attend")
  assert_close_in_float32(got, cpu_attention.reference(q, k, v, pending.k_BTGH, pending.v_BTGH,
                                                       *inputs), what="vs reference")
  # Not vacuous: ignoring the block (reading the stale cache) is far off.
  stale = jax.jit(cpu_attention.decode_attention)(
      q, k, v, pending.k_BTGH, pending.v_BTGH, *inputs._replace(
          entry_BS=jnp.full_like(inputs.entry_BS, -1)))
  assert np.max(np.abs(np.asarray(stale) - np.asarray(want))) > 1.0


@needs_kernel
def test_attention_kernel_gives_a_query_the_same_bits_in_any_pass_width():
  """Query 0 of an 8-query pass equals the 1-query pass at its position bit
  for bit (the verify pass and the plain step agree exactly)."""
  q8, k, v, pos8, pend8, inputs8 = _attention_case(8, seed=1)
  fn = jax.jit(cpu_attention.decode_attention)
  wide = np.asarray(fn(q8, k, v, pend8.k_BTGH, pend8.v_BTGH, *inputs8))
  for width in (1, 5):
    pos = jnp.asarray(pos8[:, :width])
    inputs = transformer.kernel_inputs(pos, pos, k.shape[1],
                                       *transformer.pending_slots(pos, k.shape[1]))
    narrow = np.asarray(fn(q8[:, :width], k, v, pend8.k_BTGH[:, :width],
                           pend8.v_BTGH[:, :width], *inputs))
    np.testing.assert_array_equal(narrow, wide[:, :width])


@needs_kernel
def test_attention_kernel_runs_for_decode_steps_only():
  """In a kernel-mode model: a cached step, a read-only verify pass and a
  draft tree's read-only masked pass attend on the kernel; prefill (more
  than 8 queries) and a masked pass that writes first stay on XLA."""
  model = _model("kernel", tie=True)
  params = model.prepare_params(jax.jit(Transformer(model.cfg).init_params)(
      jax.random.PRNGKey(0)))
  cache = model.init_cache(1, 24)
  calls = lambda fn, *a: jax.jit(fn).lower(*a).as_text().count(cpu_attention.TARGET_NAME)
  tok = lambda t: jnp.zeros((1, t), jnp.int32)
  pos = lambda t: jnp.arange(t, dtype=jnp.int32)[None]
  assert calls(model.apply, params, tok(3), pos(3), cache) == 2           # one per layer
  assert calls(model.forward, params, tok(5), pos(5), cache) == 2
  assert calls(model.apply, params, tok(12), pos(12), cache) == 0         # prefill
  visible = jnp.ones((1, 3, 24), bool)
  assert calls(lambda *a: model.apply(*a, visible_BTS=visible), params, tok(3), pos(3), cache) == 0
  assert calls(lambda *a: model.forward(*a, slots_BT=pos(3), visible_BTS=visible), params,
               tok(3), pos(3), cache) == 2


def _tree_case(seed=3, slots=48):
  """A draft tree's read-only pass over 2 rows (texts of 12 and 31 tokens):
  6 nodes, parents (-1, -1, 0, 0, 2, 3), depths (1, 1, 2, 2, 3, 3), laid out
  by ``tree.verify_block``; the cache past each text holds garbage (the
  root's slot and the nodes' named slots included)."""
  from specdec_jax import tree
  from specdec_jax.drafters.base import Proposal
  rng = np.random.default_rng(seed)
  b, n, g, h = 2, ATTN_CFG.num_heads, ATTN_CFG.num_kv_heads, ATTN_CFG.head_dim
  length = jnp.asarray([12, 31], jnp.int32)
  proposal = Proposal(draft_BK=jnp.asarray(rng.integers(0, 32, size=(b, 6)), jnp.int32),
                      q_BKV=None, num_proposed_B=jnp.asarray([6, 6], jnp.int32),
                      parent_BK=jnp.asarray([[-1, -1, 0, 0, 2, 3]] * b, jnp.int32),
                      depth_BK=jnp.asarray([[1, 1, 2, 2, 3, 3]] * b, jnp.int32))
  tokens = jnp.zeros((b, slots), jnp.int32)
  _, positions, slots_bw, visible = tree.verify_block(tokens, length, proposal, slots, 3)
  w = positions.shape[1]
  q = rng.standard_normal((b, w, n, h), dtype=np.float32)
  k = rng.standard_normal((b, slots, g, h), dtype=np.float32)
  v = rng.standard_normal((b, slots, g, h), dtype=np.float32)
  for row in range(b):
    k[row, int(length[row]) - 1:] = 40.0
    v[row, int(length[row]) - 1:] = -60.0
  new_k = rng.standard_normal((b, w, g, h), dtype=np.float32)
  new_v = rng.standard_normal((b, w, g, h), dtype=np.float32)
  taken, entry = transformer.pending_slots(slots_bw, slots)
  pending = transformer.PendingBlock(jnp.asarray(new_k), jnp.asarray(new_v), taken, entry)
  inputs = transformer.kernel_inputs(positions, slots_bw, slots, taken, entry,
                                     visible_BTS=visible)
  return q, k, v, positions, visible, pending, inputs, length


@needs_kernel
def test_attention_kernel_under_a_tree_mask_equals_xlas_attention():
  """A tree node attends the text and its ancestors and itself (listed
  shallowest first): the kernel equals the decoder's masked XLA attention
  and the reference; dropping the ancestors (a causal-only kernel) is far off."""
  q, k, v, positions, visible, pending, inputs, length = _tree_case()
  # A query's leading run of visible slots: its text (through the root's
  # slot, length - 1), and node 0's slot (length) where node 0 is on its path.
  np.testing.assert_array_equal(np.asarray(inputs.limit_BT),
                                np.asarray(length)[:, None] - 1 + np.array([0, 1, 0, 1, 1, 1, 1]))
  # Node 4 (entry 5; run through node 0): node 2 (entry 3), then itself.
  np.testing.assert_array_equal(np.asarray(inputs.extra_BTX)[0, 5, :3], [3, 5, -1])
  # Node 1 (entry 2), not next to the text's run: only itself.
  np.testing.assert_array_equal(np.asarray(inputs.extra_BTX)[1, 2, :2], [2, -1])
  fn = jax.jit(cpu_attention.decode_attention)
  got = fn(q, k, v, pending.k_BTGH, pending.v_BTGH, *inputs)
  want = jax.jit(lambda *a: transformer.attend(ATTN_CFG, *a, visible_BTS=visible,
                                               pending=pending))(q, k, v, positions)
  assert_close_in_float32(got, want, what="tree kernel vs transformer.attend")
  assert_close_in_float32(got, cpu_attention.reference(q, k, v, pending.k_BTGH,
                                                       pending.v_BTGH, *inputs),
                          what="tree kernel vs reference")
  text_only = fn(q, k, v, pending.k_BTGH, pending.v_BTGH,
                 *inputs._replace(extra_BTX=jnp.full_like(inputs.extra_BTX, -1)))
  assert np.max(np.abs(np.asarray(text_only)[:, 1:] - np.asarray(want)[:, 1:])) > 0.1


@needs_kernel
def test_tree_node_attention_equals_the_chain_of_its_path_bit_for_bit():
  """Node 4 (depth 3) of the tree attends exactly as the last query of a
  causal pass over its path (root, node 0, node 2, node 4) does: a tree's
  verify pass agrees with the plain steps along an accepted path, bit for bit."""
  q, k, v, positions, _, pending, inputs, length = _tree_case(seed=4)
  tree_out = np.asarray(jax.jit(cpu_attention.decode_attention)(
      q, k, v, pending.k_BTGH, pending.v_BTGH, *inputs))
  path = jnp.asarray([0, 1, 3, 5])
  chain_pos = length[:, None] - 1 + jnp.arange(4)[None, :]
  chain_inputs = transformer.kernel_inputs(chain_pos, chain_pos, k.shape[1],
                                           *transformer.pending_slots(chain_pos, k.shape[1]))
  chain_out = np.asarray(jax.jit(cpu_attention.decode_attention)(
      jnp.asarray(q)[:, path], k, v, pending.k_BTGH[:, path], pending.v_BTGH[:, path],
      *chain_inputs))
  np.testing.assert_array_equal(tree_out[:, 5], chain_out[:, 3])
  np.testing.assert_array_equal(tree_out[:, 0], chain_out[:, 0])


@needs_kernel
@pytest.mark.parametrize("case", ["causal", "tree"])
def test_attention_kernel_gradients_are_the_references(case):
  """The custom_vjp hands each of q, the caches and the block its gradient."""
  if case == "causal":
    q, k, v, _, pending, inputs = _attention_case(2, seed=2)
  else:
    q, k, v, _, _, pending, inputs, _ = _tree_case(seed=5)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pending.k_BTGH, pending.v_BTGH)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a, *inputs))))
  got = jax.grad(loss(cpu_attention.decode_attention), argnums=(0, 1, 2, 3, 4))(*args)
  want = jax.grad(loss(cpu_attention.reference), argnums=(0, 1, 2, 3, 4))(*args)
  for a, b in zip(got, want):
    assert_close_in_float32(a, b, what=f"{case} attention gradient")
