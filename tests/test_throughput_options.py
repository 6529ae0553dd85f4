"""Speed options of the trainers: token-budget batching, whole-group length grouping, kernel switches."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from ark_hf.data.samplers import LengthGroupedBatchSampler
from ark_hf.data.token_budget import TokenBudgetBatchSampler
from ark_hf.models import kernels
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer
from ark_hf.trainer.qwen_config import QwenTrainerConfig
from ark_hf.trainer.qwen_trainer import QwenTrainer

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

WORDS = ["permit", "roof", "Genehmigung", "office", "neighbour", "facade", "licencia", "plazo", "scaffold"]


def variable_records(n: int = 12, seed: int = 0) -> list[dict]:
    """Long-tailed lengths: short queries and positives, some long negatives (the case grouping must see)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {
            "query": f"q{i} " + text(rng.randint(2, 6)),
            "pos": [text(rng.randint(3, 10))],
            "neg": [text(rng.choice([2, 4, 30])) for _ in range(3)],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def xlmr_no_dropout(tiny_xlmr_path, tmp_path_factory):
    """The tiny XLM-R without dropout, so padded and packed runs see the same function."""
    folder = tmp_path_factory.mktemp("xlmr_nodrop")
    config = AutoConfig.from_pretrained(tiny_xlmr_path)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_xlmr_path, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_xlmr_path).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def xlmr_tokenizer(tiny_xlmr_path):
    return AutoTokenizer.from_pretrained(tiny_xlmr_path)


QUICK = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=11)


def bge_config(tmp_path, name, **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=3, train_group_size=3, query_max_len=12,
        passage_max_len=24, max_steps=2, learning_rate=1e-3, init_missing_heads=True, **QUICK,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


def bge_trainer(path, tokenizer, config, records) -> BGETrainer:
    torch.manual_seed(0)
    model = BGEM3Model(path, tokenizer=tokenizer, init_missing_heads=True, padding_free=config.padding_free)
    return BGETrainer(model=model, config=config, train_dataset=records)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def count(tokenizer, texts, max_length):
    return [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]


# --------------------------------------------------------------------------------------------- token budget
def test_packed_step_with_token_budget_trains_within_budget(xlmr_no_dropout, xlmr_tokenizer, tmp_path):
    records = variable_records()
    config = bge_config(
        tmp_path, "budget", padding_free=True, max_tokens_per_batch=260, unified_finetuning=True, use_self_distill=True
    )
    trainer = bge_trainer(xlmr_no_dropout, xlmr_tokenizer, config, records)
    sampler = trainer.build_batch_sampler(trainer.train_dataset)
    assert isinstance(sampler, TokenBudgetBatchSampler)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # every batch's real tokens (as the collator makes them) stay within the budget, whatever negatives it draws
    for epoch in range(3):
        trainer.train_dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for batch in sampler:
            batch_features = trainer.data_collator([trainer.train_dataset[i] for i in batch])
            real = sum(int(batch_features[k]["attention_mask"].sum()) for k in ("query", "passages"))
            assert real <= 260
    assert len({len(b) for b in sampler}) > 1  # the number of groups per step follows their lengths
    trainer.train()
    values = losses(trainer)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("model.") for n in moved) and any("colbert" in n for n in moved)


@pytest.mark.parametrize("budget", [None, 400])
def test_padded_and_packed_trainer_runs_give_equal_losses(xlmr_no_dropout, xlmr_tokenizer, tmp_path, budget):
    records = variable_records()
    runs = {}
    for padding_free in (False, True):
        config = bge_config(
            tmp_path, f"run{padding_free}{budget}", padding_free=padding_free, max_tokens_per_batch=budget,
            unified_finetuning=True, use_self_distill=True,
        )  # fmt: skip
        trainer = bge_trainer(xlmr_no_dropout, xlmr_tokenizer, config, records)
        trainer.train()
        runs[padding_free] = losses(trainer)
    assert len(runs[False]) == 2
    assert runs[True] == pytest.approx(runs[False], abs=1e-5, rel=1e-5)


