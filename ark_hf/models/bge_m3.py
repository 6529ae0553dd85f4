"""BGE-M3: one encoder, three retrieval heads (dense, sparse/lexical, ColBERT multi-vector).

The model turns tokens into per-text outputs (`EmbeddingOutput`); it knows nothing about negatives or
losses (`ark_hf.losses.m3` turns outputs into scores and losses). Saving always writes what
FlagEmbedding's `BGEM3FlagModel` and `SentenceTransformer` need, and loading never silently replaces a
missing head with a random one.

Reference: Chen et al., "BGE M3-Embedding: Multi-Lingual, Multi-Functionality, Multi-Granularity Text
Embeddings Through Self-Knowledge Distillation", arXiv 2402.03216.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import logging

from ark_hf.models.backbone import load_encoder_backbone
from ark_hf.models.checks import (
    ModelFileError,
    check_checkpoint_matches,
    check_tokenizer,
    check_weight_files,
    find_model_file,
    load_head_state,
    read_json_file,
)
from ark_hf.models.outputs import (
    M3_HEADS,
    EmbeddingOutput,
    RetrieverModule,
    fields_of_heads,
    heads_of_fields,
)
from ark_hf.models.packing import (
    PackedBatch,
    PaddingFreeMixin,
)
from ark_hf.models.st_layout import write_sentence_transformers_layout

logger = logging.get_logger(__name__)

COLBERT_FILE = "colbert_linear.pt"
SPARSE_FILE = "sparse_linear.pt"
HEADS_INFO_FILE = "m3_heads.json"
POOLINGS = ("cls", "mean", "last_token")


class MissingHeadsError(FileNotFoundError):
    """A folder or Hub model lacks the sparse/ColBERT head files that the caller asked for."""


def _load_checked_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, refused (before the weights load) when it cannot be the model's."""
    from transformers import AutoConfig

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    vocab_size = getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "vocab_size", None)
    check_tokenizer(tokenizer, vocab_size=vocab_size, folder=name if os.path.isdir(name) else None)
    return tokenizer


