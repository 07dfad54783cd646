"""Mesh, logical axis names -> mesh axes, shardings for params, caches, batch.

The mesh has two axes: ``data`` (rows of the batch) and ``model`` (heads,
MLP columns, vocabulary). Every array gets a tuple of *logical* axis names,
one per dimension, and one rule table maps logical names to mesh axes:

  params (from their path in the tree; kernels are [in, out]):
    embed/embedding [vocab, embed]       lm_head/kernel [embed, vocab]
    layers/attn/q/kernel [layers, embed, heads]     (bias [layers, heads])
    layers/attn/{k,v}/kernel [layers, embed, kv_heads]
    layers/attn/o/kernel [layers, heads, embed]
    layers/mlp/{gate,up}/kernel [layers, embed, mlp], down [layers, mlp, embed]
    norms [layers, embed] / final_norm [embed]
  decode state (from the dimension letters that suffix every field name):
    B batch, L layers, S slots, G kv_heads, H head_dim, N heads, V vocab,
    D embed, F mlp, K draft, T tokens, a digit a fixed size (``keys_B2``);
    e.g. the cache ``k_LBSGH`` is [layers, batch, slots, kv_heads, head_dim]
    and ``tokens_BS`` is [batch, slots].

Query heads are fused into the kernels as N*H columns; sharding them over
``model`` needs N % model == 0, so that every shard holds whole heads. KV
heads fall back to replication (logged) when G is not divisible; every other
mapped dimension that does not divide raises ValueError naming the axis.
"""

import dataclasses
import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specdec_jax.models.config import ModelConfig
from specdec_jax.models.transformer import Transformer

AXES = ("data", "model")
DEFAULT_RULES = "batch=data,heads=model,kv_heads=model,mlp=model,vocab=model,embed=none"
DRAFT_SHARDING = ("replicated", "rules")


def check_draft_sharding(value: str) -> None:
  """ValueError unless ``value`` is one of ``DRAFT_SHARDING``."""
  if value not in DRAFT_SHARDING:
    raise ValueError(f"config.draft_sharding={value!r}; expected one of {DRAFT_SHARDING}")
LETTERS = {"B": "batch", "L": "layers", "S": "slots", "G": "kv_heads", "H": "head_dim",
           "N": "heads", "V": "vocab", "D": "embed", "F": "mlp", "K": "draft", "T": "tokens"}
LOGICAL = tuple(LETTERS.values())

_PARAM_AXES = {  # (module, leaf) -> logical axes without the stacked layer axis
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("final_norm", "scale"): ("embed",),
    ("attn_norm", "scale"): ("embed",),
    ("mlp_norm", "scale"): ("embed",),
    ("embed_norm", "scale"): ("embed",), ("feature_norm", "scale"): ("embed",),
    ("q", "kernel"): ("embed", "heads"), ("q", "bias"): ("heads",),
    ("k", "kernel"): ("embed", "kv_heads"), ("k", "bias"): ("kv_heads",),
    ("v", "kernel"): ("embed", "kv_heads"), ("v", "bias"): ("kv_heads",),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"), ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    # a feature draft's fusion of [token embedding, target feature]: [2D, D]
    ("fc", "kernel"): (None, "embed"), ("fc", "bias"): ("embed",),
    ("lm_head", "token_ids"): (None,),   # a restricted head's vocabulary ids
}


# ----- mesh -------------------------------------------------------------------