def test_qwen_padded_and_packed_runs_give_equal_losses(tiny_qwen3_path, tmp_path):
    records = variable_records(n=8, seed=3)
    runs = {}
    for padding_free in (False, True):
        config = QwenTrainerConfig(
            output_dir=str(tmp_path / f"q{padding_free}"), model_name_or_path=tiny_qwen3_path, max_steps=2,
            per_device_train_batch_size=2, train_group_size=3, query_max_len=16, passage_max_len=24,
            learning_rate=1e-3, padding_free=padding_free, max_tokens_per_batch=300, torch_dtype="float32", **QUICK,
        )  # fmt: skip
        torch.manual_seed(0)
        trainer = QwenTrainer(config=config, train_dataset=records)
        trainer.train()
        runs[padding_free] = losses(trainer)
    assert len(runs[False]) == 2 and all(math.isfinite(v) for v in runs[False])
    assert runs[True] == pytest.approx(runs[False], abs=1e-5, rel=1e-5)


def test_budget_smaller_than_a_group_is_refused_naming_key_and_line(xlmr_tokenizer, tiny_xlmr_path, tmp_path):
    records = variable_records()
    records[5]["pos"] = [" ".join(["Genehmigung"] * 40)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = bge_config(
        tmp_path, "small", train_data=[str(data)], max_tokens_per_batch=50, train_group_size=1, passage_max_len=64
    )
    trainer = bge_trainer(tiny_xlmr_path, xlmr_tokenizer, config, None)
    with pytest.raises(
        ValueError,
        match=r"max_tokens_per_batch=50 is smaller than the training group of .*train\.jsonl, line 6: \d+ tokens",
    ):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_tokens_per_batch": 0}, "max_tokens_per_batch must be >= 1"),
        ({"max_tokens_per_batch": 100, "mini_batch_size": 2}, "max_tokens_per_batch and mini_batch_size"),
        ({"max_tokens_per_batch": 100, "no_duplicates_in_batch": True}, "max_tokens_per_batch does not combine"),
        ({"use_liger_kernel": True}, "set liger_kernel=True instead"),
    ],
)
def test_bad_speed_options_are_refused_in_the_config(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        bge_config(tmp_path, "bad", **fields)


# ------------------------------------------------------------------------------------------- length grouping
def test_group_by_length_counts_the_whole_group(xlmr_tokenizer, tiny_xlmr_path, tmp_path):
    records = variable_records(n=10, seed=5)
    config = bge_config(tmp_path, "len", train_sampling_strategy="group_by_length")
    trainer = bge_trainer(tiny_xlmr_path, xlmr_tokenizer, config, records)
    sampler = trainer.build_batch_sampler(trainer.train_dataset)
    assert isinstance(sampler, LengthGroupedBatchSampler)
    # independent count: query + longest positive + the two longest negatives (train_group_size 3), in tokens
    expected = []
    for r in records:
        negatives = sorted(count(xlmr_tokenizer, r["neg"], 24), reverse=True)[:2]
        expected.append(
            count(xlmr_tokenizer, [r["query"]], 12)[0] + max(count(xlmr_tokenizer, r["pos"], 24)) + sum(negatives)
        )
    assert sampler.lengths == expected
    # and it differs from the query + positive length the negatives would be ignored by
    short = [count(xlmr_tokenizer, [r["query"]], 12)[0] + count(xlmr_tokenizer, r["pos"], 24)[0] for r in records]
    order = sorted(range(10), key=lambda i: -expected[i])
    assert order != sorted(range(10), key=lambda i: -short[i])


# --------------------------------------------------------------------------------------------- kernel switches
def test_liger_switch_warns_once_and_falls_back_on_cpu(xlmr_tokenizer, tiny_qwen3_path, tmp_path, caplog):
    kernels._warned.clear()
    records = variable_records(n=4)
    config = QwenTrainerConfig(
        output_dir=str(tmp_path / "liger"), model_name_or_path=tiny_qwen3_path, max_steps=1,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16,
        liger_kernel=True, torch_dtype="float32", **QUICK,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ark_hf.models.kernels"):
        trainer = QwenTrainer(config=config, train_dataset=records)
        kernels.apply_kernel_switches(trainer.model, config)  # a second application warns no more
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.kernels"]
    assert len(warnings) == 1, warnings
    assert "liger_kernel=True" in warnings[0] and "plain modules" in warnings[0]
    assert math.isfinite(losses(trainer)[0])
    assert type(trainer.model.backbone.norm).__name__ == "Qwen3RMSNorm"  # nothing was patched


def test_liger_switch_names_an_architecture_without_kernels(tiny_xlmr_path, xlmr_tokenizer, caplog, monkeypatch):
    kernels._warned.clear()
    monkeypatch.setitem(__import__("sys").modules, "liger_kernel.transformers", type("M", (), {})())
    model = BGEM3Model(tiny_xlmr_path, tokenizer=xlmr_tokenizer, init_missing_heads=True)
    with caplog.at_level(logging.WARNING, logger="ark_hf.models.kernels"):
        assert kernels.apply_liger_kernel(model, device="cuda") is False
    (message,) = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.kernels"]
    assert "liger_kernel=True" in message and "'xlm-roberta'" in message


def test_compile_switch_warns_once_and_falls_back_without_a_compiler(
    tiny_xlmr_path, xlmr_tokenizer, caplog, monkeypatch
):
    kernels._warned.clear()
    monkeypatch.setattr(kernels, "inductor_available", lambda device: False)
    model = BGEM3Model(tiny_xlmr_path, tokenizer=xlmr_tokenizer, init_missing_heads=True).eval()
    with caplog.at_level(logging.WARNING, logger="ark_hf.models.kernels"):
        assert kernels.apply_kernel_switches(model, compile_backbone=True) == {"compile_backbone": False}
        assert kernels.apply_kernel_switches(model, compile_backbone=True) == {"compile_backbone": False}
    warnings = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.kernels"]
    assert len(warnings) == 1 and "compile_backbone=True" in warnings[0] and "eagerly" in warnings[0]
    assert model.model._compiled_call_impl is None


def test_liger_with_compile_compiles_the_plain_modules(tiny_qwen3_path, caplog, monkeypatch):
    """Both switches on: liger's Triton autograd functions cannot be traced by dynamo, so the backbone is compiled
    without them (one warning naming both switches); where nothing can compile, liger's own rule decides."""
    kernels._warned.clear()
    model = DecoderEmbedder(tiny_qwen3_path)
    monkeypatch.setattr(kernels, "inductor_available", lambda device: True)
    monkeypatch.setattr(kernels, "apply_liger_kernel", lambda *a, **k: pytest.fail("liger applied under compile"))
    with caplog.at_level(logging.WARNING, logger="ark_hf.models.kernels"):
        applied = kernels.apply_kernel_switches(model, liger_kernel=True, compile_backbone=True)
    assert applied == {"liger_kernel": False, "compile_backbone": True}
    assert model.backbone._compiled_call_impl is not None
    (message,) = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.kernels"]
    assert "liger_kernel=True with compile_backbone=True" in message

    monkeypatch.setattr(kernels, "inductor_available", lambda device: False)
    monkeypatch.setattr(kernels, "apply_liger_kernel", lambda *a, **k: True)
    other = DecoderEmbedder(tiny_qwen3_path)
    assert kernels.apply_kernel_switches(other, liger_kernel=True, compile_backbone=True) == {
        "liger_kernel": True, "compile_backbone": False
    }  # fmt: skip


def test_compiled_backbone_keeps_names_and_outputs(tiny_xlmr_path, xlmr_tokenizer):
    model = BGEM3Model(tiny_xlmr_path, tokenizer=xlmr_tokenizer, init_missing_heads=True).eval()
    features = dict(xlmr_tokenizer(["a permit", "the roof of the office"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        eager = model.model(**features).last_hidden_state
    names = list(model.state_dict())
    # the "eager" backend exercises the wrapping (dynamo tracing) without a C++ build on this machine
    assert kernels.apply_torch_compile(model, backend="eager") is True
    assert model.model._compiled_call_impl is not None and list(model.state_dict()) == names
    with torch.no_grad():
        compiled = model.model(**features).last_hidden_state
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)
