"""Triple alignment (ARK, arXiv 2511.16326): forward, backward and parameter scores of candidate chunks.

- `CausalLMScorer`: mean per-token log-probabilities of a continuation under any causal LM.
- `combine_scores`, `min_max_normalize`, `short_chunk_penalty`: ARK's per-question combination.
- `score_file` / `AlignmentScoringConfig`: the resumable, sharded scorer of a jsonl (`recipes/compute_alignment.py`).
- `rebuild_records` / `rebuild_file`: ark_hf training records (with `pos_scores` / `neg_scores`) from the scores.
- `compute_alignment` / `ComputeAlignmentConfig`: the whole job (score, then rebuild; or rebuild only), shared by
  `recipes/compute_alignment.py` and `ark-hf score`.
"""

from ark_hf.alignment.combine import DEFAULT_WEIGHTS, combine_scores, min_max_normalize, short_chunk_penalty
from ark_hf.alignment.lm_scorer import CausalLMScorer, PromptTooLongError, ScoreRequest
from ark_hf.alignment.pipeline import (
    AlignmentScoringConfig,
    ComputeAlignmentConfig,
    compute_alignment,
    rebuild_file,
    rebuild_records,
    score_file,
    score_records,
)
from ark_hf.alignment.prompts import ARK_BACKWARD_PROMPT, ARK_FORWARD_PROMPT, UPR_PROMPT, AlignmentPrompts
from ark_hf.alignment.records import AlignmentRecord, read_alignment_records

__all__ = [
    "ARK_BACKWARD_PROMPT",
    "ARK_FORWARD_PROMPT",
    "DEFAULT_WEIGHTS",
    "UPR_PROMPT",
    "AlignmentPrompts",
    "AlignmentRecord",
    "AlignmentScoringConfig",
    "CausalLMScorer",
    "ComputeAlignmentConfig",
    "PromptTooLongError",
    "ScoreRequest",
    "combine_scores",
    "compute_alignment",
    "min_max_normalize",
    "read_alignment_records",
    "rebuild_file",
    "rebuild_records",
    "score_file",
    "score_records",
    "short_chunk_penalty",
]
