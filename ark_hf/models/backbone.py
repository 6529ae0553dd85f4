"""Loading an encoder backbone without its pooler, and giving the pooler's weights back when saving.

BERT-style encoders (BERT, MiniLM, XLM-R) carry a pooler (`pooler.dense`) that no BGE-M3 head uses: the backbone
is loaded without it, since DDP would see parameters without gradients. The pooler's checkpoint weights are kept
aside, unchanged, and written back by `save_pretrained`: sentence-transformers and FlagEmbedding build the pooler
when they load a folder, and would otherwise report it missing and initialise it randomly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoModel, PreTrainedModel
from transformers.utils import logging

from ark_hf.models.checks import find_model_file
from ark_hf.utils.quiet import quiet_load_report

logger = logging.get_logger(__name__)

POOLER_PREFIX = "pooler."


def checkpoint_tensors(name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose name starts with `prefix` in a model's safetensors weights (one file or shards)."""
    from safetensors import safe_open

    index_file = find_model_file(name, "model.safetensors.index.json")
    if index_file is not None:
        with open(index_file, encoding="utf-8") as handle:
            weight_map: dict[str, str] = json.load(handle).get("weight_map", {})
        shards = sorted({shard for key, shard in weight_map.items() if key.startswith(prefix)})
    else:
        shards = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = find_model_file(name, shard)
        if path is None:
            continue
        with safe_open(path, framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)})
    return tensors


def load_encoder_backbone(name: str, **load_kwargs: Any) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """`AutoModel.from_pretrained(name)` without the pooler; returns (backbone, the pooler's checkpoint tensors).

    transformers' report of the left-out pooler is not shown; anything else the load found (missing, unexpected
    or resized weights) is logged as one warning.
    """
    with quiet_load_report():
        try:
            backbone, info = AutoModel.from_pretrained(
                name, add_pooling_layer=False, output_loading_info=True, **load_kwargs
            )
        except TypeError:  # an encoder class without a pooler option
            backbone, info = AutoModel.from_pretrained(name, output_loading_info=True, **load_kwargs)
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.startswith(POOLER_PREFIX))
    found = {
        "missing (initialised randomly)": sorted(info["missing_keys"]),
        "unexpected (not loaded)": unexpected,
        "of another shape (initialised randomly)": sorted(str(entry[0]) for entry in info["mismatched_keys"]),
    }
    problems = [f"{what}: {', '.join(keys)}" for what, keys in found.items() if keys]
    if problems:
        logger.warning("%s: weights %s", name, "; ".join(problems))
    has_pooler = any(key.startswith(POOLER_PREFIX) for key in info["unexpected_keys"])
    return backbone, checkpoint_tensors(name, POOLER_PREFIX) if has_pooler else {}
