"""Distillation data: target samples and the target's distributions over them.

On-policy: the target itself completes the training prompts (prompt-suite
prompts and templated instructions, chat-formatted like at inference) with
the compiled ``Generator`` at a temperature > 0, so the draft learns the text
it will have to predict. One jitted target forward then stores, for every
token, the target's top-k next-token log-probabilities (the teacher) and its
hidden state (the feature a feature draft reads, float16): completion
positions are the on-policy signal; prompt positions come for free and are
weighted by ``distill.prompt_loss_weight``. An optional plain-text file adds
off-policy windows, trained on every position.

Layout in WORKDIR/data (NumPy ``.npz``, loaded with ``allow_pickle=False``)::

  meta.json          fingerprint of the settings and requests
  self_instruct.json the target's own instructions (distill.num_self_instruct)
  shard-00000.npz    tokens, offsets, loss_start, teacher_ids, teacher_logp, features
  text.npz           the same for the optional text file

A shard is written atomically once its samples and teacher exist. A rerun, or
a run resumed after a kill, reuses complete shards and makes only the missing
ones; seeds are fixed per request, so a remade shard equals the lost one.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import prompts as prompts_lib
from specdec_jax.distill import instructions
from specdec_jax.jobs import io
from specdec_jax.generation import Generator

DATA_DIR = "data"
META_FILE = "meta.json"
TEXT_SHARD = "text.npz"
SHARD_REQUESTS = 32          # requests per shard (rounded up to a multiple of gen_batch_size)
SELF_INSTRUCT_FILE = "self_instruct.json"
MIN_PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to complete; ``seed`` fixes its sample."""

  prompt_ids: tuple[int, ...]
  seed: int
  source: str   # "suite" | "templated" | "self_instruct"


@dataclasses.dataclass
class Examples:
  """Variable-length training sequences with teacher distributions.

  tokens[e]: int32 [L_e], the full sequence (prompt + completion).
  loss_start[e]: the first completion position (the prompt length); 1 for
    plain text, which counts as completion everywhere.
  teacher_ids[e], teacher_logp[e]: [L_e - 1, k]: row r holds the target's
    top-k ids / log-probs for the token at position r + 1 (the logits at r).
  features[e]: [L_e, D] float16, the target's final-normed hidden state at
    each position (what its head read there), or None when not loaded.
  """

  tokens: list
  loss_start: np.ndarray
  teacher_ids: list
  teacher_logp: list
  features: list | None = None   # [L_e, D] float16: the target's hidden state per position
  fingerprint: str = ""     # of the settings that made the data (see ``fingerprint``)

  @property
  def num_examples(self) -> int:
    return len(self.tokens)

  @property
  def num_completion_tokens(self) -> int:
    """Completion (on-policy) tokens."""
    return int(sum(len(t) - s for t, s in zip(self.tokens, self.loss_start)))

  @property
  def num_prompt_tokens(self) -> int:
    """Prompt tokens after the first (trained at ``prompt_loss_weight``)."""
    return int(sum(s - 1 for s in self.loss_start))


# ----- requests ---------------------------------------------------------------


def build_requests(config, encode, self_instructions=()) -> list[Request]:
  """The generation requests: suite prompts x samples_per_prompt, templated
  instructions, then ``self_instructions`` (the target's own, see
  ``instructions.self_instruct``), each sampled once.

  Prompts longer than ``config.max_prompt_len`` tokens are left out.

  Args:
    config: the experiment config (reads ``config.distill``).
    encode: prompt (str or prompts.Prompt) -> token ids, chat-formatted as at
      inference (``Runtime.encode_prompt``).
    self_instructions: instruction texts.
  """
  d = config.distill
  texts = []
  if d.prompts == "builtin":
    texts = list(config.prompt_texts)
  elif d.prompts:
    names = [n.strip() for n in d.prompts.split(",")]
    if prompts_lib.HELD_OUT in names:
      raise ValueError(f"config.distill.prompts={d.prompts!r} includes the "
                       f"{prompts_lib.HELD_OUT!r} prompts kept for evaluation")
    texts = prompts_lib.load_prompts(d.prompts)
  requests = []
  for prompt in texts:
    ids = tuple(encode(prompt))
    for _ in range(d.samples_per_prompt):
      requests.append(Request(ids, d.seed * 1_000_003 + len(requests), "suite"))
  for text in instructions.templated_instructions(d.num_templated, d.seed):
    requests.append(Request(tuple(encode(text)), d.seed * 1_000_003 + len(requests),
                            "templated"))
  for text in self_instructions:
    requests.append(Request(tuple(encode(text)), d.seed * 1_000_003 + len(requests),
                            "self_instruct"))
  return [r for r in requests if len(r.prompt_ids) <= config.max_prompt_len]


