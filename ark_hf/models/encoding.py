"""`encode_dense`: L2-normalised dense embeddings from any ark_hf embedder (`BGEM3Model`, `DecoderEmbedder`) through
their shared API (`tokenize`, `encode_features`), as training encodes. Used by ARK's alignment pipeline and its
evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["encode_dense"]


def encode_dense(model: Any, texts: Sequence[str], *, max_length: int, batch_size: int = 32) -> torch.Tensor:
    """`[N, d]` L2-normalised float32 embeddings on the CPU, with the model's `tokenize` and `encode_features`.

    This is the training-time encoding (the texts must already carry any instruction). Gradients follow the
    caller's grad mode; the model's train/eval mode is left as it is.
    """
    device = next(model.parameters()).device
    out = []
    for begin in range(0, len(texts), batch_size):
        features = model.tokenize(list(texts[begin : begin + batch_size]), max_length)
        features = {k: v.to(device) for k, v in features.items()}
        out.append(F.normalize(model.encode_features(features).dense.float(), dim=-1))
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