def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """Axis sizes from ``"data=2,model=4"``; -1 fills, a missing data fills.

  "" puts every device on ``data``. Raises ValueError naming the axis for an
  unknown axis, a bad size, or sizes that do not multiply to num_devices.
  """
  sizes = {"data": -1, "model": 1}
  for part in filter(None, (p.strip() for p in (spec or "").split(","))):
    name, sep, value = part.partition("=")
    name = name.strip()
    if name not in AXES:
      raise ValueError(f"config.mesh={spec!r}: unknown mesh axis {name!r}; expected {AXES}")
    try:
      sizes[name] = int(value) if sep else None
    except ValueError:
      sizes[name] = None
    if sizes[name] is None or sizes[name] == 0 or sizes[name] < -1:
      raise ValueError(f"config.mesh={spec!r}: mesh axis {name!r} needs a size >= 1 "
                       f"or -1 (fill), got {value!r}")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh={spec!r}: only one mesh axis may be -1, got {fill}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  for name in fill:
    if num_devices % fixed:
      other = next(n for n in AXES if n != name)
      raise ValueError(f"config.mesh={spec!r}: mesh axis {other!r} of size {sizes[other]} "
                       f"does not divide the {num_devices} devices")
    sizes[name] = num_devices // fixed
  total = sizes["data"] * sizes["model"]
  if total != num_devices:
    raise ValueError(
        f"config.mesh={spec!r}: mesh axes 'data'={sizes['data']} x "
        f"'model'={sizes['model']} use {total} devices, but {num_devices} are available; "
        "the axes' product must equal the device count")
  return sizes


def make_mesh(spec: str = "", devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "model") mesh with Auto (GSPMD) axis types over ``devices``."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  return jax.make_mesh((sizes["data"], sizes["model"]), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def mesh_from_config(config) -> Mesh | None:
  """The mesh for ``config.mesh``; None (no sharding) for "" on one device."""
  spec = config.get("mesh", "")
  if not spec and jax.device_count() == 1:
    return None
  return make_mesh(spec)


def parse_rules(rules: str | Mapping | Sequence = DEFAULT_RULES) -> dict[str, str | None]:
  """Logical name -> mesh axis (or None), from ``"batch=data,heads=model,..."``.

  Also takes a mapping or (name, axis) pairs. Names not given are replicated.
  """
  if isinstance(rules, str):
    pairs = []
    for part in filter(None, (p.strip() for p in rules.split(","))):
      name, sep, axis = part.partition("=")
      if not sep:
        raise ValueError(f"config.sharding_rules: {part!r} is not 'logical=axis'")
      pairs.append((name.strip(), axis.strip()))
  else:
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  table = {}
  for name, axis in pairs:
    if name not in LOGICAL:
      raise ValueError(f"config.sharding_rules: unknown logical axis {name!r}; "
                       f"expected one of {LOGICAL}")
    axis = None if axis in (None, "", "none", "None") else axis
    if axis is not None and axis not in AXES:
      raise ValueError(f"config.sharding_rules: {name}={axis!r} names an unknown mesh "
                       f"axis; expected one of {AXES} or none")
    table[name] = axis
  return table


# ----- per-model plan ---------------------------------------------------------

def _unit_counts(cfg: ModelConfig | None) -> dict[str, int]:
  """How many indivisible units a logical dim holds (heads, not N*H columns)."""
  if cfg is None:
    return {}
  return {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "mlp": cfg.ffn_dim,
          "vocab": cfg.vocab_size, "embed": cfg.d_model, "layers": cfg.num_layers,
          "head_dim": cfg.head_dim}


@dataclasses.dataclass(frozen=True)
class Plan:
  """Rules resolved for one model on one mesh (divisibility checked)."""

  mesh: Mesh
  rules: dict
  name: str = "model"

  @classmethod
  def create(cls, mesh: Mesh, rules, cfg: ModelConfig | None, name: str = "model",
             replicated: bool = False) -> "Plan":
    """Checks the model's dims against the rules; ValueError naming the axis.

    ``replicated``: params replicated, only ``batch`` sharded (draft default).
    A KV-head fallback to replication is logged (once per mesh and model).
    """
    items = tuple(sorted(parse_rules(rules).items()))
    return cls(mesh=mesh, rules=dict(_resolve(mesh, items, cfg, name, replicated)), name=name)

  def spec(self, logical: Sequence[str | None], where: str = "") -> P:
    """PartitionSpec for one array's logical axes; a mesh axis used once."""
    axes, used = [], {}
    for name in logical:
      axis = self.rules.get(name) if name else None
      if axis is not None and axis in used:
        raise ValueError(f"{self.name}: {where} maps both {used[axis]!r} and {name!r} to "
                         f"mesh axis {axis!r}; a mesh axis can shard one dim per array")
      if axis is not None:
        used[axis] = name
      axes.append(axis)
    return P(*axes)

  def sharding(self, logical, where: str = "") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical, where))

  def check_batch(self, batch_size: int) -> None:
    axis = self.rules.get("batch")
    if axis is not None and batch_size % self.mesh.shape[axis]:
      raise ValueError(f"batch_size={batch_size} is not divisible by mesh axis {axis!r} "
                       f"of size {self.mesh.shape[axis]}; use a multiple of "
                       f"{self.mesh.shape[axis]} or change config.mesh")


