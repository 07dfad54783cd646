"""Draft trees (specdec_jax/tree.py, docs/design.md "Draft trees"): the n-gram
and draft-model trees (hand examples), the feature draft's tree against the
target's own top-k, the tree mask, exactness against plain decoding (greedy
and coupled, every drafter, with a missing cache write caught),
rejection-sampling fidelity on trees (a broken residual caught), sampled
candidates (drawn without replacement, verified with their q: the draws, the
rule's output distribution, a broken correction caught), zero recompiles and
refused settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import FEATURE_DRAFT, TARGET, VOCAB, feature_params, init, tiny_config
from specdec_jax import compile_count
from specdec_jax import runtime
from specdec_jax import sampling
from specdec_jax import tree
from specdec_jax.drafters import FeatureDrafter, HybridDrafter, ModelDrafter, NgramDrafter
from specdec_jax.drafters import tree_expansion
from specdec_jax.drafters.base import DraftContext
from specdec_jax.generation import Generator
from specdec_jax.drafters.base import Proposal
from specdec_jax.fidelity import chi_square_test
from specdec_jax.jobs.fidelity import run_fidelity

K, NODES, TOPK, MAX_NEW, BATCH = 4, 8, 3, 24, 3


def branching_prompts(seed: int):
  """Rows whose text ends in an n-gram seen before with three different
  continuations, so the lookup has several branches."""
  rng = np.random.default_rng(seed)
  prompts = []
  for _ in range(BATCH):
    a, b = rng.integers(0, VOCAB, 2).tolist()
    text = []
    for _ in range(3):
      text += [a, b] + rng.integers(0, VOCAB, 3).tolist()
    prompts.append((text + [a, b])[-16:])
  return prompts


TREE_DRAFTERS = {"ngram": NgramDrafter(), "model": ModelDrafter(TARGET),
                 "feature": FeatureDrafter(FEATURE_DRAFT),
                 "ngram+feature": HybridDrafter.wrap(NgramDrafter(), FeatureDrafter(FEATURE_DRAFT))}


@functools.lru_cache(maxsize=None)
def generators(rule: str, drafter: str = "ngram", topk: int = TOPK):
  make = lambda **kw: Generator(TARGET, TREE_DRAFTERS[drafter], k_max=K, rule=rule,
                                max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=BATCH,
                                **kw)
  return (Generator(TARGET, max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=BATCH),
          make(tree_nodes=NODES, tree_topk=topk))


def noisy_copy(target_params, seed: int, scale: float):
  """The target's params plus ``scale`` times another random init: a draft
  model whose guesses are right often, not always."""
  return jax.tree.map(lambda a, b: a + scale * b, target_params, init(TARGET, 100 + seed))


def _context(texts, k, width=32):
  tokens = np.zeros((len(texts), width), np.int32)
  for b, t in enumerate(texts):
    tokens[b, :len(t)] = t
  return DraftContext(tokens_BS=jnp.asarray(tokens),
                      length_B=jnp.asarray([len(t) for t in texts], jnp.int32),
                      keys_B2=jnp.zeros((len(texts), 2), jnp.uint32),
                      sampling=sampling.SamplingParams.create(0.0, 0, 1.0),
                      max_k_B=jnp.full((len(texts),), k, jnp.int32),
                      min_confidence=jnp.float32(0.0))


def test_ngram_tree_hand_example():
  # "5 6" was followed by 7 .., by 1 .. and by 3 ..: three branches, scored
  # as the chain lookup scores (continuation length capped at k, then
  # recency), laid out best first until the 7 nodes are used.
  text = [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6, 3, 4, 5, 6]
  proposal, _ = NgramDrafter(max_n=2, min_n=2).propose_tree(
      {}, (), _context([text], 3), 3, 7, 3, greedy=True, purpose=0)
  assert np.asarray(proposal.draft_BK)[0].tolist() == [3, 4, 5, 1, 2, 5, 7]
  assert np.asarray(proposal.parent_BK)[0].tolist() == [-1, 0, 1, -1, 3, 4, -1]
  assert np.asarray(proposal.depth_BK)[0].tolist() == [1, 2, 3, 1, 2, 3, 1]
  assert int(proposal.num_proposed_B[0]) == 7
  # Its first branch is the chain lookup's draft.
  chain, _, _ = NgramDrafter(max_n=2, min_n=2).lookup(_context([text], 3), 3)
  assert np.asarray(chain)[0].tolist() == [3, 4, 5]
  # The same first token twice is one branch; a row's k_b caps the depth.
  ctx = _context([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6]], 3)
  ctx = ctx.replace(max_k_B=jnp.asarray([2], jnp.int32))
  proposal, _ = NgramDrafter(max_n=2, min_n=2).propose_tree({}, (), ctx, 3, 6, 3,
                                                            greedy=True, purpose=0)
  assert int(proposal.num_proposed_B[0]) == 2
  assert np.asarray(proposal.draft_BK)[0, :2].tolist() == [7, 9]
  # The mask: node 2 sees itself and its ancestors 0, 1; node 3 only itself.
  anc = np.asarray(tree.ancestors(jnp.asarray([[-1, 0, 1, -1, 3, -1]]), 3))[0]
  assert anc[:, 2].tolist() == [True, True, True, False, False, False]
  assert anc[:, 3].tolist() == [False, False, False, True, False, False]
  assert anc[:, 4].tolist() == [False, False, False, True, True, False]


def test_model_tree_hand_example():
  # Root: p(1) = .6, p(2) = .3; after 1: p(3) = .9, p(4) = .05; after 2:
  # p(3) = .5, p(4) = .4. Scores (path probabilities): 1 .6, 1-3 .54, 2 .3,
  # 2-3 .15, 2-4 .12, 1-4 .03. The 4 best, laid out by depth.
  after = jnp.log(jnp.asarray([[.01, .01, .01, .01, .01],
                               [.01, .02, .02, .9, .05],
                               [.04, .03, .03, .5, .4]] + [[.2] * 5] * 2))

  def advance(state, tokens_BT, positions_BT, slots_BT, visible_BTS, parent_slot_BT):
    # The state records what the frontier was fed (one depth here: k = 2).
    del state
    return after[tokens_BT], (positions_BT, slots_BT, visible_BTS, parent_slot_BT)

  ctx = _context([[0, 0, 0]], 2, width=16)
  root = jnp.log(jnp.asarray([[.04, .6, .3, .03, .03]]))
  fed = (jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
         jnp.zeros((1, 2, 16), bool), jnp.zeros((1, 2), jnp.int32))
  expand = functools.partial(tree_expansion.expand_tree, root_logits_BV=root, state=fed,
                             advance=advance, num_slots=16, greedy=True)
  proposal, fed = expand(ctx, 2, 4, 2)
  assert np.asarray(proposal.draft_BK)[0].tolist() == [1, 2, 3, 3]
  assert np.asarray(proposal.parent_BK)[0].tolist() == [-1, -1, 0, 1]
  assert np.asarray(proposal.depth_BK)[0].tolist() == [1, 1, 2, 2]
  assert int(proposal.num_proposed_B[0]) == 4
  # The frontier (1, 2) went to position 3 and scratch slots 14, 15, each
  # seeing the committed slots 0-2 and itself.
  positions, slots, visible, parent_slots = (np.asarray(x)[0] for x in fed)
  assert positions.tolist() == [3, 3] and slots.tolist() == [14, 15]
  assert parent_slots.tolist() == [-1, -1]   # children of the root
  assert np.flatnonzero(visible[0]).tolist() == [0, 1, 2, 14]
  assert np.flatnonzero(visible[1]).tolist() == [0, 1, 2, 15]
  # Three nodes drop 2-3; a row's k_b = 1 keeps depth 1 only.
  proposal, _ = expand(ctx, 2, 3, 2)
  assert np.asarray(proposal.draft_BK)[0].tolist() == [1, 2, 3]
  assert np.asarray(proposal.parent_BK)[0].tolist() == [-1, -1, 0]
  proposal, skipped = expand(ctx.replace(max_k_B=jnp.asarray([1], jnp.int32)), 2, 3, 2)
  assert int(proposal.num_proposed_B[0]) == 2
  assert np.asarray(proposal.draft_BK)[0, :2].tolist() == [1, 2]
  # ... and the draft's pass for depth 2 never ran (the state is what went in).
  for went_in, came_out in zip(expand.keywords["state"], skipped):
    np.testing.assert_array_equal(np.asarray(came_out), np.asarray(went_in))


def test_exact_self_draft_chain_tree_accepts_every_node():
  """A draft model identical to the target, one branch per node: each pass
  must accept the whole path (k nodes) until the budget. Fails if a node is
  fed at the wrong position or slot, or sees the wrong keys."""
  plain, trees = generators("rejection", "model", topk=1)
  tp = init(TARGET, 0)
  result = _run(trees, tp, branching_prompts(0), draft_params=tp)
  assert [r.output_ids for r in result.rows] == [
      r.output_ids for r in _run(plain, tp, branching_prompts(0)).rows]
  for row in result.rows:
    assert row.accepted_per_step[:-1] == [K] * (len(row.accepted_per_step) - 1), row


def _run(gen, tp, prompts, temperature=0.0, draft_params=None):
  seeds = [11, 12, 13]
  if draft_params is None and gen.drafter is not None:
    draft_params = {}
  return gen.generate(tp, draft_params, prompts, temperature=temperature, seeds=seeds)


def _draft_params(drafter: str, tp, seed: int):
  if drafter == "model":
    return noisy_copy(tp, seed, 0.05)
  if drafter.endswith("feature"):
    return feature_params(200 + seed, tp)
  return None


@pytest.mark.parametrize("drafter,rule,temperature", [
    ("ngram", "rejection", 0.0), ("ngram", "coupled", 1.0), ("model", "coupled", 1.0),
    ("feature", "rejection", 0.0), ("ngram+feature", "coupled", 1.0)],
    ids=["greedy-ngram", "coupled-ngram", "coupled-model", "greedy-feature",
         "coupled-ngram+feature"])
def test_tree_equals_plain_decoding_and_never_recompiles(drafter, rule, temperature):
  # (Greedy model trees: test_exact_self_draft_chain_tree_accepts_every_node
  # and test_model_tree_hand_example. The feature draft's tree itself:
  # test_feature_draft_tree_children_are_the_drafts_top_k_along_their_path.)
  plain, trees = generators(rule, drafter)
  accepting_steps = 0
  before = None
  for seed in range(4):
    tp = init(TARGET, seed)
    prompts = branching_prompts(seed)
    ref = [r.output_ids for r in _run(plain, tp, prompts, temperature).rows]
    dp = _draft_params(drafter, tp, seed)
    result = _run(trees, tp, prompts, temperature, draft_params=dp)
    assert [r.output_ids for r in result.rows] == ref, f"seed {seed}"
    for row in result.rows:
      assert len(row.accepted_by_slot) == K
      assert all(a <= r for a, r in zip(row.accepted_by_slot, row.reached_by_slot))
      assert max(row.proposed_per_step) <= NODES
      accepting_steps += sum(n >= 1 for n in row.accepted_per_step)
    if seed == 0:
      before = compile_count.loop_compiles()
  assert compile_count.loop_compiles() == before
  assert accepting_steps > 0   # not vacuous: tree nodes were accepted


def test_feature_draft_tree_children_are_the_drafts_top_k_along_their_path():
  """The feature draft's tree, the whole pool kept: every expanded node's
  children must be the draft's own top-k after feeding that node's path one
  token at a time, each with the previous token's estimate g (the chain's
  way, an independent reference). Fails if a node is fed at the wrong
  position or slot, sees the wrong entries, or reads another node's
  feature (a sibling's, the root's) in place of its parent's."""
  tp = init(TARGET, 0)
  dp = feature_params(5, tp, scale=0.5)
  drafter = FeatureDrafter(FEATURE_DRAFT)
  draft = FEATURE_DRAFT
  k, topk = 3, 2
  nodes = topk + (k - 1) * topk * topk      # the whole pool
  prompts = [[5, 9, 2, 7, 1, 4], [3, 8, 8, 1, 6, 2]]
  prompt_BT = jnp.asarray(prompts, jnp.int32)
  positions_BT = jnp.broadcast_to(jnp.arange(6), (2, 6))
  num_slots = 32
  _, hidden_BTD, _ = TARGET.apply_with_hidden(tp, prompt_BT, positions_BT,
                                              TARGET.init_cache(2, num_slots))
  state = drafter.record_features(drafter.init_state(2, num_slots), hidden_BTD, positions_BT)
  state = drafter.prefill(dp, state, prompt_BT, positions_BT)
  ctx = _context(prompts, k, width=num_slots)
  proposal, _ = jax.jit(functools.partial(drafter.propose_tree, k=k, num_nodes=nodes, topk=topk,
                                          greedy=True, purpose=0))(dp, state, ctx)
  draft_BN, parent_BN = np.asarray(proposal.draft_BK), np.asarray(proposal.parent_BK)
  assert np.asarray(proposal.num_proposed_B).tolist() == [nodes, nodes]
  # The reference: the committed block with the target's features, then the
  # path's tokens one by one, each with the estimate g of the one before.
  g_B1D, cache = drafter._resync(dp, state, ctx, k)   # pylint: disable=protected-access
  hidden = jax.jit(draft.hidden)

  def draft_top_k(b, path):
    g, c = g_B1D, cache
    for depth, token in enumerate(path):
      tokens = jnp.full((2, 1), token, jnp.int32)
      g, c = hidden(dp, tokens, g, jnp.full((2, 1), len(prompts[b]) + depth, jnp.int32), c)
    return set(np.argsort(-np.asarray(draft.logits(dp, g)[b, 0]))[:topk].tolist())

  expanded = 0
  for b in range(2):
    def path(j):
      return (path(parent_BN[b, j]) if parent_BN[b, j] >= 0 else []) + [int(draft_BN[b, j])]
    for parent in [-1] + list(range(nodes)):
      children = {int(draft_BN[b, j]) for j in range(nodes) if parent_BN[b, j] == parent}
      if children:
        expanded += 1
        assert children == draft_top_k(b, path(parent) if parent >= 0 else []), (b, parent)
  assert expanded == 2 * (1 + topk + topk)   # the root and topk frontier nodes per depth


