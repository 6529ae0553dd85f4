"""Bad models, configs and output directories are refused before training, with nothing written."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig, DataValidationError
from ark_hf.trainer.base import OutputDirError, check_output_dir


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1,
                per_device_train_batch_size=2, train_group_size=2, init_missing_heads=True)  # fmt: skip
    base.update(kw)
    return BGETrainerConfig(**base)


def assert_nothing_written(tmp_path, allowed=("train.jsonl",)):
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in allowed) == []


def test_missing_model_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model"):
        BGEM3Model(missing)


def test_decoder_given_to_bge_m3(tiny_qwen3_path):
    with pytest.raises(ValueError, match=r"is a decoder \(qwen3\); BGE-M3 needs a bidirectional encoder"):
        BGEM3Model(tiny_qwen3_path, unified_finetuning=False)


def test_missing_head_files_without_permission_to_initialise(tiny_xlmr_path):
    from ark_hf.models.bge_m3 import MissingHeadsError

    with pytest.raises(MissingHeadsError, match="colbert_linear.pt, sparse_linear.pt"):
        BGEM3Model(tiny_xlmr_path, unified_finetuning=True)


@pytest.mark.parametrize("field", ["query_max_len", "passage_max_len"])
def test_max_length_above_position_limit(tiny_xlmr_path, tmp_path, data, field):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    with pytest.raises(ValueError, match=f"{field}=600 exceeds the model's position limit of 512"):
        BGETrainer(model=model, config=config(tmp_path, **{field: 600}), train_dataset=data)
    assert_nothing_written(tmp_path)


def test_tokenizer_larger_than_embedding_matrix(tiny_xlmr_path, minilm_path, tmp_path, data):
    from transformers import AutoTokenizer

    model = BGEM3Model(minilm_path, init_missing_heads=True)  # 30,522 rows
    xlmr_tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr_path)  # 250,002 ids
    with pytest.raises(ValueError, match="tokenizer has 250002 tokens but the model's embedding matrix has 30522"):
        BGETrainer(model=model, config=config(tmp_path), train_dataset=data, processing_class=xlmr_tokenizer)
    assert_nothing_written(tmp_path)


def test_teacher_distillation_without_scores_or_teacher(tiny_xlmr_path, tmp_path, data):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    with pytest.raises(DataValidationError) as error:
        BGETrainer(model=model, config=config(tmp_path, knowledge_distillation=True), train_dataset=data)
    assert f"{data}:1: field 'pos_scores'" in str(error.value)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"teacher_temperature": -1.0}, "teacher_temperature must be > 0"),
        ({"unified_finetuning": False, "use_self_distill": True}, "use_self_distill needs unified_finetuning"),
        ({"unified_finetuning": False, "fix_encoder": True}, "fix_encoder trains only"),
        ({"teacher_model": "BAAI/bge-reranker-v2-m3"}, "knowledge_distillation=False"),
        ({"knowledge_distillation": True, "train_group_size": 1}, "train_group_size >= 2"),
        ({"train_group_size": 0}, "train_group_size must be >= 1"),
        ({"query_max_len": 1}, "query_max_len must be >= 2"),
        ({"same_dataset_within_batch": True, "no_duplicates_in_batch": True}, "choose one of"),
    ],
)
def test_impossible_config_combinations(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)
    assert_nothing_written(tmp_path)


def test_output_dir_is_a_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        check_output_dir(str(target), overwrite=True)
    with pytest.raises(OutputDirError, match="is a file, not a directory"):
        check_output_dir(str(target / "sub"), overwrite=True)
    assert target.read_bytes() == b"keep"


def test_no_space_left_fails_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputDirError, match="GiB free on its file system, but one checkpoint needs"):
        check_output_dir(str(tmp_path / "out"), overwrite=False, required_bytes=10**8)
    assert not (tmp_path / "out").exists()


def test_no_space_is_checked_by_train(tiny_xlmr_path, tmp_path, data, monkeypatch):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    trainer = BGETrainer(model=model, config=config(tmp_path), train_dataset=data)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputDirError, match="one checkpoint needs"):
        trainer.train()
    out = Path(trainer.args.output_dir)
    assert not out.exists() or not any(out.iterdir())
