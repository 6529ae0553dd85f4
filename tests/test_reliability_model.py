"""Garbage tokenizers (class 1), runs that train nothing (3), bad model files (6), two runs in one folder (7)
and the order of checks (8): each refused with the file or key named, nothing written, no step run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, TrainerCallback

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig, DecoderEmbedder
from ark_hf.losses.base import LossOutput
from ark_hf.trainer.base import NonFiniteLossError, OutputDirError
from ark_hf.utils.cli import ConfigError
from ark_hf.utils.locking import LOCK_FILE, OutputDirLockedError, acquire_output_dir_lock, release
from ark_hf.utils.preflight import ModelFileError, TokenizerError, preflight

ROOT = Path(__file__).resolve().parents[1]


def write_records(path: Path, n: int = 8) -> str:
    rows = [{"query": f"question {i} about permits", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_config(tmp_path: Path, **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True, max_steps=2,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=12,
        save_strategy="no", unified_finetuning=False, init_missing_heads=True,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def copy_without(src: str, dst: Path, *drop: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return str(dst)


def nothing_in(folder: Path) -> bool:
    """No file was written (transformers' Trainer itself may create the empty output_dir)."""
    return not folder.exists() or not any(folder.rglob("*"))


def no_weights_load(monkeypatch, module):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the check")

    # the one AutoModel class every loader uses (ark_hf.models.backbone loads BGE-M3's encoder through it)
    monkeypatch.setattr(getattr(module, "AutoModel", transformers.AutoModel), "from_pretrained", refuse)


# ------------------------------------------------------------------------------------ 1. tokenizers
def test_xlmr_folder_without_tokenizer_files_is_refused_before_weights(tiny_xlmr_path, tmp_path, monkeypatch):
    import ark_hf.models.bge_m3 as bge_m3

    folder = copy_without(tiny_xlmr_path, tmp_path / "model", "tokenizer*")
    no_weights_load(monkeypatch, bge_m3)
    with pytest.raises(TokenizerError) as error:
        BGEM3Model(folder, unified_finetuning=False)
    message = str(error.value)
    assert message.startswith(f"{folder}: the tokenizer has 5 tokens but the model's embedding matrix has 250002")
    assert f"{folder} has no tokenizer files" in message


def test_qwen_folder_without_tokenizer_files_is_refused_before_weights(tiny_qwen3_path, tmp_path, monkeypatch):
    import ark_hf.models.decoder as decoder

    folder = copy_without(tiny_qwen3_path, tmp_path / "model", "tokenizer*")
    no_weights_load(monkeypatch, decoder)
    with pytest.raises(TokenizerError, match=f"{folder}: the tokenizer has 1 tokens .* has no tokenizer files"):
        DecoderEmbedder(folder)


def test_unk_only_tokenizer_is_refused_by_the_trainer_and_no_step_runs(tiny_xlmr_path, tmp_path):
    folder = copy_without(tiny_xlmr_path, tmp_path / "notok", "tokenizer*")
    garbage = AutoTokenizer.from_pretrained(folder)  # built from nothing: every word is <unk>
    model = BGEM3Model(tiny_xlmr_path, unified_finetuning=False)
    counter = StepCounter()
    data = write_records(tmp_path / "train.jsonl")
    with pytest.raises(TokenizerError, match="the tokenizer has 5 tokens"):
        BGETrainer(model=model, config=make_config(tmp_path), train_dataset=data, processing_class=garbage,
                   callbacks=[counter])  # fmt: skip
    assert counter.steps == 0
    assert not (tmp_path / "out").exists()


def test_recipe_refuses_the_tokenizerless_folder_with_nothing_written(tiny_xlmr_path, tmp_path, monkeypatch):
    import ark_hf.models.bge_m3 as bge_m3

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import bge_m3 as recipe
    finally:
        sys.path.pop(0)
    folder = copy_without(tiny_xlmr_path, tmp_path / "model", "tokenizer*")
    data = write_records(tmp_path / "train.jsonl")
    no_weights_load(monkeypatch, bge_m3)
    argv = ["--model_name_or_path", folder, "--train_data", data, "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--report_to", "none", "--max_steps", "1", "--init_missing_heads"]  # fmt: skip
    with pytest.raises(TokenizerError, match=f"{folder}: the tokenizer has 5 tokens"):
        recipe.main(argv)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- 3. runs that train nothing
@pytest.fixture(scope="module")
def tiny_model(tiny_xlmr_path):
    return BGEM3Model(tiny_xlmr_path, unified_finetuning=False)


def test_zero_epochs_is_refused_before_any_step(tiny_model, tmp_path):
    counter = StepCounter()
    trainer = BGETrainer(model=tiny_model, config=make_config(tmp_path, max_steps=-1, num_train_epochs=0),
                         train_dataset=write_records(tmp_path / "train.jsonl"), callbacks=[counter])  # fmt: skip
    with pytest.raises(ConfigError, match="key 'num_train_epochs': 0 with max_steps unset trains zero steps"):
        trainer.train()
    assert counter.steps == 0 and nothing_in(tmp_path / "out")


@pytest.mark.parametrize(("records", "batch"), [(3, 4), (1, 2)])
def test_drop_last_with_fewer_records_than_a_batch_is_refused_with_counts(tiny_model, tmp_path, records, batch):
    counter = StepCounter()
    config = make_config(tmp_path, dataloader_drop_last=True, per_device_train_batch_size=batch)
    trainer = BGETrainer(model=tiny_model, config=config, callbacks=[counter],
                         train_dataset=write_records(tmp_path / "train.jsonl", n=records))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        trainer.train()
    assert f"key 'dataloader_drop_last': {records} training records are fewer than one batch" in str(error.value)
    assert f"per_device_train_batch_size={batch} x 1 process(es) = {batch}" in str(error.value)
    assert counter.steps == 0 and nothing_in(tmp_path / "out")


def test_every_batch_skipped_fails_after_training(tiny_xlmr_path, tmp_path):
    model = BGEM3Model(tiny_xlmr_path, unified_finetuning=False)
    trainer = BGETrainer(model=model, config=make_config(tmp_path, max_steps=3, nan_policy="skip", logging_steps=2),
                         train_dataset=write_records(tmp_path / "train.jsonl"))  # fmt: skip
    original = trainer.loss.forward
    trainer.loss.forward = lambda *a, **k: (lambda out: LossOutput(out.loss * float("nan"), out.components))(
        original(*a, **k)
    )
    with pytest.raises(NonFiniteLossError, match="every one of the 3 batches of this run .* was skipped"):
        trainer.train()


def test_some_batches_skipped_still_succeeds(tiny_xlmr_path, tmp_path):
    model = BGEM3Model(tiny_xlmr_path, unified_finetuning=False)
    trainer = BGETrainer(model=model, config=make_config(tmp_path, max_steps=3, nan_policy="skip"),
                         train_dataset=write_records(tmp_path / "train.jsonl"))  # fmt: skip
    original, calls = trainer.loss.forward, {"n": 0}

    def sometimes(*args, **kwargs):
        loss, components = original(*args, **kwargs)
        calls["n"] += 1
        return LossOutput(loss * float("nan") if calls["n"] == 2 else loss, components)

    trainer.loss.forward = sometimes
    trainer.train()
    assert trainer.state.global_step == 3


# ------------------------------------------------------------------------------------- 6. model files
@pytest.fixture(scope="module")
def saved_m3(tiny_xlmr_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("m3") / "model"
    BGEM3Model(tiny_xlmr_path, unified_finetuning=True, init_missing_heads=True).save_pretrained(folder)
    return str(folder)


def test_wrong_shaped_colbert_head_names_file_and_shape(saved_m3, tmp_path):
    folder = copy_without(saved_m3, tmp_path / "m")
    torch.save({"weight": torch.zeros(8, 16), "bias": torch.zeros(8)}, os.path.join(folder, "colbert_linear.pt"))
    with pytest.raises(ModelFileError) as error:
        BGEM3Model(folder)
    message = str(error.value)
    assert message.startswith(os.path.join(folder, "colbert_linear.pt"))
    assert "'weight' has shape [8, 16]" in message and "hidden size is 32" in message


def test_truncated_head_file_names_the_file(saved_m3, tmp_path):
    folder = copy_without(saved_m3, tmp_path / "m")
    head = os.path.join(folder, "sparse_linear.pt")
    Path(head).write_bytes(Path(head).read_bytes()[:40])
    with pytest.raises(ModelFileError, match=rf"{head}: cannot be read .* may be truncated"):
        BGEM3Model(folder)


def test_truncated_safetensors_is_named_before_loading(saved_m3, tmp_path):
    folder = copy_without(saved_m3, tmp_path / "m")
    weights = Path(folder) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match=rf"{weights}: truncated or corrupt: its \d+ tensors need \d+ data bytes"):
        BGEM3Model(folder)


@pytest.mark.parametrize("content", ['{"has_heads": true, "pool', "[1, 2]"])
def test_broken_m3_heads_json_is_named(saved_m3, tmp_path, content):
    folder = copy_without(saved_m3, tmp_path / "m")
    info = os.path.join(folder, "m3_heads.json")
    Path(info).write_text(content)
    with pytest.raises(ModelFileError, match=rf"{info}: .*expected an object such as"):
        BGEM3Model(folder)


def test_resuming_from_another_models_checkpoint_is_refused(tiny_xlmr_path, minilm_path, tmp_path):
    model = BGEM3Model(tiny_xlmr_path, unified_finetuning=False)
    checkpoint = copy_without(minilm_path, tmp_path / "checkpoint-3")
    with pytest.raises(ModelFileError, match=r"belongs to another model \(model_type: checkpoint 'bert'"):
        model.load_weights_from(checkpoint)


@pytest.mark.parametrize("where", ["model", "model/out", "data", "data/sub/out"])
def test_output_dir_in_the_model_or_data_folder_is_refused(saved_m3, tmp_path, where):
    model = copy_without(saved_m3, tmp_path / "model")
    (tmp_path / "data").mkdir()
    write_records(tmp_path / "data" / "train.jsonl")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    config = make_config(tmp_path, output_dir=str(tmp_path / where), model_name_or_path=model,
                         train_data=[str(tmp_path / "data")], overwrite_output_dir=True)  # fmt: skip
    with pytest.raises(OutputDirError, match="is the|is inside the"):
        preflight(config, BGETrainer)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


# ------------------------------------------------------------------------------ 7. two runs, one folder
def test_second_run_on_a_locked_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; from ark_hf.utils.locking import acquire_output_dir_lock; "
        f"acquire_output_dir_lock({str(out)!r}); print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirLockedError) as error:
            acquire_output_dir_lock(out)
        assert f"pid {owner.pid} on host {socket.gethostname()}" in str(error.value)
        assert str(out / LOCK_FILE) in str(error.value)
        config = make_config(tmp_path, output_dir=str(out), overwrite_output_dir=True, model_name_or_path="x",
                             train_data=[write_records(tmp_path / "train.jsonl")])  # fmt: skip
        with pytest.raises(OutputDirLockedError):
            preflight(config, BGETrainer)
    finally:
        owner.kill()
        owner.wait()
    # the owner is gone: its lock is stale and is taken over
    lock = acquire_output_dir_lock(out)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release(out)
    assert not (out / LOCK_FILE).exists()


def test_lock_is_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    acquire_output_dir_lock(out)
    acquire_output_dir_lock(out)  # the same process may take it again
    assert (out / LOCK_FILE).exists()
    release(out)
    assert not (out / LOCK_FILE).exists() and out.is_dir()


def test_lock_of_another_host_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "created": 0}))
    with pytest.raises(OutputDirLockedError, match="pid 1 on host elsewhere"):
        acquire_output_dir_lock(out)


def test_training_holds_the_lock_until_exit(tiny_model, tmp_path):
    trainer = BGETrainer(model=tiny_model, config=make_config(tmp_path, max_steps=1),
                         train_dataset=write_records(tmp_path / "train.jsonl"))  # fmt: skip
    trainer.train()
    owner = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid()
    release(tmp_path / "out")


# ------------------------------------------------------------------------------------ 8. order of checks
def test_bge_recipe_validates_data_before_loading_the_model(tiny_xlmr_path, tmp_path, monkeypatch):
    import ark_hf.models.bge_m3 as bge_m3

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import bge_m3 as recipe
    finally:
        sys.path.pop(0)
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"query": "q", "pos": "not a list"}\n')
    no_weights_load(monkeypatch, bge_m3)
    argv = ["--model_name_or_path", tiny_xlmr_path, "--train_data", str(bad), "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "--report_to", "none", "--max_steps", "1"]  # fmt: skip
    with pytest.raises(ValueError, match=rf"{bad}:1: field 'pos'"):
        recipe.main(argv)
    with pytest.raises(ConfigError, match="key 'per_device_train_batch_size'"):
        recipe.main([*argv, "--per_device_train_batch_size", "0"])
    assert not (tmp_path / "out").exists()
