"""`BGETrainerConfig`: every option of BGE-M3 fine-tuning, as `TrainingArguments` fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from ark_hf.models.outputs import M3_HEADS
from ark_hf.trainer.base_config import RetrieverConfig

__all__ = ["BGETrainerConfig", "M3_HEADS"]

LOSS_PRESETS = {
    # FlagEmbedding's code (the released BGE-M3 recipe)
    "flagembedding": {
        "ensemble_weights": (1.0, 0.3, 1.0),
        "loss_weights": (1.0, 1.0, 0.1, 1.0),
        "self_distill_weights": (1.0, 0.1, 1.0),
    },
    # the paper's equations (arXiv 2402.03216 v1, sec. 3.3): unweighted sums
    "paper": {
        "ensemble_weights": (1.0, 1.0, 1.0),
        "loss_weights": (1.0, 1.0, 1.0, 1.0),
        "self_distill_weights": (1.0, 1.0, 1.0),
    },
}


@dataclass
class BGETrainerConfig(RetrieverConfig):
    r"""
    Configuration for [`BGETrainer`]: BGE-M3 with dense, sparse and ColBERT heads.

    Parameters:
        > Model

        model_name_or_path (`str`): BGE-M3 (`BAAI/bge-m3`), a saved ark_hf/FlagEmbedding folder, or any encoder.
        init_missing_heads (`bool`, defaults to `False`): Start missing sparse/ColBERT heads from random.
        colbert_dim (`int`, defaults to `-1`): Size of a new ColBERT head (`-1`: hidden size).
        sentence_pooling_method (`str`, defaults to `"cls"`): Dense pooling: cls, mean, last_token.
        normalize_embeddings (`bool`, defaults to `True`): L2-normalise dense and ColBERT vectors.

        > Objective

        unified_finetuning (`bool`, defaults to `True`): Train dense, sparse and ColBERT heads together.
        heads (`list[str]` or `None`, defaults to `None`): The heads trained (and ensembled) with unified
            fine-tuning, e.g. `["dense", "sparse"]`; `None`: all three (dense alone without unified fine-tuning).
        use_self_distill (`bool`, defaults to `False`): Self-knowledge distillation from the heads' ensemble.
        self_distill_start_step (`int`, defaults to `-1`): Self-distillation runs after this optimizer step.
        temperature (`float`, defaults to `0.02`): Scores of every head are divided by it.
        loss_preset (`str`, defaults to `"flagembedding"`): Weights of the released code, or `"paper"`.
        in_batch_negatives (`bool`, defaults to `True`): Other queries' passages are negatives too.
        negatives_cross_device (`bool`, defaults to `False`): Negatives from every process (exact gradients).
        cross_device_heads (`list[str]` or `None`): Heads that gather (`dense`, `sparse`, `colbert`); default every
            head trained. `dense` alone is FlagEmbedding's behaviour (ensemble over local columns).
        mask_other_positives (`bool`, defaults to `True`): A query's other positives are not its negatives.
        colbert_chunk_size (`int` or `None`): Passages per ColBERT max-sim chunk (bounds the loss's memory).
        fix_encoder (`bool`, defaults to `False`): Train only the sparse and ColBERT heads.

        > Teacher distillation

        knowledge_distillation (`bool`, defaults to `False`): Distil teacher scores.
        kd_loss_type (`str`, defaults to `"m3_kd_loss"`): `kl_div` or `m3_kd_loss`.
        teacher_model (`str` or `None`): Online teacher (a cross-encoder or a bi-encoder) when the data has no scores.
        teacher_temperature (`float`, defaults to `1.0`): p_T = softmax(teacher / teacher_temperature).

    Defaults that differ from `TrainingArguments`: `remove_unused_columns=False`, `logging_steps=10`,
    `learning_rate=1e-5` (FlagEmbedding's recipe).
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "Initial AdamW learning rate."})
    init_missing_heads: bool = field(
        default=False,
        metadata={
            "help": "Start the sparse/ColBERT heads from random when the model folder has no colbert_linear.pt / "
            "sparse_linear.pt (usual for a plain encoder such as xlm-roberta-large). Off: a missing file is an error."
        },
    )
    colbert_dim: int = field(default=-1, metadata={"help": "Output size of a new ColBERT head (-1: hidden size)."})
    sentence_pooling_method: str = field(
        default="cls", metadata={"help": "Dense pooling.", "choices": ["cls", "mean", "last_token"]}
    )
    normalize_embeddings: bool = field(default=True, metadata={"help": "L2-normalise dense and ColBERT vectors."})
    unified_finetuning: bool = field(
        default=True, metadata={"help": "Train the dense, sparse and ColBERT heads together (off: dense only)."}
    )
    heads: list[str] | None = field(
        default=None,
        metadata={
            "help": "Heads to train with unified_finetuning, among dense, sparse, colbert (e.g. `--heads dense "
            "sparse`); the ensemble and self-distillation use these heads only; unset: all three.",
        },
    )
    use_self_distill: bool = field(
        default=False, metadata={"help": "Self-knowledge distillation: each head learns the heads' ensemble ranking."}
    )
    self_distill_start_step: int = field(
        default=-1, metadata={"help": "Self-distillation is active once the optimizer step exceeds this value."}
    )
    temperature: float = field(default=0.02, metadata={"help": "Temperature dividing the scores of every head."})
    loss_preset: str = field(
        default="flagembedding",
        metadata={
            "help": "Head and loss weights: 'flagembedding' (ensemble 1/0.3/1, losses 1/1/0.1/1, self-distill 1/0.1/1) "
            "or 'paper' (all 1).",
            "choices": list(LOSS_PRESETS),
        },
    )
    in_batch_negatives: bool = field(
        default=True, metadata={"help": "Use the other queries' passages as negatives (off: own group only)."}
    )
    negatives_cross_device: bool = field(
        default=False, metadata={"help": "Gather negatives from all processes (exact global-batch gradient)."}
    )
    cross_device_heads: list[str] | None = field(
        default=None,
        metadata={
            "help": "Heads whose negatives come from every process with negatives_cross_device: any of dense sparse "
            "colbert (default: every head trained; 'dense' alone is FlagEmbedding's behaviour).",
            "nargs": "+",
        },
    )
    mask_other_positives: bool = field(
        default=True,
        metadata={"help": "Remove a query's other positives (all of `pos`, by content hash) from its negatives."},
    )
    colbert_chunk_size: int | None = field(
        default=None, metadata={"help": "Passages per ColBERT max-sim chunk in the loss (default: automatic)."}
    )
    fix_encoder: bool = field(default=False, metadata={"help": "Freeze the encoder; train the sparse/ColBERT heads."})
    knowledge_distillation: bool = field(
        default=False,
        metadata={"help": "Distil teacher scores (pos_scores/neg_scores in the data, or teacher_model)."},
    )
    kd_loss_type: str = field(
        default="m3_kd_loss",
        metadata={"help": "Teacher distillation loss.", "choices": ["kl_div", "m3_kd_loss"]},
    )
    teacher_model: str | None = field(
        default=None,
        metadata={
            "help": "Online teacher: a cross-encoder (sequence classification) or a sentence-transformers model."
        },
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "Teacher distribution: softmax(teacher_scores / teacher_temperature)."}
    )
    teacher_max_len: int = field(default=512, metadata={"help": "Maximum (query, passage) length for the teacher."})
    teacher_batch_size: int = field(default=64, metadata={"help": "Pairs per teacher forward pass."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        if self.use_self_distill and not self.unified_finetuning:
            raise ValueError("use_self_distill needs unified_finetuning=True (the teacher is the heads' ensemble)")
        if self.fix_encoder and not self.unified_finetuning:
            raise ValueError("fix_encoder trains only the sparse/ColBERT heads, so it needs unified_finetuning=True")
        if self.teacher_model and not self.knowledge_distillation:
            raise ValueError("teacher_model is set but knowledge_distillation=False; set knowledge_distillation=True")
        if self.negatives_cross_device and not self.in_batch_negatives:
            raise ValueError(
                "negatives_cross_device needs in_batch_negatives=True (own-group scoring has no other negatives)"
            )
        if self.cross_device_heads is not None:
            unknown = [head for head in self.cross_device_heads if head not in M3_HEADS]
            if unknown or not self.cross_device_heads:
                raise ValueError(
                    f"cross_device_heads: {self.cross_device_heads} must name heads among {', '.join(M3_HEADS)}"
                )
            if not self.negatives_cross_device:
                raise ValueError("cross_device_heads is set but negatives_cross_device=False; set it to True")
        if self.colbert_chunk_size is not None and self.colbert_chunk_size < 1:
            raise ValueError(f"colbert_chunk_size must be >= 1, got {self.colbert_chunk_size}")
        self._check_heads()
        if self.knowledge_distillation and self.train_group_size < 2:
            raise ValueError("knowledge_distillation needs train_group_size >= 2 (a teacher ranks a group)")

    def _check_heads(self) -> None:
        if self.heads is None:
            return
        heads = [self.heads] if isinstance(self.heads, str) else list(self.heads)
        unknown = [h for h in heads if h not in M3_HEADS]
        if unknown or not heads or len(set(heads)) != len(heads):
            raise ValueError(
                f"key 'heads': {self.heads!r} must be distinct names among {list(M3_HEADS)} (at least one)"
            )
        if not self.unified_finetuning and heads != ["dense"]:
            raise ValueError(
                f"key 'heads': {heads} needs unified_finetuning=True (without it only the dense head trains)"
            )
        if self.use_self_distill and len(heads) < 2:
            raise ValueError(f"key 'heads': use_self_distill needs at least two heads to ensemble, got {heads}")
        if self.fix_encoder and not set(heads) - {"dense"}:
            raise ValueError(
                "key 'heads': fix_encoder trains only the sparse/ColBERT heads, so heads must name sparse or colbert"
            )
        self.heads = [h for h in M3_HEADS if h in heads]  # canonical order

    @property
    def trained_heads(self) -> tuple[str, ...]:
        """The heads the objective trains: `heads`, or all three with unified fine-tuning, else dense."""
        if self.heads is not None:
            return tuple(self.heads)
        return M3_HEADS if self.unified_finetuning else ("dense",)

    @property
    def loss_weights_preset(self) -> dict[str, tuple[float, ...]]:
        return LOSS_PRESETS[self.loss_preset]
