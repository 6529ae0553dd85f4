"""The retriever of ARK's alignment pipeline: loaded with `ark_hf.models.loading.load_embedder`, encoded with
`ark_hf.models.encoding.encode_dense` (both re-exported here)."""

from __future__ import annotations

from ark_hf.models.encoding import encode_dense
from ark_hf.models.loading import load_embedder
from ark_hf.models.outputs import RetrieverModule

__all__ = ["encode_dense", "load_retriever"]


def load_retriever(name_or_path: str, kind: str = "auto", device: str | None = None) -> RetrieverModule:
    """The retriever of a folder or Hub name, in eval mode: `ark_hf.models.loading.load_embedder` (`kind`: auto,
    bge_m3 or decoder; LoRA adapter folders load on their base model)."""
    return load_embedder(name_or_path, kind, device)
