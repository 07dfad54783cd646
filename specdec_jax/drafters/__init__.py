"""Draft sources behind one interface (see ``base.Drafter``)."""

from specdec_jax.drafters.base import DraftContext, Drafter, Proposal
from specdec_jax.drafters.model_drafter import ModelDrafter
from specdec_jax.drafters.ngram import NgramDrafter

DRAFTERS = ("none", "model", "ngram")

__all__ = ["DraftContext", "Drafter", "Proposal", "ModelDrafter", "NgramDrafter", "DRAFTERS"]