def sparse_unused_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids whose sparse weight is 0: the tokenizer's CLS, EOS, PAD and UNK tokens, those it has.

    The same set as FlagEmbedding's `BGEM3FlagModel` (inference) and its fine-tuning model, for any vocabulary:
    with XLM-R's (BGE-M3) `</s>` is the EOS and is dropped; a BERT vocabulary has no EOS, so `[SEP]` keeps its
    weight there, as does every other special token (`[MASK]`, `<mask>`, added tokens).
    """
    ids = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return sorted({token_id for token_id in ids if token_id is not None})


class BGEM3Model(PaddingFreeMixin, RetrieverModule):
    """An encoder backbone with BGE-M3's dense, sparse and ColBERT heads.

    With `H` the last hidden states `[N, L, d]` and `M` the attention mask:

    - dense: `normalize(H[:, 0])` (CLS, each text's first token; `mean` and `last_token` pooling optional);
    - sparse: `w_t = relu(sparse_linear(H_t))` per token, set to 0 on padding and on the tokenizer's CLS, EOS,
      PAD and UNK ids (`sparse_unused_token_ids`: FlagEmbedding's set, so BERT's `[SEP]` keeps its weight); the
      lexical score of two texts sums `w_q(t) * w_p(t)` over shared token ids (max over repeats);
    - ColBERT: `normalize(colbert_linear(H[:, 1:]) * M[:, 1:])` (CLS skipped, final `</s>` kept).

    Args:
        model_name: Hub name or local folder of the backbone (any `AutoModel` encoder) or of a saved
            BGE-M3 model (backbone + `colbert_linear.pt` + `sparse_linear.pt`). `model_name_or_path` is
            an alias.
        unified_finetuning: Train all three heads. When False only the dense head is trained; heads
            found on disk are still loaded and saved back unchanged.
        colbert_dim: Output size of a freshly initialised ColBERT head (`-1`: the hidden size).
        pooling: Dense pooling, one of `cls` (BGE-M3), `mean`, `last_token`; `None` reads it from a folder saved
            by ark_hf (`m3_heads.json`) and otherwise uses `cls`.
        normalize: L2-normalise dense and ColBERT vectors.
        init_missing_heads: What to do when the head files are missing and the heads are needed. False
            (default) raises `MissingHeadsError`; True starts them from random initialisation, the usual
            choice when the backbone is a plain encoder (e.g. `xlm-roberta-large` or MiniLM).
        torch_dtype, attn_implementation, trust_remote_code: passed to `AutoModel.from_pretrained`.
        backbone, tokenizer: already loaded objects to use instead of loading `model_name`.
        padding_free: Run the backbone on the batch's real tokens only, all texts packed into one sequence
            (`ark_hf.models.packing`); same outputs as the padded forward. The varlen attention kernel needs
            CUDA and bf16/fp16; elsewhere attention falls back to an exact per-text SDPA (one warning).
            `"auto"` decides from the weights' device and dtype now; a trainer sets the switch from its config's
            `padding_free` (default `auto`: on with CUDA and bf16/fp16) on whatever model it is given.
    """

    def __init__(
        self,
        model_name: str | None = None,
        *,
        model_name_or_path: str | None = None,
        unified_finetuning: bool = True,
        colbert_dim: int = -1,
        pooling: str | None = None,
        normalize: bool = True,
        init_missing_heads: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        backbone: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        padding_free: bool | str = False,
    ) -> None:
        super().__init__()
        self._pooler_state: dict[str, torch.Tensor] = {}
        name = model_name if model_name is not None else model_name_or_path
        if name is None and backbone is None:
            raise ValueError("BGEM3Model needs `model_name` (a Hub name or a local folder) or a `backbone`")
        if pooling is None:
            pooling = self._saved_info(name).get("pooling", "cls") if name is not None else "cls"
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name_or_path = name if name is not None else backbone.config.name_or_path
        # the fields computed in training: all heads, or dense only; the trainer sets them from its loss
        self.training_outputs = fields_of_heads(M3_HEADS if unified_finetuning else ("dense",))
        self.pooling = pooling
        self.normalize = normalize

        if backbone is None and tokenizer is None:  # the tokenizer is checked before any weights load
            tokenizer = _load_checked_tokenizer(name, trust_remote_code)
        if backbone is None:
            check_weight_files(name)  # truncated safetensors: named here, not deep inside safetensors
            load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if torch_dtype is not None:
                load_kwargs["dtype"] = torch_dtype
            if attn_implementation is not None:
                load_kwargs["attn_implementation"] = attn_implementation
            # BERT-style encoders carry a pooler no head uses: loaded without it, its weights saved back unchanged
            backbone, self._pooler_state = load_encoder_backbone(name, **load_kwargs)
        model_type = getattr(backbone.config, "model_type", "")
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise ValueError(
                f"{self.name_or_path} is a decoder ({model_type}); BGE-M3 needs a bidirectional encoder such as "
                "XLM-R. Decoder embedders train with QwenTrainer / DecoderEmbedder."
            )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                name or backbone.config.name_or_path, trust_remote_code=trust_remote_code
            )
        self.model = backbone
        self.tokenizer = tokenizer
        self.config = backbone.config
        hidden = backbone.config.hidden_size

        self.colbert_linear: nn.Linear | None = None
        self.sparse_linear: nn.Linear | None = None
        self.heads_trained = False
        colbert_file = find_model_file(self.name_or_path, COLBERT_FILE) if name is not None else None
        sparse_file = find_model_file(self.name_or_path, SPARSE_FILE) if name is not None else None
        if colbert_file and sparse_file:
            colbert_state = load_head_state(colbert_file, hidden_size=hidden)
            sparse_state = load_head_state(sparse_file, hidden_size=hidden, out_features=1)
            self.colbert_linear = nn.Linear(hidden, colbert_state["weight"].shape[0])
            self.sparse_linear = nn.Linear(hidden, 1)
            self.colbert_linear.load_state_dict(colbert_state)
            self.sparse_linear.load_state_dict(sparse_state)
            self.heads_trained = self._read_heads_info(name)
        elif unified_finetuning or init_missing_heads:
            missing = [f for f, found in ((COLBERT_FILE, colbert_file), (SPARSE_FILE, sparse_file)) if not found]
            if not init_missing_heads:
                raise MissingHeadsError(
                    f"{self.name_or_path}: missing {', '.join(missing)}; the sparse and ColBERT heads cannot be "
                    "loaded. Pass BGEM3Model(..., init_missing_heads=True) to start them from random "
                    "initialisation (usual when the backbone is a plain encoder), or let the trainer build the model "
                    "from its config (BGETrainer(config=config) with `init_missing_heads: true`), or point "
                    "model_name at a folder that has both files."
                )
            logger.warning(
                "%s: no %s; initialising the sparse and ColBERT heads randomly (init_missing_heads=True)",
                self.name_or_path,
                " or ".join(missing),
            )
            self.colbert_linear = nn.Linear(hidden, hidden if colbert_dim <= 0 else colbert_dim)
            self.sparse_linear = nn.Linear(hidden, 1)
        if self.colbert_linear is not None and backbone.dtype != torch.float32:
            self.colbert_linear.to(backbone.dtype)
            self.sparse_linear.to(backbone.dtype)

        unused_ids = sparse_unused_token_ids(tokenizer)
        self.register_buffer("sparse_unused_ids", torch.tensor(unused_ids, dtype=torch.long), persistent=False)
        self.padding_free = padding_free

    def _sparse_unused_ids(self, device: torch.device) -> torch.Tensor:
        """The ids the sparse head drops, on `device`. ZeRO-3 builds the model under `zero.Init` and moves only
        parameters, so this non-persistent buffer can still be on the CPU when the engine runs the forward."""
        if self.sparse_unused_ids.device != device:
            self.sparse_unused_ids = self.sparse_unused_ids.to(device)
        return self.sparse_unused_ids

    @staticmethod
    def _saved_info(path: str) -> dict[str, Any]:
        info_file = find_model_file(path, HEADS_INFO_FILE)
        if info_file is None:
            return {}
        expected = 'an object such as {"has_heads": true, "heads_trained": true, "pooling": "cls"}'
        info = read_json_file(info_file, expected)
        if not isinstance(info, dict):
            raise ModelFileError(f"{info_file}: holds a {type(info).__name__}; expected {expected}")
        return info

    @classmethod
    def _read_heads_info(cls, path: str) -> bool:
        # released BGE-M3 checkpoints ship trained heads without our info file
        trained = bool(cls._saved_info(path).get("heads_trained", True))
        if not trained:
            logger.warning("%s: the sparse and ColBERT heads in this folder were never trained", path)
        return trained

    @property
    def has_heads(self) -> bool:
        return self.colbert_linear is not None and self.sparse_linear is not None

    @property
    def unified_finetuning(self) -> bool:
        """Whether training computes the sparse and ColBERT heads (some loss reads them); setting it asks for all
        three heads (True) or the dense vectors only (False)."""
        return heads_of_fields(self.training_outputs) != ("dense",)

    @unified_finetuning.setter
    def unified_finetuning(self, value: bool) -> None:
        self.training_outputs = fields_of_heads(M3_HEADS if value else ("dense",))

    def set_training_outputs(self, fields: Sequence[str]) -> None:
        """Compute in training what the loss reads (`RetrievalLoss.heads`): the heads when it reads any of their
        fields (evaluation and inference always use the heads that exist)."""
        unknown = [field for field in fields if field not in EmbeddingOutput.__dataclass_fields__]
        if unknown:
            raise ValueError(f"the loss reads {unknown}, which are not EmbeddingOutput fields")
        heads = heads_of_fields(fields)
        if heads != ("dense",) and not self.has_heads:
            raise ValueError(
                f"the loss reads the {' and '.join(h for h in heads if h != 'dense')} head(s) but {self.name_or_path} "
                "has no sparse/ColBERT heads; build the model with heads (init_missing_heads=True) or train dense only"
            )
        self.training_outputs = fields_of_heads(heads)

    # ----------------------------------------------------------------------------------------------- training
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Non-reentrant by default: several forward passes per step then work under DDP."""
        kwargs = (
            {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        )
        self.model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()

    def freeze_encoder(self) -> None:
        """`fix_encoder`: only the sparse and ColBERT heads stay trainable."""
        if not self.has_heads:
            raise ValueError("fix_encoder trains only the sparse and ColBERT heads, but this model has none")
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Tokenize texts as training does (special tokens added, truncated to `max_length`): `text_tokenizer()`."""
        return dict(self.text_tokenizer()(texts, max_length))

    def encode_features(self, features: dict[str, torch.Tensor]) -> EmbeddingOutput:
        """Run the backbone on tokenized texts and apply the heads.

        Left and right padding give the same outputs: the CLS is each text's first real token, and the
        ColBERT mask drops it wherever it sits. With `padding_free` the backbone runs packed and only the
        per-token head outputs are scattered back into the padded `[N, L]` / `[N, L - 1, d]` layout.
        """
        if self.padding_free:
            return self.encode_packed([features])[0]
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in features:
            inputs["token_type_ids"] = features["token_type_ids"]
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        dense = self._pool(hidden, attention_mask)
        if self.normalize:
            dense = F.normalize(dense, dim=-1)
        # dense-only training skips the heads; evaluation and inference use them whenever they exist
        if not self.has_heads or (self.training and not self.unified_finetuning):
            return EmbeddingOutput(dense=dense)
        keep = attention_mask.bool() & ~torch.isin(input_ids, self._sparse_unused_ids(input_ids.device))
        sparse_weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1) * keep.to(hidden.dtype)
        # ColBERT skips each text's first token (the CLS): position 0 with right padding
        rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        token_mask = attention_mask.clone()
        token_mask[rows, attention_mask.to(torch.int8).argmax(1)] = 0
        colbert_mask = token_mask[:, 1:]
        colbert = self.colbert_linear(hidden[:, 1:]) * colbert_mask.unsqueeze(-1).to(hidden.dtype)
        if self.normalize:
            colbert = F.normalize(colbert, dim=-1)
        return EmbeddingOutput(
            dense=dense,
            sparse_weights=sparse_weights,
            input_ids=input_ids,
            colbert=colbert,
            colbert_mask=colbert_mask,
        )

    def packed_outputs(self, features: dict[str, Any], packed: PackedBatch, hidden: torch.Tensor) -> EmbeddingOutput:
        """`encode_features`' heads on the packed real tokens' hidden states (`[T, d]`)."""
        input_ids, attention_mask = features["input_ids"], features["attention_mask"]
        dense = packed.pool(hidden, self.pooling)
        if self.normalize:
            dense = F.normalize(dense, dim=-1)
        if not self.has_heads or (self.training and not self.unified_finetuning):
            return EmbeddingOutput(dense=dense)
        token_ids = packed.input_ids[0]
        keep = ~torch.isin(token_ids, self._sparse_unused_ids(token_ids.device))
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1) * keep.to(hidden.dtype)
        colbert_keep = ~packed.is_first_token()
        colbert = self.colbert_linear(hidden) * colbert_keep.unsqueeze(-1).to(hidden.dtype)
        if self.normalize:
            colbert = F.normalize(colbert, dim=-1)
        colbert_mask = packed.repad(colbert_keep.to(attention_mask.dtype))[:, 1:]
        return EmbeddingOutput(
            dense=dense,
            sparse_weights=packed.repad(sparse),
            input_ids=input_ids,
            colbert=packed.repad(colbert)[:, 1:],
            colbert_mask=colbert_mask,
        )

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":  # each text's first real token (position 0 with right padding)
            first = attention_mask.to(torch.int8).argmax(1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        # last real token, found from the mask so that left and right padding both work
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    # ---------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(
        self,
        texts: str | list[str],
        *,
        batch_size: int = 32,
        max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        device: str | torch.device | None = None,
    ) -> dict[str, Any]:
        """Embed texts like FlagEmbedding's `BGEM3FlagModel.encode`.

        Returns a dict with `dense_vecs` (`[N, d]` array), `lexical_weights` (one `{token_id_str: weight}`
        dict per text, the `sparse_unused_token_ids` and zero weights dropped) and `colbert_vecs` (one `[n_tokens - 1, d]`
        array per text), each present when asked for.
        """
        if isinstance(texts, str):
            texts = [texts]
        if (return_sparse or return_colbert_vecs) and not self.has_heads:
            raise MissingHeadsError(f"{self.name_or_path}: this model has no sparse/ColBERT heads")
        was_training = self.training
        self.eval()
        device = torch.device(device) if device is not None else next(self.parameters()).device
        dense, lexical, colbert = [], [], []
        try:
            for start in range(0, len(texts), batch_size):
                features = self.tokenize(texts[start : start + batch_size], max_length)
                out = self.encode_features({k: v.to(device) for k, v in features.items()})
                if return_dense:
                    dense.append(out.dense.float().cpu().numpy())
                if return_sparse:
                    for ids, weights in zip(out.input_ids.cpu().tolist(), out.sparse_weights.float().cpu().tolist()):
                        entry: dict[str, float] = {}
                        for token_id, weight in zip(ids, weights):
                            if weight > 0 and weight > entry.get(str(token_id), 0.0):
                                entry[str(token_id)] = weight
                        lexical.append(entry)
                if return_colbert_vecs:
                    lengths = out.colbert_mask.sum(1).cpu().tolist()
                    for vecs, n in zip(out.colbert.float().cpu().numpy(), lengths):
                        colbert.append(vecs[: int(n)])
        finally:
            self.train(was_training)
        result: dict[str, Any] = {}
        if return_dense:
            result["dense_vecs"] = np.concatenate(dense) if dense else np.zeros((0, self.config.hidden_size))
        if return_sparse:
            result["lexical_weights"] = lexical
        if return_colbert_vecs:
            result["colbert_vecs"] = colbert
        return result

    @staticmethod
    def lexical_matching_score(weights_a: dict[str, float], weights_b: dict[str, float]) -> float:
        return float(sum(w * weights_b[t] for t, w in weights_a.items() if t in weights_b))

    @staticmethod
    def colbert_score(q_vecs: np.ndarray, p_vecs: np.ndarray) -> float:
        return float((q_vecs @ p_vecs.T).max(axis=1).mean())

    def compute_score(
        self,
        pairs: list[tuple[str, str]],
        *,
        weights: tuple[float, float, float] = (1.0, 0.3, 1.0),
        batch_size: int = 32,
        max_query_length: int = 512,
        max_passage_length: int = 512,
    ) -> dict[str, list[float]]:
        """Scores of (query, passage) pairs for each mode: dense, sparse, colbert, sparse+dense, all.

        The combined modes are weighted sums normalised by the weights used (FlagEmbedding's convention).
        """
        queries = [q for q, _ in pairs]
        passages = [p for _, p in pairs]
        modes = {"return_dense": True, "return_sparse": self.has_heads, "return_colbert_vecs": self.has_heads}
        q_out = self.encode(queries, batch_size=batch_size, max_length=max_query_length, **modes)
        p_out = self.encode(passages, batch_size=batch_size, max_length=max_passage_length, **modes)
        scores: dict[str, list[float]] = {"dense": (q_out["dense_vecs"] * p_out["dense_vecs"]).sum(1).tolist()}
        if self.has_heads:
            w_dense, w_sparse, w_colbert = weights
            scores["sparse"] = [
                self.lexical_matching_score(a, b) for a, b in zip(q_out["lexical_weights"], p_out["lexical_weights"])
            ]
            scores["colbert"] = [
                self.colbert_score(a, b) for a, b in zip(q_out["colbert_vecs"], p_out["colbert_vecs"])
            ]
            scores["sparse+dense"] = [
                (w_dense * d + w_sparse * s) / (w_dense + w_sparse) for d, s in zip(scores["dense"], scores["sparse"])
            ]
            scores["colbert+sparse+dense"] = [
                (w_dense * d + w_sparse * s + w_colbert * c) / (w_dense + w_sparse + w_colbert)
                for d, s, c in zip(scores["dense"], scores["sparse"], scores["colbert"])
            ]
        return scores

    # ------------------------------------------------------------------------------------------ save / load
    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> BGEM3Model:
        """Load a saved model; all three heads are restored exactly (missing heads raise unless told)."""
        return cls(model_name=path, **kwargs)

    _no_split_modules = property(lambda self: list(getattr(self.model, "_no_split_modules", None) or []))  # FSDP wrap

    def save_pretrained(self, output_dir: str | os.PathLike, *, max_seq_length: int = 512, **kwargs: Any) -> None:
        """Write a folder that FlagEmbedding, sentence-transformers and `from_pretrained` all load.

        Files: the backbone (`config.json`, `model.safetensors`), the tokenizer, `colbert_linear.pt` and
        `sparse_linear.pt` (always, when the model has heads), `m3_heads.json`, and the
        sentence-transformers modules for the dense head (Transformer -> Pooling -> Normalize).
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        full_state = kwargs.pop("state_dict", None)  # a gathered wrapper state dict (e.g. from ZeRO-3)
        parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "colbert_linear": {}, "sparse_linear": {}}
        if full_state is not None:
            for key, value in full_state.items():
                prefix, _, rest = key.partition(".")
                if prefix in parts:
                    parts[prefix][rest] = value
            kwargs["state_dict"] = parts["model"]
        if self._pooler_state:  # so that other loaders, which build the pooler, find its weights
            kwargs["state_dict"] = {**kwargs.get("state_dict", self.model.state_dict()), **self._pooler_state}
        self.model.save_pretrained(output_dir, **kwargs)
        self.tokenizer.save_pretrained(output_dir)
        if self.has_heads:
            for module, filename in ((self.colbert_linear, COLBERT_FILE), (self.sparse_linear, SPARSE_FILE)):
                head_state = parts[filename.removesuffix(".pt")] or module.state_dict()
                state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in head_state.items()}
                torch.save(state, output_dir / filename)
        heads_trained = self.heads_trained or (self.unified_finetuning and self.has_heads)
        info = {"has_heads": self.has_heads, "heads_trained": heads_trained, "pooling": self.pooling}
        (output_dir / HEADS_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        pooling_modes = {"cls": "cls_token", "mean": "mean_tokens", "last_token": "lasttoken"}
        write_sentence_transformers_layout(
            output_dir,
            hidden_size=self.config.hidden_size,
            pooling_mode=pooling_modes[self.pooling],
            normalize=self.normalize,
            max_seq_length=max_seq_length,
        )

    def load_weights_from(self, path: str | os.PathLike) -> None:
        """Restore backbone and head weights in place from a folder written by `save_pretrained`."""
        check_checkpoint_matches(path, self.config)  # another model's checkpoint: named, before any load
        reloaded = type(self).from_pretrained(
            str(path), unified_finetuning=self.unified_finetuning, pooling=self.pooling, normalize=self.normalize,
            init_missing_heads=not self.has_heads, tokenizer=self.tokenizer,
        )  # fmt: skip
        self.model.load_state_dict(reloaded.model.state_dict())
        if self.has_heads:
            self.colbert_linear.load_state_dict(reloaded.colbert_linear.state_dict())
            self.sparse_linear.load_state_dict(reloaded.sparse_linear.state_dict())
