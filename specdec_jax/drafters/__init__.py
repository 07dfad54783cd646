"""Draft sources behind one interface (see ``base.Drafter``)."""

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.drafters.feature_drafter import FeatureDrafter
from specdec_jax.drafters.model_drafter import ModelDrafter
from specdec_jax.drafters.ngram import NgramDrafter
from specdec_jax.models.feature_draft import FeatureDraft

DRAFTERS = ("none", "model", "feature", "ngram")


def for_draft_model(model) -> Drafter:
  """The drafter that runs a draft model: FeatureDrafter for a FeatureDraft,
  ModelDrafter for a Transformer."""
  return FeatureDrafter(model) if isinstance(model, FeatureDraft) else ModelDrafter(model)


__all__ = ["DraftContext", "Drafter", "Proposal", "FeatureDrafter", "ModelDrafter",
           "NgramDrafter", "DRAFTERS", "for_draft_model"]