@functools.lru_cache(maxsize=64)
def _resolve(mesh: Mesh, items: tuple, cfg: ModelConfig | None, name: str,
             replicated: bool) -> tuple:
  table = dict(items)
  if replicated:
    table = {"batch": table.get("batch")}
  units = _unit_counts(cfg)
  for logical, axis in sorted(table.items()):
    if axis is None or logical not in units or units[logical] % mesh.shape[axis] == 0:
      continue
    size = mesh.shape[axis]
    if logical == "kv_heads":
      logging.warning("sharding: %s: num_kv_heads=%d is not divisible by mesh axis %r of "
                      "size %d: KV heads and the KV cache are replicated over %r", name,
                      units[logical], axis, size, axis)
      table[logical] = None
      continue
    field = {"heads": "num_heads", "mlp": "ffn_dim", "vocab": "vocab_size",
             "embed": "d_model", "layers": "num_layers", "head_dim": "head_dim"}[logical]
    raise ValueError(
        f"{name}: {field}={units[logical]} ({logical}) is not divisible by mesh axis "
        f"{axis!r} of size {size}; change config.mesh or set {logical}=none in "
        "config.sharding_rules")
  if cfg is not None:
    logging.info("sharding: %s on mesh %s: %s", name, dict(mesh.shape), table)
  return tuple(sorted(table.items()))


# ----- logical axes of params and state ---------------------------------------

def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_logical_axes(params) -> Any:
  """Pytree (same structure as params) of logical-axis tuples, from the paths."""
  def axes(path, leaf):
    names = _path_names(path)
    key = names[-2:] if len(names) >= 2 else names
    if tuple(key) not in _PARAM_AXES:
      raise ValueError(f"no logical axes known for param {'/'.join(names)}")
    logical = _PARAM_AXES[tuple(key)]
    if names[0] == "layers":
      logical = ("layers",) + logical
    if len(logical) != np.ndim(leaf):
      raise ValueError(f"param {'/'.join(names)} has shape {np.shape(leaf)}, expected "
                       f"dims {logical}")
    return logical
  return jax.tree_util.tree_map_with_path(axes, params)


def suffix_logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axes from a field name's dimension suffix (``k_LBSGH``)."""
  _, sep, suffix = name.rpartition("_")
  if not sep or len(suffix) != ndim or any(c not in LETTERS and not c.isdigit()
                                           for c in suffix):
    return (None,) * ndim
  return tuple(LETTERS.get(c) for c in suffix)  # digits (keys_B2): fixed, unsharded


def param_shardings(params_or_cfg, plan: Plan) -> Any:
  """NamedSharding pytree for params (or for the params a ModelConfig implies)."""
  params = params_or_cfg
  if isinstance(params_or_cfg, ModelConfig):
    params = expected_params(params_or_cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, axes: plan.sharding(axes, "/".join(_path_names(path))),
      param_logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))


