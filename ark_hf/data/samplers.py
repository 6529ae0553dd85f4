"""Batch samplers: plain shuffled, same-source, no-duplicate and length-grouped batches.

Every sampler is a pure function of `(seed, epoch)`: `set_epoch` reshuffles, and a resumed run that skips
the first k batches of an epoch sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

from torch.utils.data import BatchSampler, SequentialSampler

__all__ = [
    "RetrievalBatchSampler",
    "SameSourceBatchSampler",
    "NoDuplicatesBatchSampler",
    "LengthGroupedBatchSampler",
]


class RetrievalBatchSampler(BatchSampler):
    """Shuffled batches of `batch_size` record indices, reshuffled each epoch from `seed`."""

    def __init__(self, num_records: int, batch_size: int, *, seed: int = 42, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # BatchSampler's own attributes, read by accelerate when it shards batches across processes
        super().__init__(SequentialSampler(range(num_records)), batch_size, drop_last)
        self.num_records = num_records
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self) -> random.Random:
        return random.Random(f"{type(self).__name__}:{self.seed}:{self.epoch}")

    def _batches(self) -> list[list[int]]:
        order = list(range(self.num_records))
        self._rng().shuffle(order)
        return self._chunk(order, self.batch_size)

    def _chunk(self, order: list[int], size: int) -> list[list[int]]:
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def _epoch_batches(self) -> list[list[int]]:
        # __len__ is asked often (Trainer, accelerate); build each epoch's batches once
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._batches())
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._epoch_batches()

    def __len__(self) -> int:
        return len(self._epoch_batches())


class SameSourceBatchSampler(RetrievalBatchSampler):
    """Every batch comes from one source file (FlagEmbedding's `same_dataset_within_batch`).

    Useful when sources differ in task or language, so in-batch negatives stay meaningful. Each source may
    have its own batch size (`source_batch_sizes`), e.g. smaller batches for a long-document source.
    Batches never mix sources; the order of batches is shuffled across sources.
    """

    def __init__(
        self,
        source_indices: Sequence[int],
        batch_size: int,
        *,
        source_batch_sizes: Mapping[int, int] | None = None,
        seed: int = 42,
        drop_last: bool = False,
    ) -> None:
        super().__init__(len(source_indices), batch_size, seed=seed, drop_last=drop_last)
        self.source_indices = list(source_indices)
        self.source_batch_sizes = dict(source_batch_sizes or {})

    def _batches(self) -> list[list[int]]:
        rng = self._rng()
        by_source: dict[int, list[int]] = defaultdict(list)
        for index, source in enumerate(self.source_indices):
            by_source[source].append(index)
        batches: list[list[int]] = []
        for source in sorted(by_source):
            indices = by_source[source]
            rng.shuffle(indices)
            batches.extend(self._chunk(indices, self.source_batch_sizes.get(source, self.batch_size)))
        rng.shuffle(batches)
        return batches


class NoDuplicatesBatchSampler(RetrievalBatchSampler):
    """No text appears twice in a batch (a duplicate would be a false negative for another query).

    `texts[i]` lists the texts of record i (query and positives); records are added greedily in shuffled
    order and a record that clashes waits for a later batch, as sentence-transformers' sampler does.
    """

    def __init__(
        self, texts: Sequence[Sequence[str]], batch_size: int, *, seed: int = 42, drop_last: bool = False
    ) -> None:
        super().__init__(len(texts), batch_size, seed=seed, drop_last=drop_last)
        self.texts = [tuple(t) for t in texts]

    def _batches(self) -> list[list[int]]:
        order = list(range(self.num_records))
        self._rng().shuffle(order)
        remaining = dict.fromkeys(order)  # insertion-ordered, O(1) removal
        batches: list[list[int]] = []
        while remaining:
            batch: list[int] = []
            seen: set[str] = set()
            for index in remaining:
                if seen.isdisjoint(self.texts[index]):
                    batch.append(index)
                    seen.update(self.texts[index])
                    if len(batch) == self.batch_size:
                        break
            for index in batch:
                del remaining[index]
            if len(batch) < self.batch_size and self.drop_last:
                break
            batches.append(batch)
        return batches


class LengthGroupedBatchSampler(RetrievalBatchSampler):
    """Batches of similar length to cut padding: shuffle, cut into mega-batches of `mega_batch_factor`
    batches, sort each by length (longest first), chunk; then shuffle the batch order."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        mega_batch_factor: int = 50,
        seed: int = 42,
        drop_last: bool = False,
    ) -> None:
        super().__init__(len(lengths), batch_size, seed=seed, drop_last=drop_last)
        self.lengths = list(lengths)
        self.mega_batch_factor = mega_batch_factor

    def _batches(self) -> list[list[int]]:
        rng = self._rng()
        order = list(range(self.num_records))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches
