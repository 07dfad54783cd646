"""Sharded and multi-host generation on 8 simulated CPU devices.

JAX fixes the device count when it initialises, and pytest imports other test
modules (which initialise JAX with one device) first, so every check runs in
a subprocess with ``--xla_force_host_platform_device_count=8`` and reports
JSON back.

The test model divides over every mesh: 8 query heads, 4 KV heads (sharded on
model=4, replicated with a log line on model=8), ffn 128, vocab 264.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data=8,model=1", "data=2,model=4", "data=1,model=8")
CASES = ("plain", "model", "feature_sampled", "ngram+model_sampled", "model_tree_sampled")
# The greedy model-draft loop (target and draft) runs on every mesh; plain
# decoding and the sampled feature, hybrid and draft-tree loops (the lookup,
# the draft model's sampling, the feature draft, the tree's expansion and
# mask, and the rejection rules shard the same arrays) on one mixed mesh.
EVERY_MESH = ("model",)
MIXED_MESH = "data=2,model=4"


def cases_on(mesh):
  return [c for c in CASES if c in EVERY_MESH or mesh == MIXED_MESH]

PRELUDE = textwrap.dedent("""
    import json, logging, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from specdec_jax import compile_count, sharding
    from specdec_jax.drafters import FeatureDrafter, HybridDrafter, ModelDrafter, NgramDrafter
    from specdec_jax.models.feature_draft import FeatureDraft
    from specdec_jax.generation import Generator
    from specdec_jax.models.config import ModelConfig
    from specdec_jax.models.transformer import Transformer
    compile_count.install()
    TCFG = ModelConfig(vocab_size=264, num_layers=2, d_model=64, num_heads=8,
                       num_kv_heads=4, head_dim=8, ffn_dim=128)
    DCFG = ModelConfig(vocab_size=264, num_layers=1, d_model=32, num_heads=2,
                       num_kv_heads=1, head_dim=16, ffn_dim=64)
    def report(obj):
      print("REPORT " + json.dumps(obj))
""")


def run_python(body: str, devices: int = 8, timeout: int = 900) -> dict:
  """Runs PRELUDE + body with ``devices`` CPU devices; returns its REPORT."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
  assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
  return json.loads(lines[-1][len("REPORT "):])


