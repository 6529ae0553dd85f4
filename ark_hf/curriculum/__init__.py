"""Curriculum training: the stage plan (`plan.py`) and the stream of batches it defines (`stream.py`).

`CurriculumCallback` (in `ark_hf.callbacks.curriculum`) applies the plan during training; the trainers build the
stream through their own dataset and sampler builders.
"""

from ark_hf.curriculum.plan import CurriculumPlan, MergeSpec, Stage, StagePlanError, load_stage_plan, parse_stages
from ark_hf.curriculum.stream import CurriculumBatchSampler, CurriculumDataset, CurriculumIndex, CurriculumStream

__all__ = [
    "CurriculumBatchSampler",
    "CurriculumDataset",
    "CurriculumIndex",
    "CurriculumPlan",
    "CurriculumStream",
    "MergeSpec",
    "Stage",
    "StagePlanError",
    "load_stage_plan",
    "parse_stages",
]