def expected_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStruct pytree of the params for ``cfg``."""
  return jax.eval_shape(lambda: Transformer(cfg).init_params(jax.random.PRNGKey(0)))


def place(tree, shardings) -> Any:
  """Puts host (numpy) or device arrays into their shardings, shard by shard.

  ``jax.make_array_from_callback`` copies only each device's slice from host
  memory, so no full copy lands on one device first, and on several hosts
  each process fills only its own devices. Arrays already placed are kept.
  """
  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree, shardings)


# ----- generation -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerationShardings:
  """Shardings for one Generator: target and draft plans on one mesh."""

  mesh: Mesh
  target: Plan
  draft: Plan

  @classmethod
  def create(cls, mesh: Mesh, target_cfg: ModelConfig, draft_cfg: ModelConfig | None = None,
             rules=DEFAULT_RULES, draft_sharding: str = "replicated") -> "GenerationShardings":
    check_draft_sharding(draft_sharding)
    target = Plan.create(mesh, rules, target_cfg, "target")
    draft = Plan.create(mesh, rules, draft_cfg, "draft",
                        replicated=draft_sharding == "replicated")
    return cls(mesh=mesh, target=target, draft=draft)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def check_batch(self, batch_size: int) -> None:
    self.target.check_batch(batch_size)

  def batch(self, ndim: int) -> NamedSharding:
    """[batch, ...] arrays: rows over the data axis."""
    return self.target.sharding(("batch",) + (None,) * (ndim - 1))

  def state(self, tree) -> Any:
    """Shardings for a DecodeState / Proposal pytree, from field suffixes.

    Leaves under ``drafter_state`` follow the draft plan (its KV heads may be
    replicated while the target's are sharded).
    """
    def leaf(path, x):
      names = _path_names(path)
      plan = self.draft if "drafter_state" in names else self.target
      return plan.sharding(suffix_logical_axes(names[-1] if names else "", np.ndim(x)),
                           "/".join(names))
    return jax.tree_util.tree_map_with_path(leaf, tree)

  def for_kind(self, kind: str, value) -> Any:
    """Sharding pytree for one jit argument of the given kind."""
    if kind == "target_params":
      return param_shardings(value, self.target)
    if kind == "draft_params":
      return param_shardings(value, self.draft)
    if kind == "batch":   # a decode.Batch: every array's rows over data
      return jax.tree.map(lambda x: self.batch(np.ndim(x)), value)
    if kind == "state":
      return self.state(value)
    return jax.tree.map(lambda _: self.replicated, value)

  def cache(self, which: str = "target") -> NamedSharding:
    """[layers, batch, slots, kv_heads, head_dim] KV caches."""
    plan = self.draft if which == "draft" else self.target
    return plan.sharding(("layers", "batch", "slots", "kv_heads", "head_dim"), which + " cache")

  def constrain(self, target: Transformer, drafter):
    """(target, drafter) whose KV caches are pinned to their shardings in jit.

    Without the pin GSPMD may pick another layout for a cache inside the loop
    (e.g. split replicated KV heads along with the query heads), so that the
    loop carry is resharded on every step.
    """
    target = ConstrainedModel(target, self.cache("target"))
    model = None if drafter is None else drafter.draft_model
    if isinstance(model, Transformer):
      drafter = drafter.with_draft_model(ConstrainedModel(model, self.cache("draft")))
    return target, drafter

  def jit(self, fn: Callable, kinds: Sequence[str], donate: Sequence[int] = ()) -> "ShardedJit":
    return ShardedJit(fn, kinds, self, donate)

  def fetch(self, state) -> Any:
    """Host copy of a DecodeOutput / DecodeState (caches dropped).

    On several hosts the rows live on other processes' devices: they are
    gathered to every process by a jitted identity with replicated outputs.
    """
    small = state
    if hasattr(state, "target_cache"):
      small = state.replace(target_cache=None, drafter_state=())
    if jax.process_count() > 1:
      small = self._gather(small)
    return jax.device_get(small)

  @functools.cached_property
  def _gather(self):
    return jax.jit(lambda tree: tree, out_shardings=self.replicated)


@dataclasses.dataclass(frozen=True)
class ConstrainedModel:
  """A Transformer whose cache is constrained to ``cache_sharding`` on the way
  in and out of every call (``jax.lax.with_sharding_constraint``)."""

  model: Transformer
  cache_sharding: NamedSharding

  @property
  def cfg(self) -> ModelConfig:
    return self.model.cfg

  def init_params(self, *args, **kwargs):
    return self.model.init_params(*args, **kwargs)

  def _pin(self, cache):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.cache_sharding),
                        cache)

  def init_cache(self, batch_size: int, num_slots: int):
    return self._pin(self.model.init_cache(batch_size, num_slots))

  def apply(self, params, tokens_BT, positions_BT, cache, **kwargs):
    """Same contract as ``Transformer.apply``."""
    logits_BTV, cache = self.model.apply(params, tokens_BT, positions_BT, self._pin(cache),
                                         **kwargs)
    return logits_BTV, self._pin(cache)

  def forward(self, params, tokens_BT, positions_BT, cache, **kwargs):
    """Same contract as ``Transformer.forward`` (the cache is only read)."""
    return self.model.forward(params, tokens_BT, positions_BT, self._pin(cache), **kwargs)

  def apply_with_hidden(self, params, tokens_BT, positions_BT, cache, **kwargs):
    """Same contract as ``Transformer.apply_with_hidden``."""
    logits_BTV, hidden_BTD, cache = self.model.apply_with_hidden(
        params, tokens_BT, positions_BT, self._pin(cache), **kwargs)
    return logits_BTV, hidden_BTD, self._pin(cache)


class ShardedJit:
  """``jax.jit`` with explicit in/out shardings, worked out at the first call.

  Argument kinds: target_params, draft_params, batch ([batch, ...] arrays),
  state (DecodeState / Proposal, sharded by field suffix) and replicated.
  The output shardings come from the output's field names (``jax.eval_shape``),
  so the DecodeState leaves the loop sharded as the rules say. Arguments are
  placed into their shardings before the call; already placed ones are kept.
  """

  def __init__(self, fn: Callable, kinds: Sequence[str], shardings: GenerationShardings,
               donate: Sequence[int] = ()):
    self.fn, self.kinds, self.shardings = fn, tuple(kinds), shardings
    self.donate = tuple(donate)
    self.jitted = None
    self.in_shardings = self.out_shardings = None

  def _setup(self, args):
    self.in_shardings = tuple(self.shardings.for_kind(kind, arg)
                              for kind, arg in zip(self.kinds, args))
    out = jax.eval_shape(self.fn, *args)
    self.out_shardings = self.shardings.state(out)
    self.jitted = jax.jit(self.fn, in_shardings=self.in_shardings,
                          out_shardings=self.out_shardings, donate_argnums=self.donate)

  def place(self, args) -> tuple:
    if self.jitted is None:
      self._setup(args)
    return tuple(place(a, s) for a, s in zip(args, self.in_shardings))

  def __call__(self, *args):
    placed = self.place(args)
    return self.jitted(*placed)

  def lower(self, *args):
    placed = self.place(args)
    return self.jitted.lower(*placed)


@dataclasses.dataclass(frozen=True)
class RuntimeSharding:
  """``config.mesh`` / ``sharding_rules`` / ``draft_sharding``, checked before
  any weight loads (mesh vs devices, rule names, batch vs the data axis)."""

  mesh: Mesh
  rules: str
  draft_sharding: str

  @classmethod
  def from_config(cls, config) -> "RuntimeSharding | None":
    """None when there is nothing to shard ("" mesh on one device)."""
    mesh = mesh_from_config(config)
    if mesh is None:
      return None
    rules = config.get("sharding_rules", DEFAULT_RULES)
    draft_sharding = config.get("draft_sharding", "replicated")
    check_draft_sharding(draft_sharding)
    Plan.create(mesh, rules, None, "batch").check_batch(config.batch_size)
    return cls(mesh=mesh, rules=rules, draft_sharding=draft_sharding)

  def plan(self, cfg: ModelConfig | None, which: str) -> Plan:
    replicated = which == "draft" and self.draft_sharding == "replicated"
    return Plan.create(self.mesh, self.rules, cfg, which, replicated)

  def param_fn(self, which: str) -> Callable[[ModelConfig], Any]:
    """``ModelConfig -> params sharding pytree`` for the loaders."""
    return lambda cfg: param_shardings(cfg, self.plan(cfg, which))

  def generation(self, target: Transformer, drafter) -> GenerationShardings:
    model = None if drafter is None else drafter.draft_model
    return GenerationShardings.create(self.mesh, target.cfg, None if model is None else model.cfg,
                                      self.rules, self.draft_sharding)