EQUIVALENCE = """
    # Records the shardings GSPMD gives arrays *inside* the compiled loop.
    seen = {}
    def record(name):
      def callback(s):
        seen.setdefault(name, []).append(s)
      return callback

    class Inspecting(Transformer):
      def apply_with_hidden(self, params, tokens_BT, positions_BT, cache, full_vocab=True,
                            *args):
        tag = "target" if self.cfg == TCFG else "draft"
        jax.debug.inspect_array_sharding(cache.k_LBSGH, callback=record(tag + "_cache"))
        jax.debug.inspect_array_sharding(tokens_BT, callback=record(tag + "_tokens"))
        if tag == "target":
          q = params["layers"]["attn"]["q"]["kernel"]
          jax.debug.inspect_array_sharding(q, callback=record("target_q"))
        return super().apply_with_hidden(params, tokens_BT, positions_BT, cache, full_vocab,
                                         *args)

      def forward(self, params, tokens_BT, positions_BT, cache, *args, **kwargs):
        # The verify pass inside the width switch (it only reads the cache).
        if self.cfg == TCFG:
          jax.debug.inspect_array_sharding(cache.k_LBSGH, callback=record("target_cache"))
        return super().forward(params, tokens_BT, positions_BT, cache, *args, **kwargs)

    target, draft = Inspecting(TCFG), Inspecting(DCFG)
    tp = target.init_params(jax.random.PRNGKey(0))
    dp = draft.init_params(jax.random.PRNGKey(1))
    feature_draft = FeatureDraft(TCFG.__class__(**{**TCFG.__dict__, "num_layers": 1,
                                                   "tie_embeddings": False}))
    fp = dict(feature_draft.init_params(jax.random.PRNGKey(2), init_scale=0.2), embed=tp["embed"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 264, size=int(rng.integers(3, 30))).tolist() for _ in range(8)]
    # Repetitive prompts so that the n-gram drafter proposes and gets accepted.
    prompts[1] = [5, 6, 7, 8] * 6
    prompts[2] = [9, 10, 11] * 9
    TREE = dict(tree_nodes=6, tree_topk=2)
    CASES = {"plain": (None, 0, 0.0, {}), "model": (ModelDrafter(draft), 4, 0.0, {}),
             "feature_sampled": (FeatureDrafter(feature_draft), 4, 1.0, {}),
             "ngram+model_sampled": (HybridDrafter.wrap(NgramDrafter(), ModelDrafter(draft)), 4, 1.0,
                                     {}),
             "model_tree_sampled": (ModelDrafter(draft), 3, 1.0, TREE)}

    def generator(case, shardings):
      drafter, k, _, tree = CASES[case]
      return Generator(target, drafter, k_max=k, rule="rejection", max_prompt_len=32,
                       max_new_tokens=12, batch_size=8, shardings=shardings, **tree)

    def outputs(gen, case, seeds):
      _, _, temperature, _ = CASES[case]
      result = gen.generate(tp, fp if case.startswith("feature") else dp, prompts,
                            temperature=temperature, seeds=seeds)
      return [r.output_ids for r in result.rows], sum(sum(r.accepted_per_step) for r in result.rows)

    reference = {}
    for case in CASES:
      gen = generator(case, None)
      reference[case] = outputs(gen, case, 100), outputs(gen, case, 200)

    out = {"meshes": {}}
    for mesh_spec in MESHES:
      mesh = sharding.make_mesh(mesh_spec)
      model_size = mesh.shape["model"]
      shardings = sharding.GenerationShardings.create(mesh, TCFG, DCFG)
      kv_axis = "model" if TCFG.num_kv_heads % model_size == 0 else None
      res = {"same": {}, "accepted": {}, "compiles": {}}
      gens = {}
      for case in CASES_ON[mesh_spec]:
        seen.clear()
        gen = gens[case] = generator(case, shardings)
        before = compile_count.loop_compiles()
        first, second = outputs(gen, case, 100), outputs(gen, case, 200)
        res["compiles"][case] = compile_count.loop_compiles() - before
        res["same"][case] = [first == reference[case][0], second == reference[case][1]]
        res["accepted"][case] = first[1]
        want = {"target_cache": P(None, "data", None, kv_axis, None),
                "draft_cache": P(None, "data", None, None, None),
                "target_tokens": P("data", None), "draft_tokens": P("data", None),
                "target_q": P(None, None, "model")}
        inside = {}
        for name, specs in seen.items():
          ndim = len(want[name])
          inside[name] = all(s.is_equivalent_to(NamedSharding(mesh, want[name]), ndim)
                             for s in specs)
        res.setdefault("inside", {})[case] = inside

      # Outside the loop: placed params, the prefill state's caches, the
      # output (the model case's generator: nothing new compiles but prefill).
      gen = gens["model"]
      fn = gen.compiled(compile_count.LOOP, True)
      req = gen.request(prompts, max_new_tokens=12, seeds=list(range(8)), k=4)
      run = req.run
      before = compile_count.loop_compiles()
      out_state = fn(tp, dp, req.requests, run)
      res["compiles_outside"] = compile_count.loop_compiles() - before
      placed_tp = fn.place((tp, dp, req.requests, run))[0]
      state = gen.compiled("prefill", True)(tp, dp, req.requests, run)
      spec = lambda a: [str(x) for x in a.sharding.spec]
      shard_shape = lambda a: list(a.addressable_shards[0].data.shape)
      layers = placed_tp["layers"]
      res["params"] = {
          "embed": spec(placed_tp["embed"]["embedding"]),
          "q": spec(layers["attn"]["q"]["kernel"]), "k": spec(layers["attn"]["k"]["kernel"]),
          "o": spec(layers["attn"]["o"]["kernel"]), "gate": spec(layers["mlp"]["gate"]["kernel"]),
          "down": spec(layers["mlp"]["down"]["kernel"]),
          "norm": spec(layers["attn_norm"]["scale"]),
          "final_norm": spec(placed_tp["final_norm"]["scale"]),
          "q_shard": shard_shape(layers["attn"]["q"]["kernel"]),
          "prompt": spec(fn.place((tp, dp, req.requests, run))[2].prompt_BT),
      }
      res["state"] = {
          "target_cache": spec(state.target_cache.k_LBSGH),
          "target_cache_shard": shard_shape(state.target_cache.k_LBSGH),
          "draft_cache": spec(state.drafter_state.k_LBSGH),
          "tokens": spec(out_state.tokens_BS), "length": spec(out_state.length_B),
          "keys": spec(state.keys_B2), "accepted_TB": spec(out_state.stats.accepted_TB),
          "output_tokens": spec(out_state.tokens_BS),
      }
      out["meshes"][mesh_spec] = res
    report(out)
"""


