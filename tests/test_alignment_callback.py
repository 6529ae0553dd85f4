"""`AlignmentEvaluator` and `AlignmentCallback` on tiny models: the metrics reach the Trainer's log history."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ark_hf import AlignmentCallback, BGEM3Model, BGETrainer, BGETrainerConfig, QwenTrainer, QwenTrainerConfig
from ark_hf.evaluation.alignment import AlignmentEvaluator
from ark_hf.evaluation.base import Evaluator
from ark_hf.models.decoder import DecoderEmbedder

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

QUICK = dict(use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=3)


def probe_records(n=6):
    """Scored records as `score_file` writes them (scores made up: the callback only reads them)."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        chunks = [f"Permit {i} takes {i + 2} weeks.", f"The library opens at {i}.", f"Sheds of {i} m2 need no permit."]
        entries = [
            {"forward": float(f), "backward": float(b), "parameter": float(p), "tokens": 10, "score": float(s)}
            for f, b, p, s in rng.normal(size=(3, 4))
        ]
        records.append({"query": f"how long for permit {i}?", "pos": chunks[:1], "neg": chunks[1:],
                        "alignment": {"index": i, "pos": entries[:1], "neg": entries[1:]}})  # fmt: skip
    return records


def train_records(n=8):
    return [
        {"query": f"question {i} about permits", "pos": [f"answer {i}: {i} weeks"], "neg": [f"other {i} {k}" for k in range(2)]}
        for i in range(n)
    ]  # fmt: skip


def ranks(values):
    return np.argsort(np.argsort(values)).astype(np.float64)


def test_evaluator_is_the_mean_per_query_spearman(tiny_qwen3_path):
    model = DecoderEmbedder(tiny_qwen3_path).eval()
    records = probe_records()
    evaluator = AlignmentEvaluator(records, query_max_len=32, passage_max_len=32)
    assert isinstance(evaluator, Evaluator)
    metrics = evaluator(model)
    expected = {"forward": [], "backward": [], "parameter": []}
    for record in records:
        q = model.encode(record["query"], max_length=32)
        d = model.encode(record["pos"] + record["neg"], max_length=32)
        s = d.astype(np.float64) @ q.astype(np.float64)
        entries = record["alignment"]["pos"] + record["alignment"]["neg"]
        for key in expected:
            expected[key].append(np.corrcoef(ranks(s), ranks([e[key] for e in entries]))[0, 1])
    for key, values in expected.items():
        assert metrics[f"align/{key}"] == pytest.approx(float(np.mean(values)), abs=1e-9)
    evaluator.set_anchor(model)
    assert evaluator(model)["align/parameter"] == pytest.approx(1.0)


def align_entries(trainer):
    return [h for h in trainer.state.log_history if "align/forward" in h]


def test_callback_logs_scores_and_gradient_diagnostics_with_the_qwen_trainer(tiny_qwen3_path, tmp_path):
    config = QwenTrainerConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_qwen3_path, max_steps=4, learning_rate=1e-2,
        per_device_train_batch_size=4, train_group_size=2, query_max_len=16, passage_max_len=16,
        optim="sgd", weight_decay=0.0, **QUICK,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = QwenTrainer(config=config, train_dataset=train_records())
    callback = AlignmentCallback(probe_records(), every_n_steps=2, log_at_start=True).bind(trainer)
    trainer.add_callback(callback)
    trainer.train()
    entries = align_entries(trainer)
    assert [e["step"] for e in entries] == [0, 2, 4]
    assert entries[0]["align/parameter"] == pytest.approx(1.0)  # the anchor is the model at step 0
    for entry in entries[1:]:
        for key in ("align/forward", "align/backward", "align/parameter", "align/grad_probe_cos"):
            assert math.isfinite(entry[key]) and -1.0 <= entry[key] <= 1.0, (key, entry)
        # plain SGD: the update is exactly -lr * gradient
        assert entry["align/update_grad_cos"] == pytest.approx(1.0, abs=1e-5)


def test_callback_with_lora_and_adam_follows_less_than_the_gradient(tiny_qwen3_path, tmp_path):
    config = QwenTrainerConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_qwen3_path, max_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=4, train_group_size=2, query_max_len=16, passage_max_len=16, lora=True, **QUICK,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = QwenTrainer(config=config, train_dataset=train_records())
    trainer.add_callback(AlignmentCallback(probe_records(), every_n_steps=2).bind(trainer))
    trainer.train()
    [entry] = align_entries(trainer)
    assert entry["step"] == 2 and math.isfinite(entry["align/grad_probe_cos"])
    assert 0.0 < entry["align/update_grad_cos"] < 0.9999  # Adam's preconditioned update is not -g


def test_callback_with_the_bge_trainer_and_as_an_evaluator(tiny_xlmr_path, tmp_path):
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, train_group_size=2,
        query_max_len=12, passage_max_len=16, learning_rate=1e-3, init_missing_heads=True, **QUICK,
    )  # fmt: skip
    evaluator = AlignmentEvaluator(probe_records(), query_max_len=12, passage_max_len=16)
    trainer = BGETrainer(model=model, config=config, train_dataset=train_records(4), evaluator=evaluator)
    trainer.add_callback(AlignmentCallback(evaluator, every_n_steps=3, anchor="stored").bind(trainer))
    trainer.train()
    [entry] = align_entries(trainer)
    assert entry["step"] == 3 and {"align/grad_probe_cos", "align/update_grad_cos"} <= set(entry)
    metrics = trainer.evaluate()
    assert set(metrics) >= {"eval_align/forward", "eval_align/backward", "eval_align/parameter"}
    assert metrics["eval_align/forward"] == pytest.approx(entry["align/forward"], abs=1e-6)  # no step in between


def test_unbound_callback_says_how_to_bind_it(tiny_qwen3_path, tmp_path):
    config = QwenTrainerConfig(output_dir=str(tmp_path / "out"), model_name_or_path=tiny_qwen3_path, max_steps=1,
                               per_device_train_batch_size=2, train_group_size=2, **QUICK)  # fmt: skip
    trainer = QwenTrainer(
        config=config, train_dataset=train_records(2), callbacks=[AlignmentCallback(probe_records())]
    )
    with pytest.raises(RuntimeError, match="bind"):
        trainer.train()
