"""Batches by token budget: as many training groups per step as fit in `max_tokens_per_batch` real tokens.

With the padding-free forward (`padding_free=True`) a step costs its real tokens, not `texts x longest
text`, so a fixed number of groups per step gives steps of very different cost on long-tailed data. A token
budget bounds every step's tokens (and so its activation memory) and fills short steps with more groups.

The budget counts a group as its query plus `train_group_size` passages. Negatives are sampled anew each
epoch, so `group_token_bounds` gives an upper bound per record that holds for every sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ark_hf.data.dataset import TrainGroupDataset, format_instruction
from ark_hf.data.samplers import RetrievalBatchSampler

__all__ = ["TokenBudgetBatchSampler", "group_token_bounds"]


def group_token_bounds(
    dataset: TrainGroupDataset,
    count_tokens: Callable[[list[str], int], list[int]],
    *,
    query_max_len: int,
    passage_max_len: int,
) -> list[int]:
    """Upper bound of the real tokens of each record's training group, for every epoch's sample.

    `q + max(pos) + N`, where q counts the query with its instruction as the dataset formats it and N the
    negatives the dataset can draw: the `G - 1` longest when a record has at least `G - 1` (drawn without
    replacement), `G - 1` times the longest when it has fewer (drawn with replacement), `G - 1` times
    `passage_max_len` when it has none (filled with other records' passages).

    Args:
        dataset: the training groups (`ark_hf.data.dataset.TrainGroupDataset`).
        count_tokens: `(texts, max_length) -> token counts` as the collator tokenizes them (special tokens
            included, truncated), e.g. `lambda texts, n: [len(x) for x in tokenizer(texts, truncation=True,
            max_length=n)["input_ids"]]`.
        query_max_len, passage_max_len: truncation lengths.
    """
    records = dataset.records

    def passage_text(text: str) -> str:
        if not dataset.passage_instruction:
            return text
        return format_instruction(text, dataset.passage_instruction, dataset.passage_instruction_format)

    queries = [
        format_instruction(r["query"], dataset._query_instruction(r), dataset.query_instruction_format)
        for r in records
    ]
    query_counts = count_tokens(queries, query_max_len)
    passages = [list(r["pos"]) + list(r.get("neg") or []) for r in records]
    flat = count_tokens([passage_text(text) for group in passages for text in group], passage_max_len)
    needed = dataset.train_group_size - 1
    bounds, start = [], 0
    for record, query_tokens, group in zip(records, query_counts, passages):
        counts = flat[start : start + len(group)]
        start += len(group)
        n_pos = len(record["pos"])
        negatives = sorted(counts[n_pos:], reverse=True)
        if needed == 0:
            negative_tokens = 0
        elif not negatives:
            negative_tokens = needed * passage_max_len
        elif len(negatives) >= needed:
            negative_tokens = sum(negatives[:needed])
        else:
            negative_tokens = needed * negatives[0]
        bounds.append(query_tokens + max(counts[:n_pos]) + negative_tokens)
    return bounds


class TokenBudgetBatchSampler(RetrievalBatchSampler):
    """Shuffled batches whose groups' token bounds sum to at most `max_tokens_per_batch`.

    Each epoch: shuffle (from `seed` and the epoch), optionally sort mega-batches of `mega_batch_size`
    records by length (longest first) so that a step holds groups of similar length, fill batches greedily
    in that order (a group that does not fit closes the batch), shuffle the batch order.

    Args:
        group_tokens: token bound of each record's group (`group_token_bounds`).
        max_tokens_per_batch: the budget; must hold the largest group (checked here, before training).
        max_batch_size: optional cap on groups per batch.
        mega_batch_size: records sorted together; 0 (default) keeps the shuffled order.
        seed: base seed of the shuffles.
        drop_last: drop the last batch of each epoch when it is under half the budget.

    Example:
        ```python
        bounds = group_token_bounds(records, count, train_group_size=8, query_max_len=64, passage_max_len=512)
        sampler = TokenBudgetBatchSampler(bounds, max_tokens_per_batch=32768)
        ```
    """

    def __init__(
        self,
        group_tokens: Sequence[int],
        max_tokens_per_batch: int,
        *,
        max_batch_size: int | None = None,
        mega_batch_size: int = 0,
        seed: int = 42,
        drop_last: bool = False,
    ) -> None:
        group_tokens = [int(n) for n in group_tokens]
        if not group_tokens:
            raise ValueError("no training records")
        largest = max(range(len(group_tokens)), key=group_tokens.__getitem__)
        if max_tokens_per_batch < group_tokens[largest]:
            raise ValueError(
                f"max_tokens_per_batch={max_tokens_per_batch} is smaller than the group of record {largest} "
                f"({group_tokens[largest]} tokens: query + train_group_size passages at their truncation lengths); "
                "raise max_tokens_per_batch or lower train_group_size / the max lengths"
            )
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        # BatchSampler's batch_size: the most groups a batch can hold
        most = min(len(group_tokens), max_tokens_per_batch // min(group_tokens))
        super().__init__(len(group_tokens), min(most, max_batch_size or most), seed=seed, drop_last=drop_last)
        self.group_tokens = group_tokens
        self.max_tokens_per_batch = int(max_tokens_per_batch)
        self.max_batch_size = max_batch_size
        self.mega_batch_size = mega_batch_size

    def _batches(self) -> list[list[int]]:
        rng: random.Random = self._rng()
        order = list(range(self.num_records))
        rng.shuffle(order)
        if self.mega_batch_size > 0:
            order = [
                index
                for start in range(0, len(order), self.mega_batch_size)
                for index in sorted(order[start : start + self.mega_batch_size], key=lambda i: -self.group_tokens[i])
            ]
        batches: list[list[int]] = []
        current: list[int] = []
        tokens = 0
        for index in order:
            cost = self.group_tokens[index]
            full = self.max_batch_size is not None and len(current) >= self.max_batch_size
            if current and (tokens + cost > self.max_tokens_per_batch or full):
                batches.append(current)
                current, tokens = [], 0
            current.append(index)
            tokens += cost
        if current and not (self.drop_last and tokens < self.max_tokens_per_batch // 2 and batches):
            batches.append(current)
        rng.shuffle(batches)
        return batches

    def batch_tokens(self, batch: Sequence[int]) -> int:
        """The token bound of a batch (sum of its groups' bounds)."""
        return sum(self.group_tokens[i] for i in batch)
