"""Dense embeddings from any ark_hf retriever (`BGEM3Model`, `DecoderEmbedder`) through their shared API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["encode_dense", "load_retriever"]


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


def load_retriever(name_or_path: str, kind: str = "auto", device: str | None = None) -> Any:
    """A `DecoderEmbedder` for decoder-only checkpoints (`kind="decoder"`), else a `BGEM3Model` (`"bge_m3"`)."""
    from transformers import AutoConfig

    if kind == "auto":
        config = AutoConfig.from_pretrained(name_or_path)
        decoder_types = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3")
        kind = "decoder" if config.model_type in decoder_types else "bge_m3"
    if kind == "decoder":
        from ark_hf.models.decoder import DecoderEmbedder

        model = DecoderEmbedder(name_or_path)
    elif kind == "bge_m3":
        from ark_hf.models.bge_m3 import BGEM3Model

        model = BGEM3Model(name_or_path)
    else:
        raise ValueError(f"retriever kind must be 'auto', 'bge_m3' or 'decoder', got {kind!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
