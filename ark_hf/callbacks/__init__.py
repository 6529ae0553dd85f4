"""Callbacks: `CurriculumCallback` (stage plans) and `AlignmentCallback` (ARK's triple alignment during training)."""

from ark_hf.callbacks.alignment import AlignmentCallback
from ark_hf.callbacks.curriculum import CurriculumCallback

__all__ = ["AlignmentCallback", "CurriculumCallback"]
