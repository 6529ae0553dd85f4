"""Padding-free (packed) forward passes: every text of a call in one sequence, no compute spent on padding.

A padded batch `[N, L]` of texts with lengths `l_1..l_N` costs `N * L` token positions in every layer; on
long-tailed text about half of them are padding. The packed form concatenates the real tokens into one
sequence `[1, T]`, `T = sum_i l_i`, with

- per-text position ids (`0..l_i - 1` for RoPE decoders, `padding_idx + 1 + (0..l_i - 1)` for XLM-R/RoBERTa,
  exactly what the padded forward computes for each text);
- `cu_seqlens = [0, l_1, l_1 + l_2, ..., T]` (int32), the text boundaries, passed to every attention layer
  as transformers' `cu_seq_lens_q/k` and `max_length_q/k` keyword arguments (the names its
  `flash_attention_2` padding-free path uses).

Attention stays inside each text (bidirectional for encoders, causal for decoders). It runs through a
transformers attention implementation registered by `enable_padding_free` (`AttentionInterface.register`):

- on CUDA with fp16/bf16 tensors: `torch.nn.attention.varlen.varlen_attn`, torch's own variable-length
  flash kernel (`window_size=(-1, 0)` for causal layers);
- when the backbone was loaded with `attn_implementation="flash_attention_2"` (or 3/4): that kernel, which
  reads the same keyword arguments;
- elsewhere (CPU, no varlen kernel, fp32): an exact fallback that scatters the packed q/k/v of each layer into
  `[N, heads, max_len, dim]` and calls `scaled_dot_product_attention` with the per-text mask. The rest of the
  layer (projections, MLP, norms), which dominates the cost, still runs on the `T` real tokens only. The first
  packed call that takes the fallback logs one warning naming the switch (`padding_free`).

Calls without `cu_seq_lens_q` (an ordinary padded forward of the same backbone) go to the implementation the
backbone had before, with the mask that implementation expects, so switching `padding_free` on never
changes the padded path.

The heads read the packed hidden states `[T, d]` directly: CLS / mean / last-token pooling index or reduce
per segment, sparse weights and ColBERT vectors are computed per token. Only the small per-token head outputs
are scattered back into the `[N, L]` / `[N, L - 1, d_colbert]` layout the losses consume (`PackedBatch.repad`).

Example:
    ```python
    model = BGEM3Model("BAAI/bge-m3", padding_free=True)
    out = model.encode_features(model.tokenize(texts, max_length=512))  # same outputs as padded
    ```
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from ark_hf.models.outputs import EmbeddingOutput, RetrieverOutput

logger = logging.get_logger(__name__)

__all__ = [
    "PACKED_ATTENTION_PREFIX",
    "PackedBatch",
    "PaddingFreeMixin",
    "PACKING_KEY",
    "PADDING_FREE_CHOICES",
    "enable_padding_free",
    "disable_padding_free",
    "normalize_padding_free",
    "padding_free_unsupported",
    "padding_free_unsupported_before_load",
    "resolve_padding_free",
    "packed_attention_forward",
    "packed_hidden_states",
    "packing_index",
    "position_offset",
    "varlen_attention_available",
]

PACKED_ATTENTION_PREFIX = "ark_packed_"
SWITCH_NAME = "padding_free"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the installed torch
    _varlen_attn = None

_VARLEN_HAS_GQA = _varlen_attn is not None and "enable_gqa" in inspect.signature(_varlen_attn).parameters
_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
# True while `packed_hidden_states` runs a backbone: its mask builders then return no mask (cu_seqlens carry
# the boundaries) instead of a dense [T, T] one
_PACKED_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("ark_hf_packed_call", default=False)
_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


def varlen_attention_available(device: torch.device | str | None = None) -> bool:
    """Whether `torch.nn.attention.varlen.varlen_attn` exists in this torch and can run on `device` (CUDA)."""
    if _varlen_attn is None:
        return False
    device = torch.device("cuda" if device is None else device)
    return device.type == "cuda" and torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------- packed batch
PACKING_KEY = "packing"


def packing_index(attention_mask: torch.Tensor) -> dict[str, Any]:
    """Where each real token of a padded batch goes in the packed sequence: the index `PackedBatch` is built on.

    Everything here depends on the attention mask only, and reading it needs the host (sizes, the check, the
    boolean mask's nonzero positions). The collator computes it on the CPU tensors it has just built (key
    `"packing"` of each features dict, `RetrievalCollator(packing_index=True)`), so the training step runs
    without a device-to-host synchronisation; on a device tensor it costs a few.

    Returns:
        `flat_index` `[T]` int64 (row-major positions of the real tokens in `[N, L]`), `cu_seqlens` `[N + 1]`
        int32, `segment_ids` `[T]` int64, `positions` `[T]` int64 (per-text, from 0), `max_length` (int).
    """
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    # contiguous rows: the span from the first to the last real token holds no padding
    first = mask.to(torch.int8).argmax(1)
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(1)
    bad_rows = (lengths == 0) | (last - first + 1 != lengths)
    if bool(bad_rows.any()):
        rows = bad_rows.nonzero().flatten().tolist()[:5]
        raise ValueError(
            f"padding_free: texts {rows} have an empty or non-contiguous attention_mask; each text needs at "
            "least one token and only leading or trailing padding"
        )
    flat_index = mask.flatten().nonzero().squeeze(1)
    total = flat_index.numel()
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    segment_ids = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=mask.device), lengths, output_size=total
    )
    positions = torch.arange(total, device=mask.device) - cu_seqlens[:-1].long()[segment_ids]
    return {
        "flat_index": flat_index,
        "cu_seqlens": cu_seqlens,
        "segment_ids": segment_ids,
        "positions": positions,
        "max_length": int(lengths.max()),
    }


@dataclass
class PackedBatch:
    """N texts packed into one sequence of T real tokens.

    Attributes:
        input_ids: `[1, T]` the texts' tokens, one after the other.
        position_ids: `[1, T]` position of each token in its own text, plus `offset`.
        cu_seqlens: `[N + 1]` int32 cumulative lengths, `cu_seqlens[i]` = first token of text i.
        max_length: the longest text (a Python int, as the kernels want it).
        lengths: `[N]` int64 text lengths.
        flat_index: `[T]` int64, where each packed token sits in the row-major padded layout `[N * L]` it came
            from, used to scatter head outputs back.
        padded_shape: `(N, L)`.
        segment_ids: `[T]` int64 index of the text of each token.
        token_type_ids: `[1, T]` packed token types, when the padded batch had them.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    lengths: torch.Tensor
    flat_index: torch.Tensor
    padded_shape: tuple[int, int]
    segment_ids: torch.Tensor
    token_type_ids: torch.Tensor | None = None

    @classmethod
    def from_padded(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        offset: int = 0,
        token_type_ids: torch.Tensor | None = None,
        index: dict[str, Any] | None = None,
    ) -> PackedBatch:
        """Pack a padded batch (left or right padding) by dropping the positions whose mask is 0.

        Args:
            input_ids: `[N, L]` token ids.
            attention_mask: `[N, L]` 1 for real tokens; each row's real tokens must be contiguous (any padding
                side) and at least one.
            offset: first position id of every text (`padding_idx + 1` for XLM-R, 0 for RoPE models).
            token_type_ids: `[N, L]` optional token types, packed the same way.
            index: `packing_index(attention_mask)` computed beforehand (by the collator, on the host) and moved
                to the batch's device; computed here when absent.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [N, L]"
            )
        if index is None:
            index = packing_index(attention_mask)
        flat_index, cu_seqlens = index["flat_index"], index["cu_seqlens"]
        positions = index["positions"] + offset if offset else index["positions"]
        return cls(
            input_ids=input_ids.flatten()[flat_index].unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            cu_seqlens=cu_seqlens,
            max_length=int(index["max_length"]),
            lengths=cu_seqlens.diff().long(),
            flat_index=flat_index,
            padded_shape=(attention_mask.shape[0], attention_mask.shape[1]),
            segment_ids=index["segment_ids"],
            token_type_ids=token_type_ids.flatten()[flat_index].unsqueeze(0) if token_type_ids is not None else None,
        )

    @classmethod
    def from_features(cls, features: dict[str, Any], *, offset: int = 0) -> PackedBatch:
        """`from_padded` on tokenized features, using the collator's `"packing"` index when it is there."""
        return cls.from_padded(
            features["input_ids"],
            features["attention_mask"],
            offset=offset,
            token_type_ids=features.get("token_type_ids"),
            index=features.get(PACKING_KEY),
        )

    @property
    def num_texts(self) -> int:
        return self.lengths.numel()

    @property
    def first_index(self) -> torch.Tensor:
        """`[N]` packed index of each text's first token (CLS for BERT-style encoders)."""
        return self.cu_seqlens[:-1].long()

    @property
    def last_index(self) -> torch.Tensor:
        """`[N]` packed index of each text's last token (the EOS of a decoder embedder)."""
        return self.cu_seqlens[1:].long() - 1

    def is_first_token(self) -> torch.Tensor:
        """`[T]` bool, True at the first token of each text."""
        flags = torch.zeros(self.input_ids.shape[1], dtype=torch.bool, device=self.input_ids.device)
        flags[self.first_index] = True
        return flags

    def backbone_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a transformers backbone call on the packed sequence (no attention mask)."""
        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
        }
        if self.token_type_ids is not None:
            kwargs["token_type_ids"] = self.token_type_ids
        return kwargs

    def pool(self, hidden: torch.Tensor, mode: str) -> torch.Tensor:
        """Sentence vectors `[N, d]` from packed hidden states `[T, d]`.

        `cls`: first token; `last_token`: last token; `mean`: `(1 / l_i) sum_{t in text i} h_t`.
        """
        if mode == "cls":
            return hidden[self.first_index]
        if mode == "last_token":
            return hidden[self.last_index]
        if mode == "mean":
            sums = hidden.new_zeros(self.num_texts, hidden.shape[-1]).index_add(0, self.segment_ids, hidden)
            return sums / self.lengths.unsqueeze(-1).to(hidden.dtype)
        raise ValueError(f"unknown pooling {mode!r}; expected cls, mean or last_token")

    def repad(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter per-token values `[T, ...]` into the padded layout `[N, L, ...]` (0 at padding)."""
        rows, length = self.padded_shape
        out = values.new_zeros(rows * length, *values.shape[1:]).index_put((self.flat_index,), values)
        return out.view(rows, length, *values.shape[1:])