@pytest.fixture(scope="session")
def report(tmp_path_factory):
  """One subprocess (one JAX start with 8 devices) runs the equivalence,
  error and loader scripts."""
  folder = str(tmp_path_factory.mktemp("loaders"))
  plan = {mesh: cases_on(mesh) for mesh in MESHES}
  body = (f"MESHES = {MESHES!r}\nCASES_ON = {plan!r}\nall_reports = {{}}\n"
          + "def report(obj, name):\n  all_reports[name] = obj\n"
          # (errors first: the kv-heads log line is logged once per process)
          + textwrap.dedent(ERRORS).replace("report(out)", "report(out, 'errors')")
          + textwrap.dedent(LOADERS).replace("sys.argv[1]", repr(folder))
          .replace("report(out)", "report(out, 'loaders')")
          + textwrap.dedent(EQUIVALENCE).replace("report(out)", "report(out, 'equivalence')")
          + "print('REPORT ' + json.dumps(all_reports))\n")
  return run_python(body)


@pytest.fixture(scope="session")
def equivalence(report):
  return report["equivalence"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh,case", [(m, c) for m in MESHES for c in cases_on(m)])
def test_sharded_outputs_equal_single_device(equivalence, mesh, case):
  res = equivalence["meshes"][mesh]
  assert res["same"][case] == [True, True]
  if case != "plain":
    assert res["accepted"][case] > 0  # the speculative path really ran


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_generate_compiles_once_per_mesh(equivalence, mesh):
  res = equivalence["meshes"][mesh]
  assert res["compiles"] == {case: 1 for case in cases_on(mesh)}
  assert res["compiles_outside"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_arrays_sharded_as_the_rules_say(equivalence, mesh):
  res = equivalence["meshes"][mesh]
  model = int(mesh.split("model=")[1])
  kv = "model" if 4 % model == 0 else "None"
  assert res["params"] == {
      "embed": ["model", "None"], "q": ["None", "None", "model"],
      "k": ["None", "None", kv], "o": ["None", "model", "None"],
      "gate": ["None", "None", "model"], "down": ["None", "model", "None"],
      "norm": ["None", "None"], "final_norm": ["None"],
      "q_shard": [2, 64, 64 // model], "prompt": ["data", "None"]}
  data = int(mesh.split(",")[0].split("=")[1])
  assert res["state"] == {
      "target_cache": ["None", "data", "None", kv, "None"],
      "target_cache_shard": [2, 8 // data, 32 + 12 + 4 + 1, 4 // model if kv != "None" else 4, 8],
      "draft_cache": ["None", "data", "None", "None", "None"],
      "tokens": ["data", "None"], "length": ["data"], "keys": ["data", "None"],
      "accepted_TB": ["None", "data"], "output_tokens": ["data", "None"]}
  for case, inside in res["inside"].items():
    assert inside and all(inside.values()), (case, inside)


ERRORS = """
    import io
    out = {}
    def error(fn):
      try:
        fn()
      except ValueError as e:
        return str(e)
      return None
    out["mesh_3"] = error(lambda: sharding.make_mesh("data=3"))
    out["fill"] = error(lambda: sharding.make_mesh("data=-1,model=3"))
    out["unknown_axis"] = error(lambda: sharding.make_mesh("tensor=2"))
    out["rule_axis"] = error(lambda: sharding.parse_rules("heads=tensor"))
    out["rule_name"] = error(lambda: sharding.parse_rules("columns=model"))
    mesh = sharding.make_mesh("data=2,model=4")
    sh = sharding.GenerationShardings.create(mesh, TCFG, DCFG)
    out["batch"] = error(lambda: Generator(Transformer(TCFG), batch_size=3, shardings=sh))
    bad = lambda **kw: ModelConfig(**{**TCFG.__dict__, **kw})
    out["heads"] = error(lambda: sharding.GenerationShardings.create(
        mesh, bad(num_heads=6, num_kv_heads=2)))
    out["mlp"] = error(lambda: sharding.GenerationShardings.create(mesh, bad(ffn_dim=102)))
    out["vocab"] = error(lambda: sharding.GenerationShardings.create(mesh, bad(vocab_size=259)))
    out["draft_rules"] = error(lambda: sharding.GenerationShardings.create(
        mesh, TCFG, DCFG, draft_sharding="rules"))
    stream = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(stream))
    sharding.GenerationShardings.create(sharding.make_mesh("data=1,model=8"), TCFG)
    out["kv_log"] = stream.getvalue()
    out["default_mesh"] = dict(sharding.make_mesh("").shape)
    out["model_only"] = dict(sharding.make_mesh("model=4").shape)
    report(out)
"""


def test_bad_meshes_and_shapes_raise_naming_the_axis(report):
  out = report["errors"]
  assert "'data'" in out["mesh_3"] and "8" in out["mesh_3"]
  assert "'model'" in out["fill"] and "does not divide" in out["fill"]
  assert "unknown mesh axis 'tensor'" in out["unknown_axis"]
  assert "'tensor'" in out["rule_axis"]
  assert "unknown logical axis 'columns'" in out["rule_name"]
  assert "batch_size=3" in out["batch"] and "'data'" in out["batch"]
  assert "num_heads=6" in out["heads"] and "'model'" in out["heads"]
  assert "ffn_dim=102" in out["mlp"] and "'model'" in out["mlp"]
  assert "vocab_size=259" in out["vocab"] and "'model'" in out["vocab"]
  assert out["draft_rules"].startswith("draft: num_heads=2")
  assert "num_kv_heads=4" in out["kv_log"] and "replicated" in out["kv_log"]
  assert out["default_mesh"] == {"data": 8, "model": 1}
  assert out["model_only"] == {"data": 2, "model": 4}


LOADERS = """
    import sys
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    from safetensors.numpy import save_file
    from test_gguf_import import write_gguf
    from specdec_jax.models import checkpoint, gguf_import, hf_import
    folder = sys.argv[1]
    cfg = ModelConfig(**{**TCFG.__dict__, "tie_embeddings": False})
    params = jax.device_get(Transformer(cfg).init_params(jax.random.PRNGKey(0)))
    plan = sharding.Plan.create(sharding.make_mesh("data=2,model=4"), sharding.DEFAULT_RULES,
                                cfg, "target")
    fn = lambda c: sharding.param_shardings(c, plan)
    want = fn(cfg)

    write_gguf(os.path.join(folder, "m.gguf"), cfg, params)
    hf_dir = os.path.join(folder, "hf")
    os.makedirs(hf_dir)
    names = {("attn_norm", "scale"): "input_layernorm.weight",
             ("mlp_norm", "scale"): "post_attention_layernorm.weight",
             ("attn", "q"): "self_attn.q_proj.weight", ("attn", "k"): "self_attn.k_proj.weight",
             ("attn", "v"): "self_attn.v_proj.weight", ("attn", "o"): "self_attn.o_proj.weight",
             ("mlp", "gate"): "mlp.gate_proj.weight", ("mlp", "up"): "mlp.up_proj.weight",
             ("mlp", "down"): "mlp.down_proj.weight"}
    tensors = {"model.embed_tokens.weight": params["embed"]["embedding"],
               "model.norm.weight": params["final_norm"]["scale"],
               "lm_head.weight": params["lm_head"]["kernel"].T}
    for (group, sub), hf_name in names.items():
      stack = params["layers"][group][sub]
      stack = stack["kernel"] if isinstance(stack, dict) else stack
      for i in range(cfg.num_layers):
        w = stack[i] if stack.ndim == 2 else stack[i].T
        tensors[f"model.layers.{i}.{hf_name}"] = np.ascontiguousarray(w)
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
      json.dump(dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=8, vocab_size=264, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False), f)
    checkpoint.save_params(os.path.join(folder, "ckpt"), params, cfg)

    loads = {
        "gguf": lambda f: gguf_import.load_gguf(os.path.join(folder, "m.gguf"), sharding_fn=f)[1],
        "hf": lambda f: hf_import.load_hf_dir(hf_dir, sharding_fn=f)[1],
        "orbax": lambda f: checkpoint.restore_params(os.path.join(folder, "ckpt"), cfg,
                                                     f and f(cfg)),
    }
    out = {}
    for name, load in loads.items():
      plain, sharded = load(None), load(fn)
      same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                          plain, sharded)
      placed = jax.tree.map(
          lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) and all(
              sh.data.shape == s.shard_shape(a.shape) for sh in a.addressable_shards),
          sharded, want)
      out[name] = {"same": all(jax.tree.leaves(same)), "placed": all(jax.tree.leaves(placed)),
                   "single": len(jax.tree.leaves(plain)[0].sharding.device_set)}
    report(out)
"""


def test_loaders_put_params_straight_into_their_shards(report):
  """GGUF, safetensors and orbax loads with a sharding_fn: same values as the
  single-device load, each device holding only its own slice."""
  out = report["loaders"]
  for name in ("gguf", "hf", "orbax"):
    assert out[name] == {"same": True, "placed": True, "single": 1}, name


def _main(workdir, *flags, devices=8, env=None, timeout=300):
  cmd = [sys.executable, "-m", "specdec_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.batch_size=4", "--config.decode.drafter=model",
         "--config.sharding_rules=batch=data,heads=model,kv_heads=model,mlp=model", *flags]
  full_env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                  XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                  f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _outputs(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line)["output_ids"] for line in f]


def test_cli_bad_mesh_is_one_line_error(tmp_path):
  proc = _main(tmp_path, "--config.mesh=data=3")
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert err.strip().splitlines()[-1].startswith("error: config.mesh='data=3'")


@pytest.mark.slow
def test_generate_job_sharded_and_multihost_match_single_device(tmp_path):
  """job=generate via main: one device, a (4, 2) mesh in one process, and the
  same mesh over two processes (jax.distributed, 4 devices each). The two
  references run a fixed K (greedy: the same tokens under any policy); the
  multi-host run takes the default auto policy, whose cost measurement reads
  arrays that span both processes and must agree across them."""
  single = _main(tmp_path / "single", "--config.decode.policy=fixed", devices=1)
  sharded = _main(tmp_path / "sharded", "--config.mesh=data=4,model=2", "--config.decode.policy=fixed")
  for proc in (single, sharded):   # side by side
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:%d" % (20000 + os.getpid() % 20000),
         "SPECDEC_NUM_PROCESSES": "2"}
  procs = [_main(tmp_path / "multi", "--config.mesh=data=4,model=2",
                 "--config.distributed=True", devices=4,
                 env={**env, "SPECDEC_PROCESS_ID": str(i)}) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  assert "--- prompt" in results[0][0] and "--- prompt" not in results[1][0]
  assert "auto policy: measured verify cost" in results[0][0]
  assert "process 1/2 feeds prompts [2, 3]" in results[1][1]
  reference = _outputs(tmp_path / "single")
  assert len(reference) == 4
  assert _outputs(tmp_path / "sharded") == reference
  assert _outputs(tmp_path / "multi") == reference