def test_hybrid_tree_takes_the_lookups_branches_or_the_drafts_tree_per_row():
  """Row 0 ends in a repeated n-gram: its tree is the lookup's. Row 1 does
  not: its tree is the draft model's (which row 0 does not get)."""
  tp = init(TARGET, 3)
  lookup, model = NgramDrafter(), ModelDrafter(TARGET)
  hybrid = HybridDrafter.wrap(lookup, model)
  texts = [[5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
  k, nodes, topk, num_slots = 3, 6, 2, 32
  ctx = _context(texts, k, width=num_slots)
  prompt_BT = jnp.asarray(texts, jnp.int32)
  positions_BT = jnp.broadcast_to(jnp.arange(11), (2, 11))
  state = hybrid.prefill(tp, hybrid.init_state(2, num_slots), prompt_BT, positions_BT)
  tree_of = lambda drafter, c: jax.jit(functools.partial(
      drafter.propose_tree, k=k, num_nodes=nodes, topk=topk, greedy=True, purpose=0))(
          tp, state, c)[0]
  both, alone_lookup, alone_model = (tree_of(hybrid, ctx), tree_of(lookup, ctx),
                                     tree_of(hybrid.draft, ctx))
  fields = ("draft_BK", "parent_BK", "depth_BK", "num_proposed_B")
  for row, source in ((0, alone_lookup), (1, alone_model)):
    for name in fields:
      assert np.asarray(getattr(both, name))[row].tolist() == np.asarray(
          getattr(source, name))[row].tolist(), (row, name)
  assert int(alone_lookup.num_proposed_B[0]) > 0 and int(alone_model.num_proposed_B[1]) > 0
  # Row 0's tree is not the one the draft model grows there.
  assert int(both.num_proposed_B[0]) == int(alone_lookup.num_proposed_B[0])
  assert np.asarray(both.draft_BK)[0].tolist() != np.asarray(alone_model.draft_BK)[0].tolist()


def test_proposed_depth_is_the_deepest_real_node():
  """What the policies count a tree's accepted nodes out of: its depth, not
  its node count (padding nodes past num_proposed ignored)."""
  proposal = Proposal(draft_BK=jnp.zeros((3, 5), jnp.int32), q_BKV=None,
                      num_proposed_B=jnp.asarray([5, 2, 0], jnp.int32),
                      parent_BK=jnp.asarray([[-1, 0, -1, 2, 3]] * 3, jnp.int32),
                      depth_BK=jnp.asarray([[1, 2, 1, 2, 3]] * 3, jnp.int32))
  assert tree.proposed_depth(proposal).tolist() == [3, 2, 0]


def test_a_missing_path_write_is_caught(monkeypatch):
  """Negative control: without writing the accepted path's keys and values
  into its slots (only the root's), later steps attend stale keys and greedy
  output departs from plain."""
  def root_only(path_BK, length_B, num_nodes, num_slots):
    slots = jnp.full((length_B.shape[0], num_nodes + 1), num_slots, jnp.int32)
    return slots.at[:, 0].set(length_B - 1)

  monkeypatch.setattr(tree, "path_slots", root_only)
  trees = Generator(TARGET, NgramDrafter(), k_max=K, max_prompt_len=16,
                    max_new_tokens=MAX_NEW, batch_size=BATCH, tree_nodes=NODES, tree_topk=TOPK)
  plain = generators("rejection")[0]
  differs = 0
  for seed in range(4):
    tp = init(TARGET, seed)
    prompts = branching_prompts(seed)
    ref = [r.output_ids for r in _run(plain, tp, prompts).rows]
    differs += [r.output_ids for r in _run(trees, tp, prompts).rows] != ref
  assert differs > 0


class ChainOnlyDrafter(NgramDrafter):
  """A drafter without ``propose_tree`` (every built-in drafter has one)."""
  builds_trees = False


@pytest.mark.parametrize("change,match", [
    (dict(tree_nodes=3), "tree_nodes=3 is below k=4"),
    (dict(tree_topk=0), "tree_topk=0"),
    (dict(tree_topk=9), r"tree_topk=9 must be an int in \[1, tree_nodes=8\]"),
    (dict(rule="typical"), "rule='typical'"),
    (dict(policy="adaptive"), "policy=fixed or policy=auto"),
    (dict(drafter=ChainOnlyDrafter()), "does not build draft trees"),
    (dict(verify_widths=(1, 9)), "sets the verify widths"),
    (dict(tree_candidates="random"), "tree_candidates='random'"),
    (dict(tree_candidates="sampled"), "'ngram' drafter has no draft distribution"),
    (dict(tree_candidates="sampled", drafter=ModelDrafter(TARGET), rule="coupled"),
     "verified with rule=rejection"),
])
def test_bad_tree_settings_are_refused_before_compiling(change, match):
  settings = dict(drafter=NgramDrafter(), k_max=K, max_prompt_len=16, tree_nodes=NODES,
                  tree_topk=TOPK)
  settings.update(change)
  before = compile_count.count("")
  with pytest.raises(ValueError, match=match):
    Generator(TARGET, settings.pop("drafter"), **settings)
  assert compile_count.count("") == before


@pytest.mark.parametrize("changes,match", [
    (dict(tree_nodes=2, k=4, policy="fixed"), "config.decode.tree_nodes=2 is below k=4"),
    (dict(tree_nodes=8, policy="budget"), "policy=fixed or policy=auto"),
    ({"tree_nodes": 8, "drafter": "ngram+model", "decode.tree_candidates": "sampled"},
     "config.decode.tree_candidates='sampled': the 'ngram\\+model' drafter has no draft"),
])
def test_bad_tree_config_is_one_line_error(changes, match):
  with pytest.raises(ValueError, match=match):
    runtime.validate_config(tiny_config(**changes))


def _broken_recursive_rejection(p_BV, draft_BN, child_BN, q_BNV, keys_B2, position_B, vocab):
  """The correction ignores the rejected siblings: after every child is
  rejected, the token is drawn from p instead of the residual."""
  hit_BN, _, mass_B = ORIGINAL_REJECTION(p_BV, draft_BN, child_BN, q_BNV, keys_B2, position_B,
                                         vocab)
  return hit_BN, p_BV, mass_B


ORIGINAL_REJECTION = tree._recursive_rejection
TREE_FIDELITY = dict(drafter="ngram", rule="rejection", temperature=1.0, k=2, policy="fixed",
                     tree_nodes=6, tree_topk=3,
                     **{"fidelity.prompt": (0, 1, 2, 0, 1, 3, 0, 1, 4, 0, 1),
                        "fidelity.num_samples": 10000})


@pytest.mark.slow
def test_tree_rejection_preserves_distribution():
  # Draft-model trees (the fidelity job's noisy copy of the target as the
  # draft: the top-3 children of the top-3 nodes, siblings at every depth;
  # 6,000 samples, ~60 per outcome). The n-gram trees' candidates are as
  # deterministic and go through the same walk, with siblings at depth 1
  # only; they are checked against plain decoding (greedy, coupled) above.
  for drafter, samples in (("model", 6000),):
    config = tiny_config(**{**TREE_FIDELITY, "drafter": drafter,
                            "fidelity.num_samples": samples})
    stats = run_fidelity(config, log=lambda *a: None)
    assert stats["passed"] and stats["p_value"] > 1e-3, (drafter, stats)
    assert stats["impossible_samples"] == 0
    # Paths accepted two deep (k = 2: each such step then drew a bonus
    # token) and drafts rejected.
    assert stats["steps_accepting_2_or_more"] > 0.02 * stats["n_samples"], (drafter, stats)
    assert stats["accepted"] < stats["proposed"], (drafter, stats)
  # The broken residual is caught by the family test below (one-hot q).


# Sampled candidates (tree_candidates="sampled"): Sequoia's draws without
# replacement, verified with the draft's q.

def _family(p_V, q_V, topk: int, rows: int, sampled: bool = True):
  """``rows`` independent trials of one family: the root's ``topk`` children
  drawn from q without replacement (the expansion's draw; ``sampled=False``:
  q's top-k, verified with one-hot q), then ``tree.accept`` against the
  target p at depth 1. Returns the token each row emits: the accepted
  child, else the correction."""
  vocab = len(p_V)
  draw_keys = jax.random.split(jax.random.PRNGKey(1), rows)[:, None]
  q_BTV = jnp.broadcast_to(jnp.asarray(q_V, jnp.float32), (rows, topk, vocab))
  if sampled:
    token_B1T, _ = tree_expansion._draws_without_replacement(   # pylint: disable=protected-access
        q_BTV[:, :1], draw_keys, topk)
  else:
    token_B1T = jnp.broadcast_to(jnp.argsort(-jnp.asarray(q_V))[:topk], (rows, 1, topk))
  proposal = Proposal(
      draft_BK=token_B1T[:, 0].astype(jnp.int32),
      q_BKV=q_BTV if sampled else None,
      num_proposed_B=jnp.full((rows,), topk, jnp.int32),
      parent_BK=jnp.full((rows, topk), tree.ROOT, jnp.int32),
      depth_BK=jnp.ones((rows, topk), jnp.int32))
  logits_BWV = jnp.broadcast_to(jnp.log(jnp.asarray(p_V, jnp.float32)), (rows, topk + 1, vocab))
  accept_keys = jax.random.split(jax.random.PRNGKey(2), rows)
  n_B, x_B, tokens_BK, *_ = jax.jit(functools.partial(
      tree.accept, depth_max=1, greedy=False, rule="rejection",
      sampling_params=sampling.SamplingParams.create(1.0, 0, 1.0)))(
          logits_BWV, proposal, accept_keys, jnp.full((rows,), 5, jnp.int32))
  return np.where(np.asarray(n_B) == 1, np.asarray(tokens_BK)[:, 0], np.asarray(x_B))


# A draft that puts most of its mass where the target puts little: the
# without-replacement correction matters (the second draw is far from q).
FAMILY_P = (0.05, 0.30, 0.25, 0.20, 0.15, 0.05)
FAMILY_Q = (0.60, 0.05, 0.10, 0.05, 0.15, 0.05)


def _family_fit(rows=20000, sampled=True):
  emitted = _family(FAMILY_P, FAMILY_Q, 3, rows, sampled)
  return chi_square_test([(int(t),) for t in emitted],
                         {(i,): p for i, p in enumerate(FAMILY_P)})


def test_sampled_siblings_emit_the_target_distribution_and_broken_rules_fail(monkeypatch):
  """Three children drawn from q without replacement, verified with q, and
  q's top 3 verified with one-hot q: the emitted token is distributed as p
  (20,000 trials each). Broken rules are caught at the same seeds: testing
  every sibling against q itself (no without-replacement correction), and
  drawing the correction from p instead of the residual the rejections
  left (with either kind of candidate)."""
  for sampled in (True, False):
    fit = _family_fit(sampled=sampled)
    assert fit["p_value"] > 1e-3 and fit["tv_distance"] < 0.02, (sampled, fit)
  broken_cases = ((_sequoia_without_correction, True), (_broken_recursive_rejection, True),
                  (_broken_recursive_rejection, False))
  for broken, sampled in broken_cases:
    monkeypatch.setattr(tree, "_recursive_rejection", broken)
    bad = _family_fit(sampled=sampled)
    assert bad["p_value"] < 1e-6 and bad["tv_distance"] > 0.03, (broken.__name__, sampled, bad)


def _sequoia_without_correction(p_BV, draft_BN, child_BN, q_BNV, keys_B2, position_B, vocab):
  """A broken rule: every sibling tested against q itself, not q without the
  earlier draws (the residual update kept)."""
  del vocab
  batch, n = draft_BN.shape
  r_BV, done_B, hit = p_BV, jnp.zeros((batch,), bool), []
  for j in range(n):
    t_B = draft_BN[:, j]
    r_t_B = jnp.take_along_axis(r_BV, t_B[:, None], axis=1)[:, 0]
    q_t_B = jnp.take_along_axis(q_BNV[:, j], t_B[:, None], axis=1)[:, 0]
    r_sum_B = jnp.sum(r_BV, axis=-1)
    u_B = sampling.uniform(sampling.position_keys(keys_B2, position_B,
                                                  tree.SIBLING_PURPOSE_BASE + j))
    ok_B = child_BN[:, j] & ~done_B & (u_B * q_t_B * r_sum_B < r_t_B)
    hit.append(ok_B)
    done_B = done_B | ok_B
    r_BV = jnp.where(child_BN[:, j:j + 1], jnp.maximum(r_BV / r_sum_B[:, None] - q_BNV[:, j], 0),
                     r_BV)
  return jnp.stack(hit, axis=1), r_BV, jnp.zeros((batch,))


def test_sampled_draws_are_without_replacement_in_q_proportion():
  """The expansion's draw: ``topk`` distinct tokens whose first is
  distributed as q and whose second as q without the first, renormalised
  (checked against the enumerated law over 20,000 draws)."""
  q = np.asarray(FAMILY_Q)
  rows = 20000
  keys = jax.random.split(jax.random.PRNGKey(3), rows)[:, None]
  token_B1T, lq_B1T = tree_expansion._draws_without_replacement(   # pylint: disable=protected-access
      jnp.broadcast_to(jnp.asarray(q, jnp.float32), (rows, 1, len(q))), keys, 3)
  draws = np.asarray(token_B1T)[:, 0]
  assert all(len(set(row)) == 3 for row in draws[:200].tolist())
  np.testing.assert_allclose(np.asarray(lq_B1T)[:, 0], np.log(q)[draws], rtol=1e-6)
  pairs = {(a, b): q[a] * q[b] / (1 - q[a]) for a in range(len(q)) for b in range(len(q))
           if a != b}
  fit = chi_square_test([tuple(r[:2]) for r in draws.tolist()], pairs)
  assert fit["p_value"] > 1e-3 and fit["impossible_samples"] == 0, fit


def test_sampled_tree_shape_keeps_static_counts_and_draw_order():
  """A model-draft sampled tree: each depth holds its static count
  (``sampled_depth_counts``); every node carries its parent's warped q,
  checked against the draft run on the prompt plus the parent's path; and
  each family is the first draws from that q with its depth's keys, in
  draw order."""
  tp = init(TARGET, 0)
  dp = noisy_copy(tp, 0, 0.3)
  drafter = ModelDrafter(TARGET)
  k, nodes, topk = 3, 6, 3
  prompts = [[5, 9, 2, 7, 1, 4], [3, 8, 8, 1, 6, 2]]
  num_slots = 32
  prompt_BT = jnp.asarray(prompts, jnp.int32)
  state = drafter.prefill(dp, drafter.init_state(2, num_slots), prompt_BT,
                          jnp.broadcast_to(jnp.arange(6), (2, 6)))
  ctx = _context(prompts, k, width=num_slots).replace(
      sampling=sampling.SamplingParams.create(1.0, 0, 1.0),
      keys_B2=jnp.asarray([[0, 7], [0, 8]], jnp.uint32))
  proposal, _ = jax.jit(functools.partial(
      drafter.propose_tree, k=k, num_nodes=nodes, topk=topk, greedy=False, purpose=1,
      sampled=True))(dp, state, ctx)
  counts = tree_expansion.sampled_depth_counts(nodes, topk, k)
  assert sum(counts) == nodes and counts[0] < topk   # depth 1 is not simply the top-k
  depth_BN, parent_BN = np.asarray(proposal.depth_BK), np.asarray(proposal.parent_BK)
  draft_BN = np.asarray(proposal.draft_BK)
  q_BNV = np.asarray(proposal.q_BKV)
  apply = jax.jit(TARGET.apply)

  def draft_q(b, path):
    """The reference: the draft's warped q after the prompt and the path."""
    tokens = prompts[b] + path
    logits = apply(dp, jnp.asarray([tokens], jnp.int32), jnp.arange(len(tokens))[None],
                   TARGET.init_cache(1, num_slots))[0][0, -1]
    return np.asarray(sampling.warp(logits, ctx.sampling, sampled=True))

  def draws(q_V, depth, b):
    """The first draws from q_V with the keys of each fed node of the depth."""
    keys = tree_expansion._candidate_keys(   # pylint: disable=protected-access
        ctx, ctx.length_B + depth, depth, topk)[b]
    return [np.asarray(tree_expansion._draws_without_replacement(   # pylint: disable=protected-access
        jnp.asarray(q_V)[None, None], keys[t][None, None], topk)[0])[0, 0].tolist()
            for t in range(topk)]

  families = 0
  for b in range(2):
    assert [int(np.sum(depth_BN[b] == d)) for d in range(1, k + 1)] == list(counts)

    def path(j):
      return (path(parent_BN[b, j]) if parent_BN[b, j] >= 0 else []) + [int(draft_BN[b, j])]
    for parent in [tree.ROOT] + list(range(nodes)):
      family = [j for j in range(nodes) if parent_BN[b, j] == parent]
      if not family:
        continue
      families += 1
      depth = 0 if parent == tree.ROOT else int(depth_BN[b, parent])
      q_V = draft_q(b, path(parent) if parent >= 0 else [])
      for j in family:
        np.testing.assert_allclose(q_BNV[b, j], q_V, atol=1e-5)
      tokens = [int(draft_BN[b, j]) for j in family]
      candidates = draws(q_V, depth, b)[:1] if depth == 0 else draws(q_V, depth, b)
      assert any(tokens == c[:len(tokens)] for c in candidates), (b, parent, tokens, candidates)
  assert families >= 2 * (1 + 2)   # the root's family and families below depth 1


def test_sampled_tree_generator_is_plain_greedy_at_temperature_zero_and_never_recompiles():
  """A greedy run of a sampled-tree Generator is plain greedy decoding,
  token for token. At temperature 1, other seeds, draft params and
  temperatures reuse the compiled loop."""
  plain = generators("rejection")[0]
  trees = Generator(TARGET, ModelDrafter(TARGET), k_max=2, rule="rejection",
                    max_prompt_len=16, max_new_tokens=MAX_NEW, batch_size=BATCH,
                    tree_nodes=4, tree_topk=2, tree_candidates="sampled")
  tp = init(TARGET, 1)
  prompts = branching_prompts(1)
  ref = [r.output_ids for r in _run(plain, tp, prompts).rows]
  result = _run(trees, tp, prompts, draft_params=noisy_copy(tp, 1, 0.05))
  assert [r.output_ids for r in result.rows] == ref
  assert sum(sum(r.accepted_per_step) for r in result.rows) > 0
  before = None
  for seed, temperature in ((1, 1.0), (2, 0.7)):
    result = trees.generate(tp, noisy_copy(tp, seed, 0.05), prompts, temperature=temperature,
                            seeds=[seed, seed + 10, seed + 20])
    assert sum(sum(r.accepted_per_step) for r in result.rows) > 0
    if before is None:
      before = compile_count.loop_compiles()
  assert compile_count.loop_compiles() == before


SAMPLED_FIDELITY = {**TREE_FIDELITY, "drafter": "model", "decode.tree_candidates": "sampled",
                    "k": 2, "tree_nodes": 4, "tree_topk": 2}


@pytest.mark.slow
def test_sampled_tree_fidelity_with_depth_two_acceptances_and_an_own_probability_rerank_fails(
    monkeypatch):
  """The whole loop with sampled model-draft trees (depth 2, 4 nodes: two
  children at depth 1, two siblings at depth 2; the feature draft's
  expansion is the same code with another ``advance``): the 3-token
  continuations match the enumerated target distribution, with paths
  accepted two deep. Caught: a tree that keeps children by their own draft
  probability (EAGLE-2's rerank over the draws). (Broken rules:
  test_sampled_siblings_emit_the_target_distribution_and_broken_rules_fail.)"""
  for drafter, samples in (("model", 3000),):
    stats = run_fidelity(tiny_config(**{**SAMPLED_FIDELITY, "drafter": drafter,
                                        "fidelity.num_samples": samples}), log=lambda *a: None)
    assert stats["passed"] and stats["p_value"] > 1e-3, (drafter, stats)
    assert stats["impossible_samples"] == 0
    assert stats["steps_accepting_2_or_more"] > 0.02 * stats["n_samples"], (drafter, stats)
    assert stats["accepted"] < stats["proposed"], (drafter, stats)
  monkeypatch.setattr(tree_expansion, "_sampled_selection_score",
                      lambda parent_score_BT, child_lq_BTC: parent_score_BT[:, :, None]
                      + child_lq_BTC)
  reranked = run_fidelity(tiny_config(**{**SAMPLED_FIDELITY, "fidelity.num_samples": 1500}),
                          log=lambda *a: None)
  assert not reranked["passed"] and reranked["p_value"] < 1e-6, reranked
