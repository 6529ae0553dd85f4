"""`load_embedder(path)`: a saved ark_hf embedder of any kind, its kind detected in one place.

Kinds (`EMBEDDER_KINDS`):

- `"bge_m3"`: an encoder (`BGEM3Model`), with its sparse and ColBERT heads when the folder has them;
- `"decoder"`: a decoder with last-token pooling (`DecoderEmbedder`), a full folder or a LoRA adapter folder
  (`adapter_config.json`: the adapter is loaded on its base model).

Detection, in order: an adapter folder is a decoder (only decoders train LoRA adapters); a folder with
`m3_heads.json` or the head files is BGE-M3; otherwise the architecture decides: an encoder that has a
masked-LM head in transformers (BERT, XLM-R, ...) is BGE-M3, anything else a decoder. Mining (`ark-hf mine`),
evaluation (`ark-hf eval`), ARK's alignment pipeline and the model card all ask this module.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ark_hf.constants import ADAPTER_CONFIG_NAME
from ark_hf.models.outputs import RetrieverModule

__all__ = ["EMBEDDER_KINDS", "detect_embedder_kind", "embedder_kind", "load_embedder", "resolve_embedder_kind"]

EMBEDDER_KINDS = ("bge_m3", "decoder")
# the spellings of the older entry points: `ark-hf mine/eval --model_type bge-m3|qwen3`
_KIND_ALIASES = {"bge-m3": "bge_m3", "qwen3": "decoder"}


def resolve_embedder_kind(kind: str) -> str:
    """`kind` as one of `EMBEDDER_KINDS` or `"auto"`; the older spellings `bge-m3` and `qwen3` are accepted."""
    resolved = _KIND_ALIASES.get(kind, kind)
    if resolved != "auto" and resolved not in EMBEDDER_KINDS:
        spellings = ["auto", *EMBEDDER_KINDS, *_KIND_ALIASES]
        raise ValueError(f"embedder kind must be one of {', '.join(spellings)}; got {kind!r}")
    return resolved


def detect_embedder_kind(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> str:
    """The kind of a local folder or Hub model (see the module docstring for the rules)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from ark_hf.models.bge_m3 import COLBERT_FILE, HEADS_INFO_FILE, SPARSE_FILE
    from ark_hf.models.checks import find_model_file

    path = str(name_or_path)
    if find_model_file(path, ADAPTER_CONFIG_NAME) is not None:
        return "decoder"
    if find_model_file(path, HEADS_INFO_FILE) is not None or (
        find_model_file(path, COLBERT_FILE) is not None and find_model_file(path, SPARSE_FILE) is not None
    ):
        return "bge_m3"
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return "bge_m3" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def embedder_kind(model_or_path: nn.Module | str | os.PathLike) -> str:
    """The kind of a loaded embedder (by its class) or of a saved one (`detect_embedder_kind`)."""
    if not isinstance(model_or_path, nn.Module):
        return detect_embedder_kind(model_or_path)
    from ark_hf.models.bge_m3 import BGEM3Model
    from ark_hf.models.decoder import DecoderEmbedder

    if isinstance(model_or_path, BGEM3Model):
        return "bge_m3"
    if isinstance(model_or_path, DecoderEmbedder):
        return "decoder"
    raise TypeError(f"{type(model_or_path).__name__} is not an ark_hf embedder (BGEM3Model or DecoderEmbedder)")


def load_embedder(
    name_or_path: str | os.PathLike,
    kind: str = "auto",
    device: str | torch.device | None = None,
    *,
    trust_remote_code: bool = False,
) -> RetrieverModule:
    """A saved embedder (folder or Hub name) for inference: in eval mode on `device` (default: CUDA if any).

    Args:
        name_or_path: a folder written by `save_pretrained` (full or LoRA adapter), a backbone, or a Hub name.
        kind: `"auto"` (detected), `"bge_m3"` or `"decoder"` (`"bge-m3"` and `"qwen3"` are the same kinds).
        device: where the weights go.
        trust_remote_code: passed to transformers for backbones with custom code.

    A BGE-M3 folder loads its heads when it has them and is dense-only otherwise (`model.has_heads`).
    """
    path = str(name_or_path)
    kind = resolve_embedder_kind(kind)
    if kind == "auto":
        kind = detect_embedder_kind(path, trust_remote_code=trust_remote_code)
    model: RetrieverModule
    if kind == "bge_m3":
        from ark_hf.models.bge_m3 import BGEM3Model

        model = BGEM3Model(path, unified_finetuning=False, trust_remote_code=trust_remote_code)
    else:
        from ark_hf.models.decoder import DecoderEmbedder

        model = DecoderEmbedder.from_pretrained(path, trust_remote_code=trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
