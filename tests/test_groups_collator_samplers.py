"""Group sampling, collation and batch samplers: determinism, roles, and each batching option's promise."""

from __future__ import annotations

import pytest
import torch

from ark_hf import assets
from ark_hf.data.collator import RetrievalCollator, text_hash
from ark_hf.data.dataset import TrainGroupDataset, format_instruction
from ark_hf.data.samplers import (
    LengthGroupedBatchSampler,
    NoDuplicatesBatchSampler,
    RetrievalBatchSampler,
    SameSourceBatchSampler,
)


def records(n: int = 20, negs: int = 5, scores: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        rec = {
            "query": f"query {i}",
            "pos": [f"positive {i}a", f"positive {i}b"],
            "neg": [f"negative {i}-{k}" for k in range(negs)],
            "source_index": i % 2,
            "id": f"train.jsonl:{i + 1}",
        }
        if scores:
            rec["pos_scores"] = [10.0 + i, 20.0 + i]
            rec["neg_scores"] = [float(k) for k in range(negs)]
        out.append(rec)
    return out


def test_group_has_positive_first_and_never_the_positive_as_negative():
    ds = TrainGroupDataset(records(), train_group_size=4, seed=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["passages"][0] in ds.records[i]["pos"]
            assert len(item["passages"]) == 4
            assert not set(item["passages"][1:]) & set(ds.records[i]["pos"])
            assert len(set(item["passages"][1:])) == 3  # enough negatives: sampled without replacement


def test_sampling_is_a_function_of_seed_epoch_index():
    a = TrainGroupDataset(records(), train_group_size=3, seed=7)
    b = TrainGroupDataset(records(), train_group_size=3, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    a.set_epoch(3)
    assert [a[i]["passages"] for i in range(20)] != [b[i]["passages"] for i in range(20)]


def test_few_negatives_repeat_and_missing_negatives_are_filled_from_other_records():
    ds = TrainGroupDataset(records(negs=1), train_group_size=4)
    item = ds[0]
    assert item["passages"][1:] == ["negative 0-0"] * 3
    ds = TrainGroupDataset(records(negs=0), train_group_size=3)
    assert ds.num_filled == 20
    for i in range(20):
        group = ds[i]["passages"]
        assert all(p.startswith("positive") and p not in ds.records[i]["pos"] for p in group[1:])


def test_teacher_scores_follow_the_sampled_passages():
    ds = TrainGroupDataset(records(scores=True), train_group_size=4, use_teacher_scores=True)
    for i in range(20):
        item = ds[i]
        rec = ds.records[i]
        expected = [rec["pos_scores"][rec["pos"].index(item["passages"][0])]]
        expected += [rec["neg_scores"][rec["neg"].index(p)] for p in item["passages"][1:]]
        assert item["teacher_scores"] == expected


def test_instructions_never_insert_none():
    assert format_instruction("q", None, "{}{}") == "q"
    assert format_instruction("q", "", "Instruct: {}\nQuery:{}") == "q"
    assert format_instruction("q", "Find", "Instruct: {}\nQuery:{}") == "Instruct: Find\nQuery:q"
    recs = records()
    recs[0]["prompt"] = "Own task"
    ds = TrainGroupDataset(recs, train_group_size=1, query_instruction={0: "Even", 1: "Odd"},
                           query_instruction_format="Instruct: {}\nQuery:{}")  # fmt: skip
    assert ds[0]["query"] == "Instruct: Own task\nQuery:query 0"
    assert ds[1]["query"] == "Instruct: Odd\nQuery:query 1"
    assert ds[2]["query"] == "Instruct: Even\nQuery:query 2"


def test_collator_separate_lengths_hashes_and_scores(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    ds = TrainGroupDataset(records(scores=True), train_group_size=2, use_teacher_scores=True)
    items = [ds[0], ds[1], ds[2]]
    items[2]["passages"][1] = items[0]["passages"][0]  # a duplicate text in another group
    batch = RetrievalCollator(tok, query_max_len=4, passage_max_len=6)(items)
    assert batch["query"]["input_ids"].shape[1] <= 4
    assert batch["passages"]["input_ids"].shape == (6, batch["passages"]["input_ids"].shape[1])
    assert batch["passages"]["input_ids"].shape[1] <= 6
    hashes = batch["passage_hashes"]
    assert hashes[5] == hashes[0] and hashes[0] != hashes[1]
    assert hashes[0] == text_hash(items[0]["passages"][0])
    assert batch["teacher_scores"].shape == (3, 2)
    assert batch["record_ids"] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]


def test_collator_appends_eos_after_truncation():
    tok = assets.build_qwen3_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    items = [{"query": "a short query", "passages": ["word " * 50, "tiny"]}]
    for side in ("left", "right"):
        tok.padding_side = side
        batch = RetrievalCollator(tok, query_max_len=8, passage_max_len=10, append_eos_token_id=eos)(items)
        ids, mask = batch["passages"]["input_ids"], batch["passages"]["attention_mask"]
        assert ids.shape[1] == 10
        for row in range(2):
            real = ids[row][mask[row].bool()].tolist()
            assert real[-1] == eos and real.count(eos) == 1
            assert real[:-1] == tok(items[0]["passages"][row], add_special_tokens=False)["input_ids"][:9]


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_default_sampler_covers_everything_and_reshuffles():
    sampler = RetrievalBatchSampler(23, 4, seed=3)
    first = epoch_batches(sampler, 0)
    assert sorted(i for b in first for i in b) == list(range(23))
    assert len(sampler) == 6 and [len(b) for b in first][:5] == [4] * 5
    assert first != epoch_batches(sampler, 1)
    assert first == epoch_batches(RetrievalBatchSampler(23, 4, seed=3), 0)
    assert all(len(b) == 4 for b in epoch_batches(RetrievalBatchSampler(23, 4, drop_last=True), 0))


def test_same_source_batches_use_one_source_and_its_batch_size():
    sources = [0] * 13 + [1] * 9 + [2] * 5
    sampler = SameSourceBatchSampler(sources, 4, source_batch_sizes={1: 3})
    batches = epoch_batches(sampler, 0)
    assert sorted(i for b in batches for i in b) == list(range(27))
    for b in batches:
        assert len({sources[i] for i in b}) == 1
        assert len(b) <= (3 if sources[b[0]] == 1 else 4)
    assert {len(b) for b in batches if sources[b[0]] == 1} == {3}


def test_no_duplicate_batches():
    texts = [[f"q{i}", f"answer {i % 5}"] for i in range(30)]  # answers repeat every 5 records
    batches = epoch_batches(NoDuplicatesBatchSampler(texts, 5), 0)
    assert sorted(i for b in batches for i in b) == list(range(30))
    for b in batches:
        flat = [t for i in b for t in texts[i]]
        assert len(flat) == len(set(flat))


def test_length_grouped_batches_cut_padding():
    lengths = [((i * 37) % 101) + 1 for i in range(400)]
    grouped = epoch_batches(LengthGroupedBatchSampler(lengths, 8, mega_batch_factor=50), 0)
    plain = epoch_batches(RetrievalBatchSampler(400, 8), 0)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert padding(grouped) < padding(plain) / 3


@pytest.mark.parametrize("cls_args", [("default",), ("same",), ("nodup",), ("length",)])
def test_samplers_are_deterministic(cls_args):
    make = {
        "default": lambda: RetrievalBatchSampler(50, 4, seed=9),
        "same": lambda: SameSourceBatchSampler([i % 3 for i in range(50)], 4, seed=9),
        "nodup": lambda: NoDuplicatesBatchSampler([[str(i % 17)] for i in range(50)], 4, seed=9),
        "length": lambda: LengthGroupedBatchSampler([i % 11 for i in range(50)], 4, seed=9),
    }[cls_args[0]]
    assert epoch_batches(make(), 4) == epoch_batches(make(), 4)
    assert epoch_batches(make(), 4) != epoch_batches(make(), 5)


def test_group_size_mismatch_in_a_batch_is_an_error(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    with pytest.raises(ValueError, match="same size"):
        RetrievalCollator(tok)([{"query": "a", "passages": ["x"]}, {"query": "b", "passages": ["y", "z"]}])


def test_hash_is_stable_and_signed_63_bits():
    assert text_hash("hello") == text_hash("hello") != text_hash("hello ")
    assert 0 <= text_hash("x") < 2**63
    assert torch.tensor([text_hash("x")]).dtype == torch.long
