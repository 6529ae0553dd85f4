"""Nothing written is lost: atomic checkpoints survive SIGKILL, resume is exact, NaN stops with context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig
from ark_hf.losses.base import LossOutput
from ark_hf.trainer.base import NonFiniteLossError, OutputDirError


def write_records(path, n=16):
    with open(path, "w") as handle:
        for i in range(n):
            rec = {"query": f"question number {i} about permits", "pos": [f"answer {i}: permits take {i} weeks"],
                   "neg": [f"unrelated text {i} {k}" for k in range(3)]}  # fmt: skip
            handle.write(json.dumps(rec) + "\n")
    return str(path)


def make_config(output_dir, **overrides):
    base = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, seed=3,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16,
        max_steps=6, logging_steps=1, save_strategy="steps", save_steps=3, learning_rate=1e-3,
        unified_finetuning=True, use_self_distill=True, init_missing_heads=True,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def step_losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def build(tiny_xlmr_path, config, data, callbacks=None):
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, unified_finetuning=True, init_missing_heads=True)
    return BGETrainer(model=model, config=config, train_dataset=data, callbacks=callbacks)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(tiny_xlmr_path, tmp_path):
    data = write_records(tmp_path / "train.jsonl")
    full = build(tiny_xlmr_path, make_config(tmp_path / "full"), data)
    full.train()
    expected = step_losses(full)
    assert len(expected) == 6

    interrupted = build(tiny_xlmr_path, make_config(tmp_path / "cut"), data, callbacks=[StopAt(3)])
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = get_last_checkpoint(str(tmp_path / "cut"))
    assert checkpoint.endswith("checkpoint-3")

    resumed = build(tiny_xlmr_path, make_config(tmp_path / "cut"), data)
    resumed.train(resume_from_checkpoint=checkpoint)
    got = step_losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_nan_stops_with_step_component_and_records(tiny_xlmr_path, tmp_path):
    data = write_records(tmp_path / "train.jsonl")
    trainer = build(tiny_xlmr_path, make_config(tmp_path / "out", save_strategy="no"), data)
    original = trainer.loss.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, components = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            components = dict(components, loss_lex=torch.tensor(float("nan")))
        return LossOutput(loss, components)

    trainer.loss.forward = poisoned
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "step 2" in message and "loss_lex" in message
    assert "train.jsonl:" in message  # the records of the batch, by file and line


def test_non_empty_output_dir_is_refused_and_left_untouched(tiny_xlmr_path, tmp_path):
    data = write_records(tmp_path / "train.jsonl")
    out = tmp_path / "previous_run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"precious")
    trainer = build(tiny_xlmr_path, make_config(out), data)
    with pytest.raises(OutputDirError, match="overwrite_output_dir"):
        trainer.train()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"precious"


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig
    from ark_hf.trainer.base import BaseRetrieverTrainer

    model_path, data, out = sys.argv[1:4]
    original = BaseRetrieverTrainer._save_optimizer_and_scheduler

    def killing(self, output_dir):
        if self.state.global_step == 4:  # the model files of checkpoint 4 are written, the optimizer is not
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    BaseRetrieverTrainer._save_optimizer_and_scheduler = killing
    config = BGETrainerConfig(output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True, max_steps=6,
                              per_device_train_batch_size=2, train_group_size=2, query_max_len=12,
                              passage_max_len=16, save_strategy="steps", save_steps=2, save_total_limit=1,
                              init_missing_heads=True)
    torch.manual_seed(0)
    model = BGEM3Model(model_path, unified_finetuning=True, init_missing_heads=True)
    BGETrainer(model=model, config=config, train_dataset=data).train()
    """
)


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_keeps_the_previous_checkpoint(tiny_xlmr_path, tmp_path):
    data = write_records(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), tiny_xlmr_path, data, str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == -9, result.stderr[-2000:]
    entries = sorted(os.listdir(out))
    assert "checkpoint-2" in entries and ".tmp-checkpoint-4" in entries and "checkpoint-4" not in entries
    last = get_last_checkpoint(str(out))
    assert last.endswith("checkpoint-2")
    for name in ("model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "optimizer.pt", "trainer_state.json"):
        assert os.path.isfile(os.path.join(last, name)), name

    reloaded = BGEM3Model.from_pretrained(last)
    assert reloaded.has_heads
    resumed = build(tiny_xlmr_path, make_config(out, save_steps=2, save_total_limit=1), data)
    resumed.train(resume_from_checkpoint=last)
    assert resumed.state.global_step == 6
    final_entries = sorted(os.listdir(out))
    assert ".tmp-checkpoint-4" not in final_entries  # stale partial save removed
    assert [e for e in final_entries if e.startswith("checkpoint-")] == ["checkpoint-6"]


@pytest.mark.slow
def test_qwen_resume_reproduces_the_uninterrupted_losses(tiny_qwen3_path, tmp_path):
    from ark_hf import create_qwen_trainer

    data = write_records(tmp_path / "train.jsonl")

    def trainer(out, callbacks=None):
        torch.manual_seed(0)
        return create_qwen_trainer(
            dataset_paths=[data], output_dir=str(out), learning_rate=1e-3, num_train_epochs=1,
            per_device_train_batch_size=2, gradient_accumulation_steps=1, model_name_or_path=tiny_qwen3_path,
            use_cpu=True, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1, train_group_size=2,
            query_max_len=12, passage_max_len=16, report_to="none", disable_tqdm=True, seed=5,
            activation_checkpointing=False, callbacks=callbacks,
        )  # fmt: skip

    full = trainer(tmp_path / "full")
    full.train()
    expected = step_losses(full)
    cut = trainer(tmp_path / "cut", callbacks=[StopAt(3)])
    cut.train()
    checkpoint = get_last_checkpoint(str(tmp_path / "cut"))
    resumed = trainer(tmp_path / "cut")
    resumed.train(resume_from_checkpoint=checkpoint)
    got = step_losses(resumed)
    assert len(expected) == 6
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


def test_nan_policy_skip_drops_the_batch_and_trains_on(tiny_xlmr_path, tmp_path, caplog):
    data = write_records(tmp_path / "train.jsonl")
    trainer = build(tiny_xlmr_path, make_config(tmp_path / "out", save_strategy="no", nan_policy="skip"), data)
    original = trainer.loss.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, components = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            loss = loss * float("nan")
        return LossOutput(loss, components)

    trainer.loss.forward = poisoned
    trainer.train()
    assert trainer.state.global_step == 6
    assert any("non-finite loss at step 2" in r.message and "batch skipped" in r.message for r in caplog.records)
    skipped = [h["skipped_batches"] for h in trainer.state.log_history if "skipped_batches" in h]
    assert skipped == [1.0]
    finite = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(v == v for v in finite)  # no NaN reached the logs or the weights
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.slow
def test_final_save_is_complete_and_leaves_no_temporary_folder(tiny_xlmr_path, tmp_path):
    data = write_records(tmp_path / "train.jsonl")
    out = tmp_path / "out"
    trainer = build(tiny_xlmr_path, make_config(out, save_strategy="no", max_steps=1), data)
    trainer.train()
    (out / "colbert_linear.pt").write_bytes(b"stale")  # an older file of the same name is replaced whole
    trainer.save_model()
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))
    reloaded = BGEM3Model.from_pretrained(str(out))
    model = trainer.accelerator.unwrap_model(trainer.model)
    for a, b in zip(reloaded.colbert_linear.parameters(), model.colbert_linear.parameters()):
        assert torch.equal(a, b.detach())


def test_only_the_writer_rank_writes_model_files(tiny_xlmr_path, tmp_path, monkeypatch):
    """Under ZeRO-3 and FSDP the Trainer calls `_save` on every rank with the gathered state dict, which only
    rank 0 holds (`{}` elsewhere); another rank writing would put empty or sharded weights over rank 0's files
    (and, under ZeRO-3, an error there sent that rank into an extra collective save: a hang)."""
    data = write_records(tmp_path / "train.jsonl")
    trainer = build(tiny_xlmr_path, make_config(tmp_path / "out", save_strategy="no", max_steps=1), data)
    monkeypatch.setattr(type(trainer.args), "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "rank1"), state_dict={})
    assert not (tmp_path / "rank1").exists()
    monkeypatch.undo()
    trainer._save(str(tmp_path / "rank0"))
    assert (tmp_path / "rank0" / "colbert_linear.pt").is_file()
