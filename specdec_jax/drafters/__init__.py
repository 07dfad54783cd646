"""Draft sources behind one interface (``base.Drafter``), built from one
registry: ``KINDS`` says what each ``config.decode.drafter`` name runs, ``build``
makes it."""

import dataclasses

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.drafters.feature_drafter import FeatureDrafter
from specdec_jax.drafters.hybrid import HybridDrafter
from specdec_jax.drafters.model_drafter import ModelDrafter
from specdec_jax.drafters.ngram import NgramDrafter
from specdec_jax.models.feature_draft import FeatureDraft


@dataclasses.dataclass(frozen=True)
class DrafterKind:
  """What a ``config.decode.drafter`` name runs.

  lookup: prompt lookup (``NgramDrafter``), alone or in front of a draft model.
  draft_model: "model" (a Transformer), "feature" (a FeatureDraft) or None.
  builds_trees: the drafter implements ``propose_tree`` (``tree.check_setup``
    reads it from a drafter or from its registry entry alike).
  samples_trees: its trees can draw their candidates from a draft model's q
    (``tree_candidates="sampled"``).
  """

  name: str
  lookup: bool
  draft_model: str | None
  builds_trees: bool = False
  samples_trees: bool = False

  @property
  def speculative(self) -> bool:
    return self.lookup or self.draft_model is not None


# "ngram+model" / "ngram+feature": prompt lookup where the text ends in a
# repeated n-gram, the draft model elsewhere (drafters/hybrid.py).
KINDS = {kind.name: kind for kind in (
    DrafterKind("none", lookup=False, draft_model=None),
    DrafterKind("model", lookup=False, draft_model="model", builds_trees=True,
                samples_trees=True),
    DrafterKind("feature", lookup=False, draft_model="feature", builds_trees=True,
                samples_trees=True),
    DrafterKind("ngram", lookup=True, draft_model=None, builds_trees=True),
    DrafterKind("ngram+model", lookup=True, draft_model="model", builds_trees=True),
    DrafterKind("ngram+feature", lookup=True, draft_model="feature", builds_trees=True),
)}
DRAFTERS = tuple(KINDS)


def kind(name: str) -> DrafterKind:
  """The registry entry of a drafter name; ValueError naming the choices."""
  if name not in KINDS:
    raise ValueError(f"drafter={name!r}; expected one of {DRAFTERS}")
  return KINDS[name]


def for_draft_model(model) -> Drafter:
  """The drafter that runs a draft model: FeatureDrafter for a FeatureDraft,
  ModelDrafter for a Transformer."""
  return FeatureDrafter(model) if isinstance(model, FeatureDraft) else ModelDrafter(model)


def check_vocabulary(drafter: Drafter | None, vocab_size: int) -> None:
  """ValueError unless the drafter's draft model (if any) has the target's
  vocabulary size: drafter and target must share a tokenizer."""
  model = None if drafter is None else drafter.draft_model
  if model is not None and model.cfg.vocab_size != vocab_size:
    raise ValueError(
        f"draft vocab size {model.cfg.vocab_size} differs from target vocab size "
        f"{vocab_size}; drafter and target must share a tokenizer")


def build(name: str, *, lookup: NgramDrafter | None = None, draft_model=None,
          min_match: int = 2) -> Drafter | None:
  """The drafter a name runs (None for "none"), from its parts: ``lookup``
  for the names with prompt lookup, ``draft_model`` (a Transformer or
  FeatureDraft of the named kind) for those with a draft model."""
  entry = kind(name)
  if entry.lookup and lookup is None:
    raise ValueError(f"drafter={name!r} needs an NgramDrafter")
  if entry.draft_model is None:
    return lookup if entry.lookup else None
  stored = "feature" if isinstance(draft_model, FeatureDraft) else "model"
  if draft_model is None or stored != entry.draft_model:
    raise ValueError(f"drafter={name!r} needs a {entry.draft_model!r} draft, got "
                     f"{type(draft_model).__name__}")
  draft = for_draft_model(draft_model)
  return HybridDrafter.wrap(lookup, draft, min_match) if entry.lookup else draft


__all__ = ["DraftContext", "Drafter", "DrafterKind", "Proposal", "FeatureDrafter",
           "HybridDrafter", "ModelDrafter", "NgramDrafter", "DRAFTERS", "KINDS", "build",
           "check_vocabulary", "for_draft_model", "kind"]
