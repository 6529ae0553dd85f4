"""ARK's combination of the three alignment scores of one question's candidates.

Per question, each score is min-max normalised over the candidates (0.5 for all when they are equal, `None`
kept for a missing score), then

    S(c) = w_f * S~_f(c) + w_b * S~_b(c) + w_v * S~_v(c),    (w_f, w_b, w_v) = (1.0, 0.3, 1.0)

times min(1, tokens(c) / 10): chunks shorter than 10 tokens are scaled down. A missing score (the forward
score of a record without an answer) drops its term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DEFAULT_WEIGHTS", "MIN_CHUNK_TOKENS", "combine_scores", "min_max_normalize", "short_chunk_penalty"]

DEFAULT_WEIGHTS = (1.0, 0.3, 1.0)
MIN_CHUNK_TOKENS = 10


def min_max_normalize(scores: Sequence[float | None]) -> list[float | None]:
    """(s - min) / (max - min) over the non-missing scores; 0.5 for each when max and min are (close to) equal.

    Example:
        >>> min_max_normalize([-2.0, -1.0, None, 0.0])
        [0.0, 0.5, None, 1.0]
    """
    valid = [s for s in scores if s is not None]
    if not valid:
        return list(scores)
    low, high = min(valid), max(valid)
    if math.isclose(high, low):
        return [None if s is None else 0.5 for s in scores]
    return [None if s is None else (s - low) / (high - low) for s in scores]


def short_chunk_penalty(tokens: int, min_tokens: int = MIN_CHUNK_TOKENS) -> float:
    """min(1, tokens / min_tokens)."""
    return 1.0 if tokens >= min_tokens else tokens / min_tokens


def combine_scores(
    forward: Sequence[float | None],
    backward: Sequence[float | None],
    parameter: Sequence[float | None],
    tokens: Sequence[int],
    *,
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
    min_tokens: int = MIN_CHUNK_TOKENS,
) -> list[float]:
    """The combined score S of each candidate of one question (see the module docstring).

    Args:
        forward, backward, parameter: raw scores per candidate (`None` where missing).
        tokens: the candidate's length in tokens, for the short-chunk penalty.
        weights: (w_f, w_b, w_v).
        min_tokens: chunks shorter than this are scaled by tokens / min_tokens.
    """
    if not len(forward) == len(backward) == len(parameter) == len(tokens):
        raise ValueError("forward, backward, parameter and tokens need one entry per candidate")
    columns = [min_max_normalize(forward), min_max_normalize(backward), min_max_normalize(parameter)]
    combined = []
    for i, n_tokens in enumerate(tokens):
        total = sum(w * column[i] for w, column in zip(weights, columns) if column[i] is not None)
        combined.append(total * short_chunk_penalty(n_tokens, min_tokens))
    return combined
