"""`QwenTrainerConfig`: every option of Qwen3-Embedding-style fine-tuning, as `TrainingArguments` fields."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers.utils import logging

from ark_hf.constants import DEFAULT_INSTRUCTION, QWEN_QUERY_FORMAT
from ark_hf.losses.qwen3 import Qwen3LossOptions
from ark_hf.trainer.base_config import RetrieverConfig

logger = logging.get_logger(__name__)

__all__ = ["QwenTrainerConfig"]

DEFAULT_LEARNING_RATE = 6e-6
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QwenTrainerConfig(RetrieverConfig, Qwen3LossOptions):
    r"""
    Configuration for [`QwenTrainer`]: a decoder LLM as an embedder (EOS appended, last-token pooling, L2
    normalisation), trained with the InfoNCE of the Qwen3-Embedding report (arXiv 2506.05176, sec. 3.1).

    Parameters:
        > Model

        model_name_or_path (`str`, defaults to `"Qwen/Qwen3-Embedding-0.6B"`): Hub name or local folder.
        torch_dtype (`str`, defaults to `"float32"`): Dtype of the loaded weights; keep float32 master weights
            and train with `bf16=True` (mixed precision).
        attn_implementation (`str` or `None`): `sdpa`, `flash_attention_2`, `eager`; `None` lets transformers pick.

        > LoRA

        lora (`bool`, defaults to `False`): Train LoRA adapters (peft) instead of all weights.
        lora_r, lora_alpha, lora_dropout (defaults `8`, `32`, `0.05`): ms-swift's defaults.
        lora_target_modules (`list[str]`, defaults to `["all-linear"]`): Every attention and MLP projection.
        merge_lora_on_save (`bool`, defaults to `True`): Saves hold merged full weights (loadable by
            sentence-transformers) and the adapter in `lora_adapter/`; `False`: the adapter only.

        > Objective

        temperature (`float`, defaults to `0.1`): Cosine similarities are divided by it.
        false_negative_margin (`float`, defaults to `0.1`): Candidates scoring above `s(q, d+) + margin` are masked.
        mask_false_negatives (`bool`, defaults to `True`): Apply the margin rule and the same-text rule.
        in_batch_negatives (`bool`, defaults to `True`): Master switch of the in-batch terms; off: each query sees
            only its own group (ms-swift's `INFONCE_USE_BATCH=false`).
        use_qq, use_dd, use_inbatch_qd (`bool`, default `True`): The report's q-q', d-d' and q-d' terms.
        mask_other_positives (`bool`, default `True`): A query's other positives (all of `pos`, by content hash,
            on any process) are not its negatives.
        negatives_cross_device (`bool`, defaults to `False`): Candidates from every process (exact DDP gradients).
        matryoshka_dims, matryoshka_weights (`list` or `None`): Matryoshka (MRL) sizes and their loss weights.

        > Data

        query_instruction (`str`, defaults to Qwen3-Embedding's web-search instruction): Query instruction.
        query_instruction_format (`str`, defaults to `"Instruct: {}\nQuery:{}"`): Qwen3-Embedding's template.
        query_max_len, passage_max_len (`int`, defaults `128`, `512`): Token lengths, EOS included.
        curriculum (`str` or `None`): A stage-plan YAML (`ark_hf.curriculum.plan`); replaces `train_data`.

    Defaults that differ from `TrainingArguments`: `learning_rate=6e-6` (the Qwen team's full fine-tuning
    recipe for Qwen3-Embedding-0.6B, `docs/training/SWIFT.md`; use about 5e-5 with LoRA, ms-swift's example),
    `activation_checkpointing=True` (as ms-swift: a decoder's activations dominate memory),
    `remove_unused_columns=False` and `logging_steps=10`.
    """

    model_name_or_path: str | None = field(
        default="Qwen/Qwen3-Embedding-0.6B",
        metadata={"help": "Hub name or local folder of the decoder to fine-tune (Qwen3-Embedding or any AutoModel)."},
    )
    learning_rate: float = field(
        default=DEFAULT_LEARNING_RATE,
        metadata={"help": "Initial AdamW learning rate (6e-6: Qwen's full fine-tuning recipe; ~5e-5 for LoRA)."},
    )
    # what __post_init__ turns an unset field into (the model card lists a field only when it differs)
    resolved_defaults: ClassVar[dict[str, Any]] = {"activation_checkpointing": True}

    # `None` = unset, so the deprecated `gradient_checkpointing` alias still wins when given; __post_init__ turns
    # an unset value into True.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass (non-reentrant) to save memory (default: on).",
            "nargs": "?",
            "const": True,
        },
    )
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the loaded weights. float32 master weights + bf16=True is mixed precision; bfloat16 "
            "weights train in pure bf16, where updates of about lr=6e-6 are below bf16's resolution and are lost.",
            "choices": list(TORCH_DTYPES),
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, flash_attention_2, eager (default: transformers' choice)."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get adapters: 'all-linear' (every attention and MLP projection) or module names.",
            "nargs": "+",
        },
    )
    merge_lora_on_save: bool = field(
        default=True,
        metadata={
            "help": "LoRA: save merged full weights (sentence-transformers-loadable) plus the adapter in lora_adapter/; "
            "off: save only the adapter."
        },
    )
    # temperature, false_negative_margin, mask_false_negatives, in_batch_negatives, use_qq, use_dd, use_inbatch_qd and
    # mask_other_positives: the fields of `Qwen3LossOptions`, inherited
    negatives_cross_device: bool = field(
        default=False, metadata={"help": "Gather candidates from all processes (exact global-batch gradient)."}
    )
    matryoshka_dims: list[int] | None = field(
        default=None,
        metadata={
            "help": "Matryoshka sizes trained together, e.g. 1024 512 128 (include the full size to train it too).",
            "nargs": "+",
        },
    )
    matryoshka_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Loss weight of each Matryoshka size (default: 1 each); the loss is the weighted sum.",
            "nargs": "+",
        },
    )
    query_instruction: str | None = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Instruction for queries (documents get none); a record's own `prompt` takes precedence."},
    )
    query_instruction_format: str = field(
        default=QWEN_QUERY_FORMAT,
        metadata={"help": "Python format joining instruction and query (Qwen3-Embedding's, no space after 'Query:')."},
    )
    query_max_len: int = field(default=128, metadata={"help": "Maximum query length in tokens (EOS included)."})
    passage_max_len: int = field(default=512, metadata={"help": "Maximum passage length in tokens (EOS included)."})

    def __post_init__(self) -> None:
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = self.resolved_defaults["activation_checkpointing"]
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"torch_dtype must be one of {TORCH_DTYPES}, got {self.torch_dtype!r}")
        self.check(train_group_size=self.train_group_size, negatives_cross_device=self.negatives_cross_device)
        try:
            replacement_fields = [
                f for _, f, _, _ in string.Formatter().parse(self.query_instruction_format) if f is not None
            ]
            self.query_instruction_format.format("instruction", "query")
        except (IndexError, KeyError, ValueError):
            replacement_fields = []
        if len(replacement_fields) != 2:
            raise ValueError(
                f"query_instruction_format must hold two '{{}}' fields (instruction, query), got "
                f"{self.query_instruction_format!r}"
            )
        if self.lora:
            if self.lora_r < 1:
                raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
            if self.lora_alpha <= 0:
                raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
            if not self.lora_target_modules:
                raise ValueError("lora_target_modules must name at least one module (or 'all-linear')")
            if self.learning_rate == DEFAULT_LEARNING_RATE:
                logger.warning(
                    "LoRA with learning_rate=%g, the full fine-tuning default: adapters usually need about 10x more "
                    "(ms-swift's Qwen3-Embedding LoRA example uses 5e-5)",
                    self.learning_rate,
                )
        self._check_matryoshka()

    def _check_matryoshka(self) -> None:
        if self.matryoshka_weights is not None and self.matryoshka_dims is None:
            raise ValueError("matryoshka_weights is set but matryoshka_dims is not")
        if self.matryoshka_dims is None:
            return
        dims = [int(dim) for dim in self.matryoshka_dims]
        if not dims or any(dim < 1 for dim in dims):
            raise ValueError(f"matryoshka_dims must be positive sizes, got {self.matryoshka_dims}")
        if len(set(dims)) != len(dims):
            raise ValueError(f"matryoshka_dims has duplicates: {self.matryoshka_dims}")
        self.matryoshka_dims = dims
        if self.matryoshka_weights is None:
            self.matryoshka_weights = [1.0] * len(dims)
        weights = [float(weight) for weight in self.matryoshka_weights]
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} matryoshka_weights for {len(dims)} matryoshka_dims")
        if any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"matryoshka_weights must be non-negative with a positive sum, got {weights}")
        self.matryoshka_weights = weights

    @property
    def loss_options(self) -> dict[str, float | bool]:
        """The loss settings a curriculum stage may override (the `Qwen3LossOptions` fields)."""
        return self.as_dict()
