"""Token-budget batching: every batch within budget, every record once per epoch, bounds that hold."""

from __future__ import annotations

import random

import pytest

from ark_hf import assets
from ark_hf.data.dataset import TrainGroupDataset
from ark_hf.data.token_budget import TokenBudgetBatchSampler, group_token_bounds


def _records(n=40, seed=0):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(["permit", "roof", "Genehmigung", "office", "x", "neighbour"]) for _ in range(k))

    records = []
    for i in range(n):
        negs = [text(rng.randint(1, 60)) for _ in range(rng.choice([0, 1, 2, 5]))]
        records.append({"query": f"q{i} " + text(rng.randint(2, 12)), "pos": [text(rng.randint(3, 80))], "neg": negs})
    return records


@pytest.mark.parametrize("mega", [0, 16])
def test_batches_fit_the_budget_and_cover_each_record_once(mega):
    rng = random.Random(1)
    tokens = [int(rng.lognormvariate(5, 0.7)) + 10 for _ in range(200)]
    budget = max(tokens) + 300
    sampler = TokenBudgetBatchSampler(tokens, budget, mega_batch_size=mega, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(sampler.batch_tokens(b) <= budget for b in batches)
        assert sum(tokens) / len(batches) > budget / 2
        assert list(sampler) == batches  # a pure function of (seed, epoch)
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    assert sampler.batch_size >= max(len(b) for b in epochs[0] + epochs[1])


def test_max_batch_size_and_drop_last():
    sampler = TokenBudgetBatchSampler([10] * 25, 1000, max_batch_size=4)
    batches = list(sampler)
    assert max(len(b) for b in batches) == 4 and len(batches) == 7
    dropped = list(TokenBudgetBatchSampler([10] * 24, 100, drop_last=True))
    assert sorted(len(b) for b in dropped) == [10, 10]  # the tail of 4 groups (40 tokens) is under half the budget


def test_budget_smaller_than_a_group_is_refused():
    with pytest.raises(ValueError, match=r"max_tokens_per_batch=100 is smaller than the group of record 2 \(150"):
        TokenBudgetBatchSampler([20, 90, 150, 30], 100)
    with pytest.raises(ValueError, match="max_batch_size"):
        TokenBudgetBatchSampler([20], 100, max_batch_size=0)


def test_group_token_bounds_hold_for_every_sampled_group():
    tokenizer = assets.build_xlmr_tokenizer()

    def count(texts, max_length):
        return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]

    records = _records()
    dataset = TrainGroupDataset(records, train_group_size=4, query_instruction="Represent: ")
    bounds = group_token_bounds(dataset, count, query_max_len=16, passage_max_len=48)
    tight = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index, bound in enumerate(bounds):
            item = dataset[index]
            actual = count([item["query"]], 16)[0] + sum(count(item["passages"], 48))
            assert actual <= bound, (index, epoch)
            tight += actual == bound
    assert tight > 0  # the bound is attained, not loose everywhere
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        TokenBudgetBatchSampler(bounds, max(bounds) - 1)
