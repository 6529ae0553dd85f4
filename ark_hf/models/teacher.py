"""Online teachers: score each query's group under `no_grad` when the data carries no teacher scores."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig
from transformers.utils import logging

from ark_hf.models.checks import find_model_file

logger = logging.get_logger(__name__)

__all__ = ["TeacherScorer", "detect_teacher_kind"]


def detect_teacher_kind(model_name_or_path: str, trust_remote_code: bool = False) -> str:
    """`"cross-encoder"` or `"bi-encoder"`, from the sentence-transformers files or else the architecture.

    sentence-transformers >= 5 saves cross-encoders with `modules.json` too, so that file alone does not make a
    bi-encoder: its `config_sentence_transformers.json` says `"model_type": "CrossEncoder"`.
    """
    st_config_file = find_model_file(model_name_or_path, "config_sentence_transformers.json")
    if st_config_file is not None:
        with open(st_config_file, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
        if model_type == "CrossEncoder":
            return "cross-encoder"
        if model_type is not None:
            return "bi-encoder"
    if find_model_file(model_name_or_path, "modules.json") is not None:
        return "bi-encoder"
    architectures = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code).architectures
    return "cross-encoder" if any("SequenceClassification" in a for a in architectures or []) else "bi-encoder"


class TeacherScorer:
    """Scores (query, passage) pairs with a frozen teacher.

    A cross-encoder (a sequence-classification model, e.g. `BAAI/bge-reranker-v2-m3`) gives its raw
    logit per pair, as FlagEmbedding's `add_reranker_score.py` writes them; a bi-encoder (any
    sentence-transformers model) gives the cosine similarity of the two embeddings.

    Args:
        model_name_or_path: Hub name or local folder.
        kind: `"cross-encoder"`, `"bi-encoder"`, or `"auto"` (see `detect_teacher_kind`).
        max_length: maximum tokens per pair (cross-encoder) or text (bi-encoder).
        batch_size: pairs or texts per forward pass.
        device: where the teacher runs (the student's device by default).
        trust_remote_code: allow custom modelling code.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        kind: str = "auto",
        max_length: int = 512,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if kind == "auto":
            kind = detect_teacher_kind(model_name_or_path, trust_remote_code=trust_remote_code)
        if kind not in ("cross-encoder", "bi-encoder"):
            raise ValueError(f"teacher kind must be 'cross-encoder', 'bi-encoder' or 'auto', got {kind!r}")
        self.kind = kind
        self.batch_size = batch_size
        device = str(device) if device is not None else None
        if kind == "cross-encoder":
            from sentence_transformers import CrossEncoder

            self.model = CrossEncoder(
                model_name_or_path, max_length=max_length, device=device, trust_remote_code=trust_remote_code
            )
        else:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(model_name_or_path, device=device, trust_remote_code=trust_remote_code)
            self.model.max_seq_length = max_length
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        logger.info("online teacher %s loaded as a %s", model_name_or_path, kind)

    @torch.no_grad()
    def score(self, queries: list[str], passages: list[str]) -> torch.Tensor:
        """Teacher scores `[B, G]` for B queries and their B*G passages (groups flattened, in order)."""
        group = len(passages) // len(queries)
        if group * len(queries) != len(passages):
            raise ValueError(f"{len(passages)} passages do not split into groups of {len(queries)} queries")
        if self.kind == "cross-encoder":
            pairs = [(queries[i // group], passage) for i, passage in enumerate(passages)]
            scores = self.model.predict(
                pairs,
                batch_size=self.batch_size,
                activation_fn=torch.nn.Identity(),
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        else:
            q = self.model.encode(
                queries, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
            )
            p = self.model.encode(
                passages, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
            )
            scores = (q.repeat_interleave(group, dim=0) * p).sum(-1)
        return scores.float().view(len(queries), group)
