"""`HardNegativeRefresh`: re-mines each training query's hard negatives with the model being trained.

Negatives mined once, offline, with a frozen model go stale as the model learns (ANCE, arXiv 2007.00808): the
passages the trained model confuses with the positive are no longer the ones it confused at the start. This
callback re-mines them during training:

1. every `every_n_steps` optimizer steps, or at the start of every epoch (`each_epoch`), and optionally before the
   first step (`at_start`), it embeds the corpus (every training positive plus the `corpus` passages) and the
   queries with the current model, in eval mode and without gradients, `batch_size` texts at a time; under DDP
   each process embeds a contiguous shard and the shards are gathered, so every process holds the same vectors;
2. it mines with `ark_hf.mining.mine_hard_negatives`, the positive-aware rules of offline mining (rank window,
   absolute / relative margin below the query's lowest positive score, `max_score`, top or seeded random), dense
   scores;
3. optionally a teacher (`TeacherScorer`: a cross-encoder, or a bi-encoder) scores the query's positives and
   `teacher_pool x num_negatives` mined candidates, and every candidate it scores at or above the query's lowest
   positive is dropped as a likely false negative; the first `num_negatives` survivors are kept (in mined order);
4. the new negatives replace the records' `neg` in the training dataset, so the next groups draw from them.

What each refresh costs and changes is logged into the Trainer's log history: `hard_negatives/seconds`,
`hard_negatives/corpus` (passages embedded), `hard_negatives/margin` (mean over records of the lowest positive
score minus the mean score of the kept negatives, with the current model), `hard_negatives/full_group_share`
(share of records with `num_negatives` negatives), `hard_negatives/teacher_filtered` (candidates the teacher
dropped) and `hard_negatives/changed_share` (share of records whose negatives changed).

Determinism and resume. A refresh is a function of the model, the records, the corpus, the options and
`(seed, step)` (the random sampling strategy's seed), and process 0's result is broadcast, so every process trains
on the same negatives. The current negatives (as corpus indices) and the step of the last refresh are written into
each checkpoint's `trainer_state.json` (`stateful_callbacks`, inside the atomic save) and restored on resume; a
checkpoint written with another corpus is refused. Negatives reach the batches drawn after the refresh: the data
loader builds one batch ahead, so the first step after a step-based refresh may still train on the old ones.

Use it through the config (`refresh_negatives: steps`, `refresh_negatives_steps: 50`, `refresh_negatives_corpus`,
`refresh_negatives_teacher`, ...; see `RetrieverConfig`), or pass an instance in a trainer's `callbacks=[...]`; the
trainer checks the corpus and the teacher before the model loads and binds the callback to its dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from ark_hf.data.hashing import text_hash
from ark_hf.mining import load_corpus_file, mine_hard_negatives

logger = logging.get_logger(__name__)

__all__ = ["HardNegativeRefresh", "check_teacher_folder", "content_key"]


def content_key(text: str) -> int:
    """A passage's identity, as mining and the data loader judge it: the hash of the text without surrounding
    whitespace."""
    return text_hash(text.strip())


def check_teacher_folder(name_or_path: str, *, trust_remote_code: bool = False) -> None:
    """Refuse a teacher whose tokenizer cannot belong to its weights (config, tokenizer and weight files only).

    A tokenizer with more ids than the embedding matrix has rows would index past it (an error on CPU, a device
    assert on CUDA, mid-training); one far smaller than the matrix is another model's tokenizer
    (`ark_hf.utils.preflight.check_tokenizer`). Both are refused here, before any weights load.

    Raises:
        ValueError: naming the folder, the tokenizer size and the matrix rows.
    """
    from transformers import AutoTokenizer

    from ark_hf.utils.preflight import check_model_folder

    try:
        config = check_model_folder(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ValueError(f"refresh_negatives_teacher '{name_or_path}': {error}") from error
    rows = getattr(config, "vocab_size", None)
    size = len(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))
    if rows is not None and size > rows:
        raise ValueError(
            f"refresh_negatives_teacher '{name_or_path}': the tokenizer has {size} tokens but the weights' embedding "
            f"matrix has {rows} rows: the tokenizer does not belong to these weights"
        )


class HardNegativeRefresh(TrainerCallback, ExportableState):
    """Re-mines the training records' hard negatives with the current model (see the module docstring).

    Args:
        every_n_steps: refresh after every this many optimizer steps (>= 1), or `None`.
        each_epoch: refresh at the start of every epoch (the first included).
        at_start: refresh once before the first step (implied by `each_epoch`).
        corpus: extra candidate passages (texts), besides the training positives.
        corpus_files: files of extra candidate passages (`.txt` or `.jsonl`, see `ark_hf.mining.load_corpus_file`).
        require_positives_in_corpus: refuse a corpus (when one is given) that lacks a training positive: a
            corpus that is the collection the data came from holds them all; one that does not is another
            collection, or another version of its texts.
        num_negatives: negatives per record; default: the trainer's `train_group_size - 1`.
        range_min, range_max, absolute_margin, relative_margin, max_score, sampling_strategy: the mining rules
            (`ark_hf.mining.mine_hard_negatives`).
        teacher: a `TeacherScorer`, or a model name/folder loaded as one at the start of training, whose scores
            drop false negatives; `None`: no teacher filter.
        teacher_pool: with a teacher, mine `teacher_pool * num_negatives` candidates (within the rank window) for
            it to judge.
        teacher_max_len, teacher_batch_size: the teacher's settings when `teacher` is a name.
        batch_size: texts per forward pass when embedding.
        seed: base of the random sampling strategy's seed (each refresh uses a hash of `(seed, step)`); default:
            the trainer's `seed`.
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        each_epoch: bool = False,
        at_start: bool = False,
        corpus: Sequence[str] | None = None,
        corpus_files: Sequence[str | os.PathLike] | None = None,
        require_positives_in_corpus: bool = True,
        num_negatives: int | None = None,
        range_min: int = 0,
        range_max: int | None = None,
        absolute_margin: float | None = None,
        relative_margin: float | None = None,
        max_score: float | None = None,
        sampling_strategy: str = "top",
        teacher: Any = None,
        teacher_pool: int = 3,
        teacher_max_len: int = 512,
        teacher_batch_size: int = 64,
        batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise ValueError(f"every_n_steps (refresh_negatives_steps) must be >= 1, got {every_n_steps}")
        if every_n_steps is None and not each_epoch and not at_start:
            raise ValueError("HardNegativeRefresh needs every_n_steps, each_epoch or at_start")
        if num_negatives is not None and num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if teacher_pool < 1:
            raise ValueError(f"teacher_pool must be >= 1, got {teacher_pool}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps = every_n_steps
        self.each_epoch = each_epoch
        self.at_start = at_start
        self.extra_corpus = [text for text in corpus or [] if text.strip()]
        self.corpus_files = [str(path) for path in corpus_files or []]
        for path in self.corpus_files:  # a bad file fails here, naming its line, before any model loads
            self.extra_corpus.extend(load_corpus_file(path))
        self.require_positives_in_corpus = require_positives_in_corpus
        self.num_negatives = num_negatives
        self.mining_options = {
            "range_min": range_min,
            "range_max": range_max,
            "absolute_margin": absolute_margin,
            "relative_margin": relative_margin,
            "max_score": max_score,
            "sampling_strategy": sampling_strategy,
        }
        self.teacher = teacher
        self.teacher_pool = teacher_pool
        self.teacher_max_len = teacher_max_len
        self.teacher_batch_size = teacher_batch_size
        self.batch_size = batch_size
        self.seed = seed
        self.trainer: Any = None
        self.corpus_texts: list[str] = []
        self.corpus_fingerprint: str | None = None
        self.negatives: list[list[int]] | None = None
        self.last_refresh_step: int | None = None

    @classmethod
    def from_config(cls, args: Any) -> HardNegativeRefresh | None:
        """The callback a `RetrieverConfig`'s `refresh_negatives*` fields describe (`None` when off)."""
        if getattr(args, "refresh_negatives", "no") == "no":
            return None
        return cls(
            every_n_steps=args.refresh_negatives_steps if args.refresh_negatives == "steps" else None,
            each_epoch=args.refresh_negatives == "epoch",
            at_start=args.refresh_negatives_at_start,
            corpus_files=args.refresh_negatives_corpus,
            num_negatives=args.refresh_negatives_num,
            range_max=args.refresh_negatives_range_max,
            relative_margin=args.refresh_negatives_relative_margin,
            teacher=args.refresh_negatives_teacher,
            teacher_pool=args.refresh_negatives_teacher_pool,
            teacher_max_len=getattr(args, "teacher_max_len", 512),
            batch_size=args.refresh_negatives_batch_size,
        )

    # ------------------------------------------------------------------------------------------ before weights
    def check_before_training(
        self, records: Sequence[Mapping[str, Any]], args: Any, *, trust_remote_code: bool
    ) -> None:
        """Refuse what would fail or mislead later, before the model loads: a corpus without the training positives,
        a teacher whose tokenizer does not match its weights, and settings a refresh cannot honour."""
        if getattr(args, "max_tokens_per_batch", None):
            raise ValueError(
                "refresh_negatives does not combine with max_tokens_per_batch: the token budget's group sizes are "
                "measured once, on the negatives before the first refresh"
            )
        if self.every_n_steps is not None and getattr(args, "dataloader_num_workers", 0) > 0:
            if not getattr(args, "_num_workers_auto", False):
                raise ValueError(
                    "refresh_negatives=steps needs dataloader_num_workers=0: worker processes hold a copy of the "
                    "records until the epoch ends (refresh_negatives=epoch works with workers)"
                )
            # the one place that decides it: auto workers (2 on CUDA) go, a refresh between steps must reach the
            # records the loader reads
            logger.info("dataloader_num_workers=auto: 0 (a step-based hard-negative refresh changes the records)")
            args.dataloader_num_workers = 0
        if self.extra_corpus and self.require_positives_in_corpus:
            known = {content_key(text) for text in self.extra_corpus}
            missing = [(r, p) for r in records for p in r["pos"] if content_key(p) not in known]
            if missing:
                record, positive = missing[0]
                where = (
                    f"{record['source']}, line {record['line']}"
                    if "source" in record and "line" in record
                    else f"record {record.get('id', '?')}"
                )
                files = ", ".join(self.corpus_files) or "the corpus"
                raise ValueError(
                    f"refresh_negatives_corpus ({files}) lacks {len(missing)} training positive(s), e.g. the positive "
                    f"of {where}: {positive[:80]!r}; the corpus must be the collection the training data comes from"
                )
        if isinstance(self.teacher, (str, os.PathLike)):
            check_teacher_folder(str(self.teacher), trust_remote_code=trust_remote_code)

    def bind(self, trainer: Any) -> None:
        """Called by the trainer once its dataset exists: the records to refresh and the corpus they index."""
        from ark_hf.data.dataset import TrainGroupDataset

        dataset = trainer.train_dataset
        if not isinstance(dataset, TrainGroupDataset):
            raise ValueError("HardNegativeRefresh needs the trainer's TrainGroupDataset (train_data or records)")
        if getattr(trainer, "curriculum", None) is not None:
            raise ValueError("refresh_negatives does not combine with a curriculum (each stage has its own data)")
        if dataset.use_teacher_scores:
            raise ValueError(
                "refresh_negatives replaces the negatives, so precomputed neg_scores would no longer match them; "
                "use an online teacher_model for distillation, or no refresh"
            )
        if getattr(trainer, "is_fsdp_enabled", False):
            raise ValueError("refresh_negatives needs the whole model on every process: not under FSDP")
        self.trainer = trainer
        if self.num_negatives is None:
            self.num_negatives = max(1, dataset.train_group_size - 1)
        if self.seed is None:
            self.seed = trainer.args.seed
        index: dict[int, int] = {}
        texts: list[str] = []
        for text in [p for record in dataset.records for p in record["pos"]] + self.extra_corpus:
            digest = content_key(text)
            if digest not in index:
                index[digest] = len(texts)
                texts.append(text)
        self.corpus_texts = texts
        self._corpus_index = index
        fingerprint = hashlib.sha256()
        for digest in index:
            fingerprint.update(digest.to_bytes(8, "little"))
        self.corpus_fingerprint = fingerprint.hexdigest()[:32]

    # ------------------------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "args": {},
            "attributes": {
                "last_refresh_step": self.last_refresh_step,
                "corpus_fingerprint": self.corpus_fingerprint,
                "negatives": self.negatives,
            },
        }

    def _restore(self, state: Any) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        saved = saved[-1] if isinstance(saved, list) and saved else saved
        attributes = (saved or {}).get("attributes", {}) if isinstance(saved, Mapping) else {}
        if "corpus_fingerprint" not in attributes:
            logger.warning(
                "HardNegativeRefresh: the checkpoint at step %d holds no refreshed negatives; training goes on with "
                "the records' negatives until the next refresh",
                state.global_step,
            )
            return
        if attributes["corpus_fingerprint"] != self.corpus_fingerprint:
            raise ValueError(
                f"the checkpoint at step {state.global_step} refreshed negatives from another corpus (fingerprint "
                f"{attributes['corpus_fingerprint']} != {self.corpus_fingerprint}); restore that run's training data "
                "and refresh_negatives_corpus, or start a new run"
            )
        self.last_refresh_step = attributes["last_refresh_step"]
        if attributes["negatives"] is not None:
            self._apply(attributes["negatives"])
            logger.info("HardNegativeRefresh: negatives of step %s restored", self.last_refresh_step)

    def _apply(self, negatives: list[list[int]]) -> None:
        records = self.trainer.train_dataset.records
        if len(negatives) != len(records):
            raise ValueError(f"{len(negatives)} negative lists for {len(records)} records: not this run's data")
        for record, rows in zip(records, negatives):
            record["neg"] = [self.corpus_texts[i] for i in rows]
        self.negatives = [list(rows) for rows in negatives]

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "HardNegativeRefresh is not bound to a trainer: pass it to an ark_hf trainer's callbacks=[...] or set "
                "config.refresh_negatives"
            )
        if isinstance(self.teacher, (str, os.PathLike)):
            self.teacher = self._load_teacher(str(self.teacher))
        if state.global_step > 0:
            self._restore(state)
        elif self.at_start and not self.each_epoch:
            self.refresh(model, state.global_step)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        # an epoch begins at an integer epoch count; a run resumed mid-epoch re-enters that epoch at a fraction
        at_boundary = state.global_step == 0 or float(state.epoch or 0.0).is_integer()
        if self.each_epoch and at_boundary and self.last_refresh_step != state.global_step:
            self.refresh(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (
            self.every_n_steps is not None
            and step % self.every_n_steps == 0
            and step < state.max_steps
            and self.last_refresh_step != step
        ):
            self.refresh(model, step)

    # ------------------------------------------------------------------------------------------ the refresh
    def _load_teacher(self, name: str) -> Any:
        from ark_hf.models.teacher import TeacherScorer

        online = getattr(self.trainer, "teacher", None)  # the KD teacher, when it is the same model
        if online is not None and getattr(self.trainer.args, "teacher_model", None) == name:
            return online
        return TeacherScorer(
            name,
            max_length=self.teacher_max_len,
            batch_size=self.teacher_batch_size,
            device=self.trainer.args.device,
            trust_remote_code=getattr(self.trainer.args, "trust_remote_code", False),
        )

    def _distribute(self, texts: list[str], encode: Any) -> tuple[torch.Tensor, Any]:
        """Each process embeds a contiguous shard of `texts`; the shards are gathered in order on every process."""
        accelerator = self.trainer.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        if world == 1:
            return encode(texts)
        from ark_hf.utils.distributed import all_gather_no_grad

        per = math.ceil(len(texts) / world)
        shard = texts[rank * per : (rank + 1) * per]
        dense = encode(shard or texts[:1])[0][: len(shard)]
        padded = torch.zeros(per, dense.size(1), dtype=dense.dtype)
        padded[: len(shard)] = dense
        gathered = all_gather_no_grad(padded.to(self.trainer.args.device)).cpu()
        return gathered[: len(texts)], None  # shards are contiguous and only the last ones are short

    def _mining_seed(self, step: int) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.seed}:{step}".encode()).digest()[:4], "big")

    def _query_texts(self) -> list[dict[str, Any]]:
        """The records as mining reads them, each with the instruction its training groups use."""
        dataset = self.trainer.train_dataset
        return [
            {**record, "prompt": dataset._query_instruction(record), "source_index": record.get("source_index", 0)}
            for record in dataset.records
        ]

    @torch.no_grad()
    def refresh(self, model: Any, step: int) -> dict[str, float]:
        """Re-mine every record's negatives with `model` now, hand them to the dataset and log the refresh."""
        trainer = self.trainer
        module = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
        start = time.perf_counter()
        embedded: dict[str, torch.Tensor] = {}

        def distribute(texts: list[str], encode: Any) -> tuple[torch.Tensor, Any]:
            dense, lexical = self._distribute(texts, encode)
            embedded["corpus" if "corpus" not in embedded else "queries"] = dense
            return dense, lexical

        records = self._query_texts()
        pool = self.num_negatives
        options = dict(self.mining_options)
        if self.teacher is not None:
            pool = self.num_negatives * self.teacher_pool
            if options["range_max"] is not None:
                pool = min(pool, options["range_max"] - options["range_min"])
        # the training run's mixed precision (bf16 autocast on a GPU): the re-encoding costs what a forward costs
        with trainer.accelerator.autocast():
            result = mine_hard_negatives(
                records,
                module,
                corpus=self.extra_corpus,
                num_negatives=pool,
                query_instruction_format=trainer.args.query_instruction_format,
                query_max_len=trainer.args.query_max_len,
                passage_max_len=trainer.args.passage_max_len,
                batch_size=self.batch_size,
                seed=self._mining_seed(step),
                show_progress_bar=False,
                distribute=distribute,
                **options,
            )
        candidates = [[self._corpus_index[content_key(text)] for text in out["neg"]] for out in result.records]
        filtered = 0
        if self.teacher is not None:
            candidates, filtered = self._teacher_filter(records, candidates)
        negatives = [rows[: self.num_negatives] for rows in candidates]
        negatives = self._broadcast(negatives)
        previous = self.negatives
        if previous is None:
            previous = [
                [self._corpus_index.get(content_key(t), -1) for t in record.get("neg") or []]
                for record in trainer.train_dataset.records
            ]
        self._apply(negatives)
        self.last_refresh_step = step
        metrics = {
            "hard_negatives/seconds": round(time.perf_counter() - start, 4),
            "hard_negatives/corpus": float(len(self.corpus_texts)),
            "hard_negatives/margin": self._margin(records, embedded, negatives),
            "hard_negatives/full_group_share": sum(len(n) >= self.num_negatives for n in negatives) / len(negatives),
            "hard_negatives/teacher_filtered": float(filtered),
            "hard_negatives/changed_share": sum(a != b for a, b in zip(negatives, previous)) / len(negatives),
        }
        logger.info("HardNegativeRefresh at step %d: %s", step, metrics)
        # every process logs, so the history stays the same; report_to writes on the main one. Logging clears the
        # step's `should_log`, which the Trainer reads after this callback: kept, or the step's loss would go unlogged
        should_log = trainer.control.should_log
        trainer.log(metrics)
        trainer.control.should_log = should_log
        return metrics

    def _teacher_filter(
        self, records: list[dict[str, Any]], candidates: list[list[int]]
    ) -> tuple[list[list[int]], int]:
        """Drop the candidates the teacher scores at or above the record's lowest positive; records are shared out
        over the processes and the results gathered."""
        from ark_hf.data.dataset import format_instruction

        accelerator = self.trainer.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        fmt = self.trainer.args.query_instruction_format
        kept: dict[int, list[int]] = {}
        dropped = 0
        for index in range(rank, len(records), world):
            record, rows = records[index], candidates[index]
            if not rows:
                kept[index] = []
                continue
            query = format_instruction(record["query"], record.get("prompt"), fmt)
            texts = list(record["pos"]) + [self.corpus_texts[i] for i in rows]
            scores = self.teacher.score([query], texts)[0].float().cpu().tolist()
            positive = min(scores[: len(record["pos"])])
            survivors = [row for row, score in zip(rows, scores[len(record["pos"]) :]) if score < positive]
            dropped += len(rows) - len(survivors)
            kept[index] = survivors
        if world > 1:
            import torch.distributed as dist

            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, (kept, dropped))
            kept = {k: v for part_kept, _ in parts for k, v in part_kept.items()}
            dropped = sum(part_dropped for _, part_dropped in parts)
        return [kept[i] for i in range(len(records))], dropped

    def _broadcast(self, negatives: list[list[int]]) -> list[list[int]]:
        """Process 0's negatives on every process (the same by construction; a broadcast makes it certain)."""
        if self.trainer.accelerator.num_processes == 1:
            return negatives
        import torch.distributed as dist

        box = [negatives]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _margin(
        self, records: list[dict[str, Any]], embedded: dict[str, torch.Tensor], negatives: list[list[int]]
    ) -> float:
        """Mean over records with negatives of (lowest positive score - mean negative score), current model."""
        from ark_hf.data.dataset import format_instruction

        corpus, queries = embedded.get("corpus"), embedded.get("queries")
        if corpus is None or queries is None:
            return float("nan")
        fmt = self.trainer.args.query_instruction_format
        query_row: dict[str, int] = {}
        for record in records:
            query_row.setdefault(format_instruction(record["query"], record.get("prompt"), fmt), len(query_row))
        margins = []
        for record, rows in zip(records, negatives):
            if not rows:
                continue
            q = queries[query_row[format_instruction(record["query"], record.get("prompt"), fmt)]]
            positives = [self._corpus_index[content_key(p)] for p in record["pos"]]
            positive = float((corpus[positives] @ q).min())
            margins.append(positive - float((corpus[rows] @ q).mean()))
        return sum(margins) / len(margins) if margins else float("nan")