def shard_size(gen_batch_size: int) -> int:
  """Requests per shard: SHARD_REQUESTS rounded up to whole generation batches."""
  return -(-SHARD_REQUESTS // gen_batch_size) * gen_batch_size


def fingerprint(config, target_cfg, requests: list[Request]) -> str:
  """Hash of everything that determines the data (not the training settings).

  ``requests`` are the suite and templated ones; the self-instructed ones are
  a function of the target and the settings hashed here, so the workdir's
  data can be checked before any is made.
  """
  d = config.distill
  text_hash = ""
  if d.text_file:
    with open(d.text_file, "rb") as f:
      text_hash = hashlib.sha256(f.read()).hexdigest()
  blob = json.dumps({
      "target": dataclasses.asdict(target_cfg), "model": config.model.to_dict(),
      "gen": [d.gen_temperature, d.gen_top_k, d.gen_top_p, d.gen_max_new_tokens],
      "teacher_top_k": d.teacher_top_k, "text": text_hash,
      "text_seq_len": d.seq_len if d.text_file else 0,   # text windows only
      "self_instruct": [d.num_self_instruct, d.self_instruct_max_tokens, d.seed,
                        config.chat],
      "shard_size": shard_size(d.gen_batch_size),
      "format": 4,   # 4: two-level Gumbel sampling, features in the shards
      "requests": [[list(r.prompt_ids), r.seed] for r in requests],
  }, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----- the target as teacher ----------------------------------------------------


def make_teacher_fn(target, top_k: int):
  """Jitted (params, tokens_BT) -> (logp_BTk, ids_BTk, hidden_BTD): top-k of
  the log softmax and the hidden states (features, float16), one forward."""

  @jax.jit
  def teacher(params, tokens_BT):
    batch, seq = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    logits_BTV, hidden_BTD, _ = target.apply_with_hidden(params, tokens_BT, positions_BT,
                                                         target.init_cache(batch, seq))
    logp_BTk, ids_BTk = jax.lax.top_k(jax.nn.log_softmax(logits_BTV, axis=-1), top_k)
    return logp_BTk, ids_BTk.astype(jnp.int32), hidden_BTD.astype(jnp.float16)

  return teacher


def _length_bucket(n: int) -> int:
  """Padded lengths for the teacher forward: few shapes, little padding."""
  step = 64 if n <= 256 else 128
  return max(step, -(-n // step) * step)


def teacher_targets(teacher_fn, target_params, sequences: list,
                    batch_size: int) -> tuple[list, list, list]:
  """Per sequence: teacher ids and logp [L-1, k] for tokens 1 .. L-1, and the
  features [L, D] (float16).

  Batches of similar-length sequences are right-padded to a length bucket
  (few shapes to compile; causal attention leaves the real positions as
  they are).
  """
  ids_out, logp_out, feat_out = ([None] * len(sequences) for _ in range(3))
  order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    seq = _length_bucket(max(len(sequences[i]) for i in chunk))
    tokens_BT = np.zeros((batch_size, seq), np.int32)
    for row, i in enumerate(chunk):
      tokens_BT[row, :len(sequences[i])] = sequences[i]
    logp_BTk, ids_BTk, hidden_BTD = jax.device_get(
        teacher_fn(target_params, jnp.asarray(tokens_BT)))
    for row, i in enumerate(chunk):
      n = len(sequences[i])   # logits at position t describe the token at t + 1
      ids_out[i], logp_out[i] = ids_BTk[row, :n - 1], logp_BTk[row, :n - 1]
      feat_out[i] = hidden_BTD[row, :n]
  return ids_out, logp_out, feat_out


def window_features(examples: "Examples", seq_len: int) -> np.ndarray:
  """The target's features over each example's training window: [E, T+1, D]
  float16, from the stored per-position features.

  Row e, index i holds f at absolute position w - 1 + i, where w is the
  window's start (``TrainData.build``), zeros where that is < 0 or past the
  sequence: index j is the feature a feature draft reads at window index j,
  index j + 1 the feature it must predict there.
  """
  if examples.features is None:
    raise ValueError("these examples were loaded without their features")
  width = examples.features[0].shape[-1]
  out = np.zeros((examples.num_examples, seq_len + 1, width), np.float16)
  for e, feats in enumerate(examples.features):
    n = len(feats)
    w = max(0, n - seq_len)
    lo = max(w - 1, 0)
    out[e, lo - (w - 1):n - (w - 1)] = feats[lo:n]
  return out


# ----- shards ---------------------------------------------------------------------


def _save_npz(path: str, **arrays) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _pack(sequences, loss_start, teacher_ids, teacher_logp, features) -> dict:
  lengths = [len(s) for s in sequences]
  n_targets = [len(t) for t in teacher_ids]
  return dict(
      tokens=np.concatenate([np.asarray(s, np.int32) for s in sequences]),
      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      loss_start=np.asarray(loss_start, np.int32),
      teacher_offsets=np.concatenate([[0], np.cumsum(n_targets)]).astype(np.int64),
      teacher_ids=np.concatenate(teacher_ids).astype(np.int32),
      teacher_logp=np.concatenate(teacher_logp).astype(np.float32),
      features=np.concatenate(features).astype(np.float16))


def _unpack(path: str, with_features: bool) -> Examples:
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files if with_features or k != "features"}
    off, toff = arrays["offsets"], arrays["teacher_offsets"]
    split = lambda x, o: [x[o[i]:o[i + 1]] for i in range(len(o) - 1)]
    return Examples(
        tokens=split(arrays["tokens"], off), loss_start=arrays["loss_start"],
        teacher_ids=split(arrays["teacher_ids"], toff),
        teacher_logp=split(arrays["teacher_logp"], toff),
        features=split(arrays["features"], off) if with_features else None)
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"distillation data file {path} is damaged ({e}); delete it "
                     "to have it regenerated") from None


def _merge(parts: list[Examples]) -> Examples:
  with_features = bool(parts) and all(p.features is not None for p in parts)
  return Examples(
      tokens=[t for p in parts for t in p.tokens],
      loss_start=np.concatenate([p.loss_start for p in parts] or [np.zeros(0, np.int32)]),
      teacher_ids=[t for p in parts for t in p.teacher_ids],
      teacher_logp=[t for p in parts for t in p.teacher_logp],
      features=[f for p in parts for f in p.features] if with_features else None)


def _prompt_bucket(n: int, cap: int) -> int:
  size = MIN_PROMPT_BUCKET
  while size < n:
    size *= 2
  return min(size, cap)


class _Sampler:
  """Generators per prompt-length bucket (a short prompt gets a small cache)
  and batch size: a bucket with few prompts runs in a smaller batch (a power
  of two, at least 8) instead of padding to ``gen_batch_size`` rows. A row's
  sample is a function of its own key, so this leaves the data's
  distribution unchanged (the float results of another batch size may still
  differ in the last bits, as on another machine)."""

  def __init__(self, rt, d, max_prompt_len: int):
    self.rt, self.d, self.cap = rt, d, max_prompt_len
    self.generators = {}

  def __call__(self, requests: list[Request]) -> list[list[int]]:
    """Full sequences (prompt + sampled completion) in request order."""
    out = [None] * len(requests)
    groups = {}
    for i, r in enumerate(requests):
      groups.setdefault(_prompt_bucket(len(r.prompt_ids), self.cap), []).append(i)
    for bucket, idx in sorted(groups.items()):
      batch = min(self.d.gen_batch_size, max(8, 1 << (len(idx) - 1).bit_length()))
      if (bucket, batch) not in self.generators:
        self.generators[bucket, batch] = Generator(
            self.rt.target, None, max_prompt_len=bucket,
            max_new_tokens=self.d.gen_max_new_tokens, batch_size=batch,
            eos_ids=self.rt.eos_ids)
      result = self.generators[bucket, batch].generate(
          self.rt.target_params, {}, [requests[i].prompt_ids for i in idx],
          seeds=[requests[i].seed for i in idx], temperature=self.d.gen_temperature,
          top_k=self.d.gen_top_k, top_p=self.d.gen_top_p)
      for i, row in zip(idx, result.rows):
        out[i] = list(requests[i].prompt_ids) + row.output_ids
    return out


def _cached_self_instructions(config, rt, folder: str, log) -> list[str]:
  """``instructions.self_instruct`` for the config, made once and kept in
  WORKDIR/data/self_instruct.json (the meta fingerprint covers its settings)."""
  d = config.distill
  path = os.path.join(folder, SELF_INSTRUCT_FILE)
  if os.path.exists(path):
    texts = io.read_json(path, "delete it to have it remade")
    if len(texts) == d.num_self_instruct:
      return texts
  prefix = instructions.pre_query_prefix(rt.tokenizer, bool(config.chat))
  generator = Generator(rt.target, None, max_prompt_len=_prompt_bucket(len(prefix), 1 << 30),
                        max_new_tokens=d.self_instruct_max_tokens,
                        batch_size=d.gen_batch_size, eos_ids=rt.eos_ids)
  held_out = [p.text() for p in prompts_lib.load_prompts(prompts_lib.HELD_OUT)]
  start = time.perf_counter()
  texts = instructions.self_instruct(generator, rt.target_params, rt.tokenizer, prefix,
                                     d.num_self_instruct, d.seed, exclude=held_out, log=log)
  log(f"data: {len(texts)} self-instructed prompts in {time.perf_counter() - start:.0f}s")
  io.write_json(path, texts)
  return texts


def _check_meta(folder: str, fp: str) -> None:
  path = os.path.join(folder, META_FILE)
  if os.path.exists(path):
    meta = io.read_json(path)
    if meta.get("fingerprint") != fp:
      raise ValueError(
          f"{folder} holds distillation data built with other settings "
          f"(fingerprint {meta.get('fingerprint')} != {fp}); use a new workdir or "
          "delete that folder")
    return
  io.write_json(path, {"fingerprint": fp})


def prepare(config, rt, workdir: str, log=print, with_features: bool = False) -> Examples:
  """Builds (or reuses) WORKDIR/data and returns every training example
  (with their features, [L_e, D] each, when ``with_features``).

  Raises:
    ValueError: no prompts (that fit ``config.max_prompt_len``) and no text:
      an empty dataset; or data in the workdir made with other settings.
  """
  d = config.distill
  requests = build_requests(config, rt.encode_prompt)
  if d.text_file and not os.path.isfile(d.text_file):
    raise ValueError(f"config.distill.text_file={d.text_file!r} is not a file")
  if not requests and not d.text_file and not d.num_self_instruct:
    raise ValueError("the distillation dataset is empty: no prompt of "
                     "config.distill.prompts (or templated) fits config.max_prompt_len="
                     f"{config.max_prompt_len}, and there is no text_file or self-instruct")
  folder = os.path.join(workdir, DATA_DIR)
  os.makedirs(folder, exist_ok=True)
  fp = fingerprint(config, rt.target.cfg, requests)
  _check_meta(folder, fp)
  if d.num_self_instruct:
    requests = build_requests(config, rt.encode_prompt,
                              _cached_self_instructions(config, rt, folder, log))
  log(f"data: {len(requests)} generation requests (prompts longer than "
      f"max_prompt_len={config.max_prompt_len} left out)")

  teacher_fn = make_teacher_fn(rt.target, d.teacher_top_k)
  sampler = _Sampler(rt, d, config.max_prompt_len)
  # Similar lengths share a shard, so a batch wastes little padding.
  ordered = sorted(requests, key=lambda r: (len(r.prompt_ids), r.seed))
  size = shard_size(d.gen_batch_size)
  shards = [ordered[i:i + size] for i in range(0, len(ordered), size)]
  parts, made_tokens, made_shards, start = [], 0, 0, time.perf_counter()
  for n, shard in enumerate(shards):
    path = os.path.join(folder, f"shard-{n:05d}.npz")
    if not os.path.exists(path):
      sequences = sampler(shard)
      loss_start = [len(r.prompt_ids) for r in shard]
      ids, logp, feats = teacher_targets(teacher_fn, rt.target_params, sequences,
                                         d.teacher_batch_size)
      _save_npz(path, **_pack(sequences, loss_start, ids, logp, feats))
      made_tokens += sum(len(seq) - p for seq, p in zip(sequences, loss_start))
      made_shards += 1
      elapsed = time.perf_counter() - start
      remaining = sum(not os.path.exists(os.path.join(folder, f"shard-{m:05d}.npz"))
                      for m in range(n + 1, len(shards)))
      log(f"data: shard {n + 1}/{len(shards)} made, {made_tokens} sampled tokens in "
          f"{elapsed:.0f}s ({made_tokens / elapsed:.1f} tok/s incl. teacher), "
          f"ETA {elapsed / made_shards * remaining:.0f}s")
    parts.append(_unpack(path, with_features))
  if d.text_file:
    parts.append(_text_examples(config, rt, teacher_fn, folder, log, with_features))
  examples = dataclasses.replace(_merge(parts), fingerprint=fp)
  if examples.num_completion_tokens == 0:
    raise ValueError("the distillation dataset is empty: no training tokens")
  return examples


def _text_examples(config, rt, teacher_fn, folder: str, log, with_features) -> Examples:
  """Windows of ``seq_len`` tokens of the text file, trained on every position."""
  path = os.path.join(folder, TEXT_SHARD)
  if not os.path.exists(path):
    with open(config.distill.text_file, encoding="utf-8") as f:
      ids = rt.tokenizer.encode(f.read())
    seq_len = config.distill.seq_len
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
      return _merge([])
    start = [1] * len(windows)
    t_ids, t_logp, t_feats = teacher_targets(teacher_fn, rt.target_params, windows,
                                             config.distill.teacher_batch_size)
    _save_npz(path, **_pack(windows, start, t_ids, t_logp, t_feats))
    log(f"data: text file {config.distill.text_file}: {len(windows)} windows, "
        f"{sum(len(w) for w in windows)} tokens")
  return _unpack(path, with_features)


# ----- batches ---------------------------------------------------------------------


def token_scores(examples: Examples, vocab_size: int) -> np.ndarray:
  """Expected count of each token under the target over the data: float [V]."""
  scores_V = np.zeros((vocab_size,), np.float64)
  for ids, logp in zip(examples.teacher_ids, examples.teacher_logp):
    np.add.at(scores_V, ids.reshape(-1), np.exp(logp.reshape(-1).astype(np.float64)))
  return scores_V


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Example indices of training step ``step``: a pure function of its inputs.

  Samples are drawn epoch by epoch, each epoch a fresh permutation from
  (seed, epoch); so a resumed run sees exactly the batches an uninterrupted
  run would have seen, without any data-loader state to save.
  """
  out = np.empty((batch_size,), np.int64)
  for j in range(batch_size):
    epoch, i = divmod(step * batch_size + j, num_examples)
    out[j] = _permutation(seed, epoch, num_examples)[i]
  return out


@dataclasses.dataclass
class TrainData:
  """Examples as fixed-shape arrays [E, T] for static-shape training.

  Each example keeps its last ``seq_len`` tokens (the completion and the end
  of the prompt). Window index j is trained on the next token with weight
  mask_ET[e, j]: 1 for completion tokens, ``prompt_weight`` for prompt tokens,
  0 for padding.

  tokens_ET: int32.
  mask_ET: float32.
  teacher_head_ETk: int32 head index of each teacher token (-1: not in head).
  teacher_logp_ETk: float32 teacher log-probs.
  features_ET1D: float16 [E, T+1, D] target features for a feature draft
    (``window_features``), or None; batches get them as float32.
  """

  tokens_ET: np.ndarray
  mask_ET: np.ndarray
  teacher_head_ETk: np.ndarray
  teacher_logp_ETk: np.ndarray
  features_ET1D: np.ndarray | None = None

  @classmethod
  def build(cls, examples: Examples, seq_len: int, vocab_to_head_V: np.ndarray,
            prompt_weight: float = 0.0) -> "TrainData":
    num, k = examples.num_examples, examples.teacher_ids[0].shape[-1]
    tokens = np.zeros((num, seq_len), np.int32)
    mask = np.zeros((num, seq_len), np.float32)
    head = np.full((num, seq_len, k), -1, np.int32)
    logp = np.full((num, seq_len, k), -np.inf, np.float32)
    for e in range(num):
      seq, start = examples.tokens[e], int(examples.loss_start[e])
      w = max(0, len(seq) - seq_len)
      n = len(seq) - w
      tokens[e, :n] = seq[w:]
      # window index j predicts the token at absolute position w + j + 1,
      # whose teacher row is w + j
      predicted = w + 1 + np.arange(n - 1)
      mask[e, :n - 1] = np.where(predicted >= start, 1.0, prompt_weight)
      head[e, :n - 1] = vocab_to_head_V[examples.teacher_ids[e][w:]]
      logp[e, :n - 1] = examples.teacher_logp[e][w:]
    return cls(tokens, mask, head, logp)

  @property
  def num_examples(self) -> int:
    return self.tokens_ET.shape[0]

  def batch(self, seed: int, step: int, batch_size: int) -> dict:
    idx = batch_indices(seed, step, self.num_examples, batch_size)
    out = {"tokens_BT": self.tokens_ET[idx], "mask_BT": self.mask_ET[idx],
           "teacher_head_BTk": self.teacher_head_ETk[idx],
           "teacher_logp_BTk": self.teacher_logp_ETk[idx]}
    if self.features_ET1D is not None:
      out["features_BT1D"] = self.features_ET1D[idx].astype(np.float32)
    return out
