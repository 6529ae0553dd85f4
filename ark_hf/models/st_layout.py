"""The sentence-transformers folder layout (Transformer -> Pooling -> Normalize), written next to a saved model.

The legacy class paths (`sentence_transformers.models.*`) are read by sentence-transformers 2.7 to 6.x. No
`modality_config` goes into `sentence_bert_config.json` on purpose: sentence-transformers 6 then treats the
module as text-only (inferring modalities would find a chat template, e.g. Qwen's, and wrap every text in chat
messages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_sentence_transformers_layout"]

POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")


def write_sentence_transformers_layout(
    output_dir: str | Path,
    *,
    hidden_size: int,
    pooling_mode: str,
    normalize: bool,
    max_seq_length: int,
    prompts: dict[str, str] | None = None,
) -> None:
    """Write `modules.json`, `1_Pooling/`, `2_Normalize/` (when normalising) and the sentence-transformers configs.

    Args:
        output_dir: the folder that already holds the backbone and tokenizer (module 0 lives at its root).
        hidden_size: the backbone's hidden size (the pooled dimension).
        pooling_mode: one of `POOLING_MODES` (e.g. `cls_token` for BGE-M3, `lasttoken` for Qwen3-Embedding).
        normalize: add the Normalize module (cosine similarity) or not (dot product).
        max_seq_length: sentence-transformers truncates every text to this many tokens.
        prompts: named prompts (e.g. `{"query": "Instruct: ...\\nQuery:", "document": ""}`).
    """
    if pooling_mode not in POOLING_MODES:
        raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {pooling_mode!r}")
    output_dir = Path(output_dir)
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
        (output_dir / "2_Normalize").mkdir(exist_ok=True)
    pooling: dict[str, Any] = {"word_embedding_dimension": hidden_size}
    pooling.update({f"pooling_mode_{mode}": mode == pooling_mode for mode in POOLING_MODES})
    pooling["include_prompt"] = True
    (output_dir / "1_Pooling").mkdir(exist_ok=True)
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "prompts": prompts or {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if normalize else "dot",
        },
    }
    for name, content in files.items():
        (output_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
