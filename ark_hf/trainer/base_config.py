"""Fields shared by every retriever trainer config (data, lengths, batching, evaluation, safety)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["RetrieverConfig"]


@dataclass
class RetrieverConfig(TrainingArguments):
    r"""
    Configuration shared by [`BGETrainerConfig`] and [`QwenTrainerConfig`]; a `TrainingArguments` subclass,
    so every Trainer option (precision, DeepSpeed, FSDP, logging, saving, Hub) works unchanged.

    Parameters:
        > Model

        model_name_or_path (`str` or `None`): Hub name or local folder of the model to fine-tune.
        trust_remote_code (`bool`, defaults to `False`): Allow custom modelling code from the Hub.

        > Data

        train_data (`list[str]` or `None`): jsonl/json files or folders of training records.
        train_group_size (`int`, defaults to `8`): Passages per query: 1 positive and `train_group_size - 1` negatives.
        query_max_len, passage_max_len (`int`): Truncation lengths in tokens.
        query_instruction, query_instruction_format: Instruction prepended to queries and how it is joined.
        max_validation_errors (`int`, defaults to `20`): Errors listed before the data check stops counting.

        > Batching

        same_dataset_within_batch (`bool`): Every batch from one source file.
        no_duplicates_in_batch (`bool`): No text twice in one batch.
        group_by_length (`bool`): Batches of similar length (whole-group token counts).
        max_tokens_per_batch (`int` or `None`): Token budget per step instead of a fixed number of groups.

        > Speed

        padding_free (`str`, defaults to `"auto"`): Packed forward on real tokens only: `auto` (on with CUDA and
            bf16/fp16, padded on CPU), `true`, `false`.
        liger_kernel (`bool`): liger-kernel's fused kernels in the backbone (falls back with a warning).
        compile_backbone (`bool`): `torch.compile` of the backbone (falls back with a warning).
        dataloader_num_workers (`int`, defaults to `-1`): Processes that read and tokenize the next batches while
            the GPU trains; `-1` (auto): 2 when training on CUDA, 0 on CPU or with a step-based hard-negative
            refresh.

        > Evaluation

        eval_data (`str` or `None`): An evaluation set (JSON with queries, corpus, qrels, or a jsonl of records).
        eval_modes (`list[str]`): Scoring modes to evaluate.

        > Hard negatives refreshed during training

        refresh_negatives (`str`, defaults to `"no"`): `steps`, `epoch` or `no` (`ark_hf.callbacks.hard_negatives`).
        refresh_negatives_steps (`int` or `None`): Optimizer steps between refreshes.
        refresh_negatives_corpus (`list[str]` or `None`): Candidate passages besides the training positives.
        refresh_negatives_teacher (`str` or `None`): Drops candidates it scores at or above the positive.

        > Safety

        overwrite_output_dir (`bool`, defaults to `False`): Allow writing into a non-empty output_dir.

    Defaults that differ from `TrainingArguments`: `remove_unused_columns=False` (batches are built by the
    collator), `logging_steps=10`, `save_safetensors` left as is.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub name or local folder of the model to fine-tune."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom modelling code from the Hub (off: only trusted classes)."}
    )
    train_data: list[str] | None = field(
        default=None,
        metadata={"help": "Training data: jsonl/json files or folders (each file is one source).", "nargs": "+"},
    )
    train_group_size: int = field(
        default=8, metadata={"help": "Passages per query: 1 positive + (train_group_size - 1) negatives."}
    )
    query_max_len: int = field(default=32, metadata={"help": "Maximum query length in tokens (truncated beyond)."})
    passage_max_len: int = field(
        default=128, metadata={"help": "Maximum passage length in tokens (truncated beyond)."}
    )
    query_instruction: str | None = field(
        default=None, metadata={"help": "Instruction for queries; a record's own `prompt` field takes precedence."}
    )
    query_instruction_format: str = field(
        default="{}{}", metadata={"help": "Python format joining instruction and query, e.g. '{}{}'."}
    )
    dataset_instructions: dict | str | None = field(
        default=None,
        metadata={
            "help": "Per-dataset query instructions: a mapping from a training file (path, file name, or name "
            "without extension) to its instruction, as a YAML mapping or a JSON string on the command line. Files "
            "without an entry use query_instruction; a record's `prompt` field wins over both."
        },
    )
    passage_instruction: str | None = field(
        default=None, metadata={"help": "Instruction for passages (symmetric tasks only)."}
    )
    passage_instruction_format: str = field(
        default="{}{}", metadata={"help": "Python format joining instruction and passage."}
    )
    max_validation_errors: int = field(
        default=20, metadata={"help": "How many data errors to list before stopping the count."}
    )
    nan_policy: str = field(
        default="stop",
        metadata={
            "help": "On a NaN/inf loss: 'stop' raises with the step, the loss component and the batch's records; "
            "'skip' logs the same and drops the batch (no backward; every process skips it together).",
            "choices": ["stop", "skip"],
        },
    )
    same_dataset_within_batch: bool = field(
        default=False, metadata={"help": "Draw every batch from a single source file."}
    )
    no_duplicates_in_batch: bool = field(
        default=False, metadata={"help": "Never put the same text twice in one batch (avoids false negatives)."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad token lengths to a multiple of this (8 suits tensor cores)."}
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "GradCache: encode the batch this many texts at a time (queries and passages alike) and cache the "
            "loss's gradients w.r.t. every head's outputs; the contrastive batch (and its negatives) stays "
            "per_device_train_batch_size x train_group_size, memory that of one mini-batch. Unset: no cache."
        },
    )
    dataloader_num_workers: int = field(
        default=-1,
        metadata={
            "help": "Processes that read and tokenize the next batches while the GPU trains (0: in the main process, "
            "between steps). -1 (default, auto): 2 when training on CUDA; 0 on CPU (starting workers costs more than "
            "tokenizing there) and with refresh_negatives=steps (a refresh must reach the records the loader reads)."
        },
    )
    padding_free: str = field(
        default="auto",
        metadata={
            "help": "Run the backbone on real tokens only: a step's texts packed into one sequence, same outputs as "
            "padded batches. 'auto' (default): on where it is the fast path (CUDA with bf16/fp16 and a backbone "
            "that routes attention through transformers, or a flash-attention implementation), padded elsewhere "
            "(CPU); the choice is logged once. 'true': pack wherever the backbone can (on CPU attention runs per "
            "text), refusing a backbone that cannot with the reason. 'false': always padded.",
            "choices": ["auto", "true", "false"],
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Token budget per step and device: as many training groups as fit, each counted as its query + "
            "train_group_size passages in tokens (an upper bound over the negatives it can draw). Suits padding_free, "
            "where a step costs its real tokens; with train_sampling_strategy=group_by_length the groups of a step "
            "have similar size. per_device_train_batch_size is then only the length-grouping unit. A budget smaller "
            "than one record's group is refused before the first step. Unset: a fixed number of groups per step."
        },
    )
    liger_kernel: bool = field(
        default=False,
        metadata={
            "help": "Fused Triton kernels of liger-kernel in the backbone (Qwen3, Llama, Mistral, ...: RMSNorm, SwiGLU, "
            "RoPE). Needs liger-kernel and CUDA; where either is missing, or the architecture has no liger kernels, "
            "a warning names this switch and the plain modules run."
        },
    )
    compile_backbone: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the backbone only (dynamic shapes; heads and loss stay eager; parameter names and "
            "checkpoints unchanged). Needs the inductor backend's compiler (Triton on CUDA, a C++ compiler on CPU); "
            "where it is missing a warning names this switch and the backbone runs eagerly."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation set: a JSON file with 'queries', 'corpus', 'qrels'; a BEIR folder (corpus.jsonl, "
            "queries.jsonl, qrels/test.tsv; or the path of qrels/<split>.tsv for another split); or training records "
            "(.jsonl, a .json array, or a folder: corpus = their passages, qrels = their positives)."
        },
    )
    eval_modes: list[str] = field(
        default_factory=lambda: ["dense"],
        metadata={"help": "Scoring modes to evaluate: dense, sparse, colbert, dense+sparse, all.", "nargs": "+"},
    )
    eval_rerank_top_k: int | None = field(
        default=None,
        metadata={
            "help": "ColBERT and 'all' evaluation modes score only each query's top-k dense+sparse candidates "
            "(BGE-M3's evaluation re-ranks the top 200); unset: every document (exact)."
        },
    )
    eval_mode_weights: list[float] = field(
        default_factory=lambda: [1.0, 0.3, 1.0],
        metadata={
            "help": "Weights (dense, sparse, colbert) of the dense+sparse and all evaluation modes.",
            "nargs": 3,
        },
    )
    curriculum: str | None = field(
        default=None,
        metadata={
            "help": "Stage-plan YAML (see ark_hf.curriculum.plan): data, length and options per stage, and an "
            "optional final slerp merge. Replaces train_data; max_steps is set by the plan."
        },
    )
    eval_batch_size_encode: int = field(default=64, metadata={"help": "Batch size when encoding the eval corpus."})
    refresh_negatives: str = field(
        default="no",
        metadata={
            "help": "Re-mine the hard negatives with the model being trained (ark_hf.callbacks.hard_negatives): "
            "'steps' every refresh_negatives_steps optimizer steps, 'epoch' at the start of every epoch, 'no' never.",
            "choices": ["no", "steps", "epoch"],
        },
    )
    refresh_negatives_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps between two refreshes (refresh_negatives=steps; >= 1)."}
    )
    refresh_negatives_at_start: bool = field(
        default=False,
        metadata={"help": "Also mine once before the first step, with the initial model (always so with 'epoch')."},
    )
    refresh_negatives_corpus: list[str] | None = field(
        default=None,
        metadata={
            "help": "Candidate passages besides the training positives: .txt (one a line) or .jsonl files. The "
            "corpus must hold every training positive (the collection the data comes from).",
            "nargs": "+",
        },
    )
    refresh_negatives_num: int | None = field(
        default=None, metadata={"help": "Negatives per record at each refresh; default train_group_size - 1."}
    )
    refresh_negatives_range_max: int | None = field(
        default=None,
        metadata={"help": "Candidates come from the ranks [0, range_max) (ark_hf.mining); default as `ark-hf mine`."},
    )
    refresh_negatives_relative_margin: float | None = field(
        default=0.05,
        metadata={"help": "Drop candidates above p - |p| * margin (p: lowest positive score; NV-Retriever's 0.05)."},
    )
    refresh_negatives_teacher: str | None = field(
        default=None,
        metadata={
            "help": "Cross-encoder (or bi-encoder) that drops mined candidates it scores at or above the positive "
            "(likely false negatives); the KD teacher_model is reused when it is the same model."
        },
    )
    refresh_negatives_teacher_pool: int = field(
        default=3, metadata={"help": "With a teacher: candidates judged per kept negative."}
    )
    refresh_negatives_batch_size: int = field(
        default=64, metadata={"help": "Texts per forward pass when re-encoding the corpus."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow training into a non-empty output_dir that holds another run (files may be replaced)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the retrieval collator builds the batches itself."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (a ratio if < 1)."})

    def _resolve_num_workers(self) -> int:
        """`dataloader_num_workers`, with `-1` (auto) resolved for where this run trains."""
        workers = self.dataloader_num_workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
            raise ValueError(f"dataloader_num_workers must be -1 (auto) or >= 0, got {workers!r}")
        self._num_workers_auto = workers == -1
        if workers != -1:
            return workers
        import torch

        # a step-based hard-negative refresh turns auto workers off again (`HardNegativeRefresh.check_before_training`)
        if self.use_cpu or not torch.cuda.is_available():
            reason, workers = "not training on CUDA", 0
        else:
            reason, workers = "training on CUDA: batches are tokenized while the GPU trains", 2
        logger.info("dataloader_num_workers=auto: %d (%s)", workers, reason)
        return workers

    def __post_init__(self) -> None:
        self.dataloader_num_workers = self._resolve_num_workers()
        super().__post_init__()
        from ark_hf.models.packing import normalize_padding_free

        self.padding_free = normalize_padding_free(self.padding_free)
        if isinstance(self.dataset_instructions, str):
            try:
                self.dataset_instructions = json.loads(self.dataset_instructions)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"dataset_instructions: expected a JSON object, got {self.dataset_instructions!r}"
                ) from error
        if self.dataset_instructions is not None and not (
            isinstance(self.dataset_instructions, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in self.dataset_instructions.items())
        ):
            raise ValueError("dataset_instructions must map file names to instruction strings")
        if self.train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {self.train_group_size}")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.mini_batch_size is not None:
            if self.mini_batch_size < 1:
                raise ValueError(
                    f"mini_batch_size must be >= 1 (or unset for no gradient cache), got {self.mini_batch_size}"
                )
            texts = self.per_device_train_batch_size * self.train_group_size
            if self.mini_batch_size > texts:
                raise ValueError(
                    f"mini_batch_size={self.mini_batch_size} is larger than the batch's {texts} passages "
                    f"(per_device_train_batch_size {self.per_device_train_batch_size} x train_group_size "
                    f"{self.train_group_size}): the cache would change nothing; lower it or leave it unset"
                )
        if self.max_tokens_per_batch is not None:
            if self.max_tokens_per_batch < 1:
                raise ValueError(
                    f"max_tokens_per_batch must be >= 1 (or unset for a fixed batch size), got {self.max_tokens_per_batch}"
                )
            if self.same_dataset_within_batch or self.no_duplicates_in_batch:
                chosen = "same_dataset_within_batch" if self.same_dataset_within_batch else "no_duplicates_in_batch"
                raise ValueError(f"max_tokens_per_batch does not combine with {chosen} yet: choose one")
            if self.mini_batch_size is not None:
                raise ValueError(
                    "max_tokens_per_batch and mini_batch_size (GradCache) both bound a step's memory; choose one"
                )
        if self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel patches a bare PreTrainedModel; ark_hf models wrap their backbone: set "
                "liger_kernel=True instead (applied to the backbone, with a fallback where the kernels are missing)"
            )
        if len(self.eval_mode_weights) != 3:
            raise ValueError(
                f"eval_mode_weights needs 3 values (dense, sparse, colbert), got {self.eval_mode_weights}"
            )
        if self.curriculum:
            if self.train_data:
                raise ValueError(
                    "curriculum and train_data are both set: with a curriculum the stages name the data; "
                    "drop train_data"
                )
            from ark_hf.curriculum.plan import load_stage_plan

            load_stage_plan(self.curriculum)  # a bad plan fails here, before a model loads or a file is written
        if self.refresh_negatives not in ("no", "steps", "epoch"):
            raise ValueError(f"refresh_negatives must be 'no', 'steps' or 'epoch', got {self.refresh_negatives!r}")
        if self.refresh_negatives_steps is not None and self.refresh_negatives_steps < 1:
            raise ValueError(f"refresh_negatives_steps must be >= 1, got {self.refresh_negatives_steps}")
        if self.refresh_negatives == "steps" and self.refresh_negatives_steps is None:
            raise ValueError(
                "refresh_negatives=steps needs refresh_negatives_steps (optimizer steps between refreshes)"
            )
        if self.same_dataset_within_batch and self.no_duplicates_in_batch:
            raise ValueError("choose one of same_dataset_within_batch and no_duplicates_in_batch")
