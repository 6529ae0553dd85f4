"""Callbacks: `CurriculumCallback` (stage plans), `AlignmentCallback` (ARK's triple alignment during training) and
`HardNegativeRefresh` (hard negatives re-mined with the model being trained)."""

from ark_hf.callbacks.alignment import AlignmentCallback
from ark_hf.callbacks.curriculum import CurriculumCallback
from ark_hf.callbacks.hard_negatives import HardNegativeRefresh

__all__ = ["AlignmentCallback", "CurriculumCallback", "HardNegativeRefresh"]
