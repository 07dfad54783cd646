"""Draft sources behind one interface (see ``base.Drafter``)."""

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.drafters.feature_drafter import FeatureDrafter
from specdec_jax.drafters.hybrid import HybridDrafter
from specdec_jax.drafters.model_drafter import ModelDrafter
from specdec_jax.drafters.ngram import NgramDrafter
from specdec_jax.models.feature_draft import FeatureDraft

# "ngram+model" / "ngram+feature": prompt lookup where the text ends in a
# repeated n-gram, the draft model elsewhere (drafters/hybrid.py).
DRAFTERS = ("none", "model", "feature", "ngram", "ngram+model", "ngram+feature")


def for_draft_model(model) -> Drafter:
  """The drafter that runs a draft model: FeatureDrafter for a FeatureDraft,
  ModelDrafter for a Transformer."""
  return FeatureDrafter(model) if isinstance(model, FeatureDraft) else ModelDrafter(model)


def model_kind(drafter_name: str) -> str | None:
  """The draft model a ``config.drafter`` value runs: 'model', 'feature' or None."""
  kind = drafter_name.removeprefix("ngram+")
  return kind if kind in ("model", "feature") else None


__all__ = ["DraftContext", "Drafter", "Proposal", "FeatureDrafter", "HybridDrafter",
           "ModelDrafter", "NgramDrafter", "DRAFTERS", "for_draft_model", "model_kind"]