def position_offset(backbone: nn.Module) -> int:
    """First position id of a text: `padding_idx + 1` for RoBERTa-style embeddings (XLM-R, BGE-M3), else 0."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    embeddings = getattr(base, "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "create_position_ids_from_input_ids"):
        return int(embeddings.padding_idx) + 1
    return 0


# ---------------------------------------------------------------------------------------------- attention
def _sdpa_segments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    *,
    scale: float | None,
    causal: bool,
    dropout: float,
) -> torch.Tensor:
    """Exact per-text attention of packed `[T, H, d]` tensors through one padded SDPA call.

    Scatters each text into `[N, H, max_length, d]`, masks keys past each text's end (and future keys when
    causal), and gathers the real rows back. Padded query rows always see at least one real key, so no row
    is fully masked.
    """
    total, num_heads = query.shape[0], query.shape[1]
    lengths = cu_seqlens.diff().long()
    num_texts = lengths.numel()
    segment = torch.repeat_interleave(torch.arange(num_texts, device=query.device), lengths, output_size=total)
    position = torch.arange(total, device=query.device) - cu_seqlens[:-1].long()[segment]

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(num_texts, max_length, *x.shape[1:]).index_put((segment, position), x)
        return out.transpose(1, 2)  # [N, H, L, d]

    q, k, v = pad(query), pad(key), pad(value)
    if k.shape[1] != num_heads:  # grouped-query attention: kv head h serves query heads h*g .. h*g + g - 1
        groups = num_heads // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    steps = torch.arange(max_length, device=query.device)
    mask = (steps[None, :] < lengths[:, None])[:, None, None, :]  # [N, 1, 1, L] real keys
    if causal:
        mask = mask & (steps[None, :] <= steps[:, None])[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)[segment, position]  # [T, H, d]


def _varlen_unusable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the varlen kernel cannot run these tensors, or None when it can."""
    if _varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    if not query.is_cuda:
        return f"the varlen kernel needs CUDA, the tensors are on {query.device.type}"
    if query.dtype not in _VARLEN_DTYPES or not query.dtype == key.dtype == value.dtype:
        return f"the varlen kernel needs fp16/bf16 tensors (got {query.dtype}; train with bf16 or fp16)"
    return None


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_length: int,
    *,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    kwargs: dict[str, Any] = {"scale": scale}
    if causal:
        kwargs["window_size"] = (-1, 0)
    if key.shape[1] != query.shape[1]:
        if _VARLEN_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return _varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, **kwargs)


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    fallback: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of packed texts, called by transformers' attention layers (`[1, H, T, d]` in, `[1, T, H, d]` out).

    The text boundaries come from `cu_seq_lens_q` / `max_length_q` (or, when absent, from packed
    `position_ids`, as transformers' `flash_attention_2` infers them). Without either, the call is an ordinary
    padded one and goes to `fallback`, the backbone's own implementation.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    max_length = kwargs.get("max_length_q")
    if (
        cu_seqlens is None
        and attention_mask is None
        and _is_packed_sequence(kwargs.get("position_ids"), query.shape[0])
    ):
        (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    if cu_seqlens is None:
        if fallback is None:
            raise ValueError("packed attention got neither cu_seq_lens_q nor packed position_ids")
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed sequence (batch 1), got batch {query.shape[0]}")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("padding_free does not support sliding-window attention layers")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False)) if causal is None else bool(causal)
    max_length = int(max_length)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]

    if q.is_cuda and torch.is_autocast_enabled(q.device.type):  # varlen_attn is not an autocast op
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    why_not = _varlen_unusable(q, k, v)
    if why_not is None:
        if dropout > 0:
            _warn_once(
                "dropout",
                "%s=True: varlen_attn has no attention-probability dropout; attention dropout p=%g is not applied "
                "(hidden-state dropout still is)",
                SWITCH_NAME,
                dropout,
            )
        out = _varlen(q, k, v, cu_seqlens, max_length, scale=scaling, causal=causal)
    else:
        _warn_once(
            f"fallback:{why_not}",
            "%s=True: %s; packed attention falls back to per-text scaled_dot_product_attention (same results, "
            "attention not padding-free)",
            SWITCH_NAME,
            why_not,
        )
        out = _sdpa_segments(q, k, v, cu_seqlens, max_length, scale=scaling, causal=causal, dropout=dropout)
    return out.unsqueeze(0), None


def _original_attention(name: str) -> Callable[..., Any]:
    if name == "eager":

        def eager(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # each modeling file has its own eager function (GQA repeat, softmax dtype)
            own = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            return (own or ALL_ATTENTION_FUNCTIONS["sdpa"])(module, *args, **kwargs)

        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _register(original: str) -> str:
    """Register `ark_packed_<original>` (attention and mask functions) once; return its name."""
    name = f"{PACKED_ATTENTION_PREFIX}{original}"
    if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
        return name
    base_attention = _original_attention(original)
    if original.startswith("flash_attention"):
        # transformers' flash path reads cu_seq_lens_q/k itself: packed and padded calls both go there
        attention = base_attention
    else:

        def attention(*args: Any, **kwargs: Any) -> Any:
            return packed_attention_forward(*args, fallback=base_attention, **kwargs)

    base_mask = ALL_MASK_ATTENTION_FUNCTIONS[original]

    def mask(*args: Any, **kwargs: Any) -> Any:
        if _PACKED_CALL.get() and kwargs.get("attention_mask") is None:
            return None  # the packed boundaries travel as cu_seqlens, no [T, T] mask
        return base_mask(*args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def _transformers_model(model: nn.Module) -> PreTrainedModel:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"padding_free needs a transformers PreTrainedModel backbone, got {type(base).__name__}")
    return base


def enable_padding_free(backbone: nn.Module) -> str:
    """Switch a transformers backbone (or a peft model around one) to packed-aware attention.

    Padded calls keep their previous implementation (`sdpa`, `eager`, `flash_attention_2` ...); calls with
    `cu_seq_lens_q` run per-text attention on the packed sequence. Idempotent. Returns the implementation name.
    """
    base = _transformers_model(backbone)
    current = base.config._attn_implementation or "sdpa"
    if current.startswith(PACKED_ATTENTION_PREFIX):
        return current
    if not base._can_set_attn_implementation():
        raise ValueError(
            f"padding_free: {type(base).__name__} does not route attention through transformers' AttentionInterface"
        )
    if current not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"padding_free: attention implementation {current!r} has no mask function to fall back on")
    name = _register(current)
    base.set_attn_implementation(name)
    return name


def disable_padding_free(backbone: nn.Module) -> None:
    """Restore the implementation the backbone had before `enable_padding_free`."""
    base = _transformers_model(backbone)
    current = base.config._attn_implementation or ""
    if current.startswith(PACKED_ATTENTION_PREFIX):
        base.set_attn_implementation(current.removeprefix(PACKED_ATTENTION_PREFIX))


@contextlib.contextmanager
def _packed_call() -> Iterator[None]:
    token = _PACKED_CALL.set(True)
    try:
        yield
    finally:
        _PACKED_CALL.reset(token)


def joint_backbone_kwargs(packs: Sequence[PackedBatch]) -> dict[str, Any]:
    """`backbone_kwargs` of several packed batches laid one after the other in one packed sequence.

    The texts stay separate (each keeps its own `cu_seqlens` segment and positions), so one backbone call over
    the joint sequence gives each batch the hidden states its own call would: the queries and passages of a step
    share one call (half the Python dispatch of two calls, and one kernel launch per op instead of two).
    """
    parts = [pack.backbone_kwargs() for pack in packs]
    if len(parts) == 1:
        return parts[0]
    if any(part.keys() != parts[0].keys() for part in parts):
        raise ValueError("token_type_ids in some of the packed batches only")
    cu_seqlens, start = [packs[0].cu_seqlens], packs[0].cu_seqlens[-1:]
    for pack in packs[1:]:  # each batch's boundaries shifted by the tokens before it (device ops, no sync)
        cu_seqlens.append(pack.cu_seqlens[1:] + start)
        start = cu_seqlens[-1][-1:]
    joint = {key: torch.cat([part[key] for part in parts], dim=1) for key in parts[0] if key.endswith("_ids")}
    joint["cu_seq_lens_q"] = joint["cu_seq_lens_k"] = torch.cat(cu_seqlens)
    joint["max_length_q"] = joint["max_length_k"] = max(pack.max_length for pack in packs)
    return joint


def packed_hidden_states(
    backbone: nn.Module, packed: PackedBatch | Sequence[PackedBatch], **kwargs: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Run `backbone` (switched by `enable_padding_free`) on a packed batch; returns hidden states `[T, d]`.

    Given a list of packed batches, runs them in one call (`joint_backbone_kwargs`) and returns each batch's
    hidden states `[T_i, d]`. Extra keyword arguments (e.g. `use_cache=False`) go to the backbone.
    """
    implementation = _transformers_model(backbone).config._attn_implementation or ""
    if not implementation.startswith(PACKED_ATTENTION_PREFIX):
        raise RuntimeError(
            f"the backbone uses attention {implementation!r}; call enable_padding_free(backbone) before a packed "
            "forward, or texts would attend across each other"
        )
    packs = [packed] if isinstance(packed, PackedBatch) else list(packed)
    with _packed_call():
        output = backbone(**joint_backbone_kwargs(packs), return_dict=True, **kwargs)
    hidden = output.last_hidden_state[0]
    if isinstance(packed, PackedBatch):
        return hidden
    return list(hidden.split([pack.input_ids.shape[1] for pack in packs]))


# ----------------------------------------------------------------------------------------------- the switch
PADDING_FREE_CHOICES = ("auto", "true", "false")


def normalize_padding_free(value: Any, *, key: str = SWITCH_NAME) -> str:
    """`"auto"`, `"true"` or `"false"` from a bool, one of those strings (any case) or None (auto)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("1", "yes", "on"):
        text = "true"
    elif text in ("0", "no", "off"):
        text = "false"
    if text not in PADDING_FREE_CHOICES:
        raise ValueError(f"{key} must be one of {', '.join(PADDING_FREE_CHOICES)} (or a boolean), got {value!r}")
    return text


def _sliding_window_reason(config: Any) -> str | None:
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types:
        return f"{getattr(config, 'model_type', 'the model')} has sliding-window attention layers"
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{getattr(config, 'model_type', 'the model')} uses sliding-window attention"
    return None


def _unsupported_reason(model_class: type, config: Any, implementation: str | None) -> str | None:
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        return f"{getattr(model_class, '__name__', model_class)} is not a transformers PreTrainedModel"
    if not model_class._can_set_attn_implementation():
        return f"{model_class.__name__} does not route attention through transformers' AttentionInterface"
    implementation = implementation or "sdpa"
    if implementation.startswith(PACKED_ATTENTION_PREFIX):
        return None
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        return f"attention implementation {implementation!r} has no mask function to fall back on"
    return _sliding_window_reason(config)


def padding_free_unsupported(backbone: nn.Module) -> str | None:
    """Why `backbone` (a transformers model, or a peft model around one) cannot run packed, or None."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if not isinstance(base, PreTrainedModel):
        return f"{type(base).__name__} is not a transformers PreTrainedModel"
    return _unsupported_reason(type(base), base.config, base.config._attn_implementation)


def padding_free_unsupported_before_load(
    name_or_path: str, *, attn_implementation: str | None = None, trust_remote_code: bool = False
) -> str | None:
    """`padding_free_unsupported` from the model's config alone (no weights read): None when it can pack.

    Models with remote code are only checked once loaded (their class is not known before).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model_class = MODEL_MAPPING.get(type(config), None)
    if model_class is None:
        return None
    return _unsupported_reason(
        model_class, config, attn_implementation or getattr(config, "_attn_implementation", None)
    )


def resolve_padding_free(
    setting: Any, backbone: nn.Module, *, device: torch.device | str, half_precision: bool
) -> tuple[bool, str]:
    """Decide the `padding_free` switch for a model that trains on `device`: `(on, why)`.

    `"auto"` packs where it is the fast path: a backbone that can pack, on CUDA, with a varlen kernel for the
    attention (torch's `varlen_attn` under bf16/fp16, or a `flash_attention_*` implementation); elsewhere the
    padded forward runs (on CPU the packed form saves no time: attention falls back to per-text SDPA).
    `"true"` packs wherever the backbone can (refusing one that cannot, with the reason); `"false"` never packs.
    """
    choice = normalize_padding_free(setting)
    if choice == "false":
        return False, f"{SWITCH_NAME}=false"
    reason = padding_free_unsupported(backbone)
    if choice == "true":
        if reason is not None:
            raise ValueError(
                f"{SWITCH_NAME}=true: this model cannot run padding-free: {reason}; set {SWITCH_NAME}: auto or false"
            )
        return True, f"{SWITCH_NAME}=true"
    if reason is not None:
        return False, f"{SWITCH_NAME}=auto: padded, {reason}"
    device = torch.device(device)
    base = _transformers_model(backbone)
    implementation = (base.config._attn_implementation or "").removeprefix(PACKED_ATTENTION_PREFIX)
    if device.type != "cuda":
        return False, f"{SWITCH_NAME}=auto: padded on {device.type} (packing pays off with the CUDA varlen kernel)"
    if implementation.startswith("flash_attention"):
        return True, f"{SWITCH_NAME}=auto: padding-free ({implementation} reads the packed boundaries)"
    if _varlen_attn is None:
        return False, f"{SWITCH_NAME}=auto: padded, torch {torch.__version__} has no varlen_attn kernel"
    if not half_precision:
        return False, f"{SWITCH_NAME}=auto: padded, the varlen kernel needs bf16/fp16 (train with bf16: true)"
    return True, f"{SWITCH_NAME}=auto: padding-free (torch varlen_attn on {device})"


class PaddingFreeMixin:
    """The `padding_free` switch of an embedder whose backbone is `self.model` (settable after construction).

    Takes a bool, or `"true"` / `"false"` / `"auto"` (resolved now, for the device and dtype the backbone's
    weights have: see `resolve_padding_free`; the trainers resolve it for the device they train on).

    Padding-free, a training forward with queries and passages runs the backbone once on both (packed one after
    the other, `joint_backbone_kwargs`); the embedder implements `packed_outputs(features, packed, hidden)`, its
    pooling and heads on one batch's packed hidden states, and may add backbone keywords in `packed_call_kwargs`.
    """

    packed_call_kwargs: dict[str, Any] = {}

    def packed_outputs(self, features: dict[str, Any], packed: PackedBatch, hidden: torch.Tensor) -> EmbeddingOutput:
        raise NotImplementedError

    def encode_packed(self, batches: Sequence[dict[str, Any]]) -> list[EmbeddingOutput]:
        """Each tokenized batch's outputs, from one packed backbone call over all of them."""
        offset = position_offset(self.model)
        packs = [PackedBatch.from_features(features, offset=offset) for features in batches]
        hiddens = packed_hidden_states(self.model, packs, **self.packed_call_kwargs)
        return [self.packed_outputs(f, p, h) for f, p, h in zip(batches, packs, hiddens)]

    def forward(
        self, query: dict[str, Any] | None = None, passages: dict[str, Any] | None = None, **kwargs: Any
    ) -> RetrieverOutput:
        if self.padding_free and query is not None and passages is not None:
            query_out, passages_out = self.encode_packed([query, passages])
            return RetrieverOutput(query=query_out, passages=passages_out)
        return super().forward(query=query, passages=passages, **kwargs)  # type: ignore[misc]

    @property
    def padding_free(self) -> bool:
        """Packed (padding-free) backbone forward."""
        return self._padding_free

    @padding_free.setter
    def padding_free(self, value: Any) -> None:
        choice = normalize_padding_free(value)
        if choice == "auto":
            weight = next(_transformers_model(self.model).parameters())
            on, _ = resolve_padding_free(
                choice, self.model, device=weight.device, half_precision=weight.dtype in _VARLEN_DTYPES
            )
        else:
            on = choice == "true"
        if on:
            enable_padding_free(self.model)
        else:
            disable_padding_free(self.model)
        self._padding_free = on
