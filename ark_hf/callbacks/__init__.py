"""Callbacks: `CurriculumCallback` (stage plans)."""

from ark_hf.callbacks.curriculum import CurriculumCallback

__all__ = ["CurriculumCallback"]
