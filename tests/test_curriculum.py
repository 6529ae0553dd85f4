"""Curriculum: stages switch data inside one train(), the LR schedule spans the plan, resume keeps the stage and
the data order, stage 3 writes the slerp merge, and a bad plan fails before anything is written.

Plan used throughout (batch 4, 8 records per stage file): stage 1 `weak` = 1 epoch = steps 1-2; stage 2
`supervised` = 4 steps = steps 3-6 (two passes over its data), learning-rate scale 0.5 and temperature 0.05;
stage 3 = slerp of stage 2's last two checkpoints (steps 4 and 6; `save_steps=4`, plus one at every stage end).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

from ark_hf import CurriculumCallback, create_qwen_trainer
from ark_hf.curriculum import (
    CurriculumBatchSampler,
    CurriculumIndex,
    StagePlanError,
    load_stage_plan,
)
from ark_hf.data.samplers import RetrievalBatchSampler
from ark_hf.data.schema import DataValidationError
from ark_hf.models.decoder import DecoderEmbedder

pytestmark = pytest.mark.slow  # end-to-end runs (real training, saved folders loaded by other tools)

LEARNING_RATE = 2e-2
TOTAL_STEPS = 6
PLAN = """\
stages:
  - name: weak
    datasets: [{stage1}]
    epochs: 1
  - name: supervised
    datasets: [{stage2}]
    steps: 4
    learning_rate_scale: 0.5
    loss: {{temperature: 0.05}}
  - name: merge
    merge:
      method: slerp
      checkpoints: {{last_n: 2}}
"""


def write_records(path, tag, n=8):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            record = {"query": f"{tag} question {i} about roofs", "pos": [f"{tag} answer {i}: tiles last {i} decades"]}
            handle.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum_data")
    stage1 = write_records(root / "stage1_pairs.jsonl", "weak")
    stage2 = write_records(root / "stage2_supervised.jsonl", "supervised")
    plan = root / "plan.yaml"
    plan.write_text(PLAN.format(stage1=stage1, stage2=stage2), encoding="utf-8")
    return {"plan": str(plan), "stage1": stage1, "stage2": stage2, "root": root}


class Recorder(TrainerCallback):
    """Per optimizer step: the learning rate the optimizer uses (read just before it steps), and after the step
    the optimizer's rate next to the scheduler's (the stage's scale must not outlive the step)."""

    def __init__(self):
        self.lrs = {}
        self.after_step = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.after_step[state.global_step] = (optimizer.param_groups[0]["lr"], lr_scheduler.get_last_lr()[0])


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def build(tiny_qwen3_path, plan, output_dir, callbacks=(), **overrides):
    """A curriculum trainer whose compute_loss records the records and temperature of every step."""
    fields = dict(
        output_dir=str(output_dir), learning_rate=LEARNING_RATE, per_device_train_batch_size=4,
        model_name_or_path=tiny_qwen3_path, curriculum=plan, train_group_size=1, lr_scheduler_type="linear",
        use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="steps", save_steps=4,
        seed=3,
    )  # fmt: skip
    fields.update(overrides)
    recorder = Recorder()
    torch.manual_seed(0)
    trainer = create_qwen_trainer(callbacks=[recorder, *callbacks], **fields)
    trainer.seen = {}
    compute = trainer.loss.compute

    def spy(query, passages, batch, step):
        step = trainer.state.global_step + 1
        trainer.seen[step] = {"ids": list(batch.record_ids), "temperature": trainer.loss.options["temperature"]}
        return compute(query, passages, batch, step)

    trainer.loss.compute = spy
    trainer.recorder = recorder
    return trainer


def step_logs(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def full_run(tiny_qwen3_path, plan_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum_full") / "run"
    trainer = build(tiny_qwen3_path, plan_files["plan"], out)
    trainer.train()
    return trainer, out


# ------------------------------------------------------------------------------------------------ (a) data per stage
def test_each_stage_trains_only_on_its_own_records(full_run, plan_files):
    trainer, _ = full_run
    assert trainer.args.max_steps == TOTAL_STEPS and trainer.state.global_step == TOTAL_STEPS
    stage_of = {step: ("weak" if step <= 2 else "supervised") for step in range(1, TOTAL_STEPS + 1)}
    files = {"weak": plan_files["stage1"], "supervised": plan_files["stage2"]}
    for step, seen in trainer.seen.items():
        sources = {record_id.rsplit(":", 1)[0] for record_id in seen["ids"]}
        assert sources == {files[stage_of[step]]}, (step, seen["ids"])
    # stage 1 = one epoch: every record once; stage 2 = 4 steps = two passes, reshuffled between them
    weak = Counter(i for step in (1, 2) for i in trainer.seen[step]["ids"])
    assert sorted(weak.values()) == [1] * 8
    supervised = Counter(i for step in (3, 4, 5, 6) for i in trainer.seen[step]["ids"])
    assert sorted(supervised.values()) == [2] * 8
    first_pass = trainer.seen[3]["ids"] + trainer.seen[4]["ids"]
    second_pass = trainer.seen[5]["ids"] + trainer.seen[6]["ids"]
    assert sorted(first_pass) == sorted(second_pass) and first_pass != second_pass
    # loss options and the logged stage follow the plan
    assert [trainer.seen[s]["temperature"] for s in range(1, 7)] == [0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    assert [step_logs(trainer)[s]["curriculum/stage"] for s in range(1, 7)] == [1, 1, 2, 2, 2, 2]


# ------------------------------------------------------------------------------------------------ (d) LR schedule
def test_learning_rate_schedule_spans_the_whole_plan(full_run):
    trainer, _ = full_run
    scale = {step: 1.0 if step <= 2 else 0.5 for step in range(1, TOTAL_STEPS + 1)}
    for step, lr in trainer.recorder.lrs.items():
        scheduled = LEARNING_RATE * (1 - (step - 1) / TOTAL_STEPS)  # one linear decay over all six steps
        assert lr == pytest.approx(scheduled * scale[step], rel=1e-9), (step, lr)
        assert step_logs(trainer)[step]["learning_rate"] == pytest.approx(lr, rel=1e-9)  # the rate actually used
    assert trainer.recorder.lrs[2] > 0.5 * LEARNING_RATE  # no decay to zero at the end of stage 1
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # zero only after the last step
    # the stage's scale was undone after each optimizer step: the optimizer holds the scheduler's rate
    for step, (optimizer_lr, scheduler_lr) in trainer.recorder.after_step.items():
        assert optimizer_lr == pytest.approx(scheduler_lr, rel=1e-12, abs=1e-15), step


# ------------------------------------------------------------------------------------------------ (c) slerp merge
def reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> tuple[np.ndarray, bool]:
    """Textbook slerp in float64; linear interpolation when the tensors are nearly parallel (|cos| > 0.9995),
    the documented fallback of ark_hf.merging (and mergekit). Returns (result, used_slerp)."""
    va, vb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))
    if abs(cos) > 0.9995:
        return ((1 - t) * va + t * vb).reshape(a.shape), False
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    out = np.sin((1 - t) * theta) / np.sin(theta) * va + np.sin(t * theta) / np.sin(theta) * vb
    return out.reshape(a.shape), True


def test_stage3_writes_the_slerp_of_stage2_checkpoints(full_run):
    from sentence_transformers import SentenceTransformer

    trainer, out = full_run
    assert sorted(e for e in os.listdir(out) if e.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6",
    ]  # fmt: skip
    merged_dir = out / "stage3_merged"
    assert trainer.curriculum.merged_path == str(merged_dir)
    info = json.loads((merged_dir / "merge_info.json").read_text())
    assert info["method"] == "slerp" and [os.path.basename(p) for p in info["checkpoints"]] == [
        "checkpoint-4", "checkpoint-6",
    ]  # fmt: skip
    first, second = (
        load_file(out / "checkpoint-4" / "model.safetensors"),
        load_file(out / "checkpoint-6" / "model.safetensors"),
    )
    merged = load_file(merged_dir / "model.safetensors")
    assert merged.keys() == first.keys()
    slerped = 0
    for key, value in merged.items():
        expected, used_slerp = reference_slerp(first[key].numpy(), second[key].numpy(), 0.5)
        np.testing.assert_allclose(value.double().numpy(), expected, atol=2e-6, err_msg=key)
        if used_slerp:
            slerped += 1
            linear = 0.5 * first[key].double().numpy() + 0.5 * second[key].double().numpy()
            assert np.abs(expected - linear).max() > 1e-5, key  # a linear merge would fail this test
    assert slerped >= 4  # the trained projections are far enough apart for a real slerp
    # the merged folder is a model: DecoderEmbedder and sentence-transformers load it and agree
    embedder = DecoderEmbedder.from_pretrained(merged_dir)
    texts = ["do tiles last long", "roof tiles last decades"]
    st_model = SentenceTransformer(str(merged_dir), device="cpu")
    np.testing.assert_allclose(st_model.encode(texts), embedder.encode(texts, max_length=512), atol=1e-5)


# ------------------------------------------------------------------------------------------------ (b) resume
@pytest.mark.slow
def test_resume_in_stage_2_continues_the_same_stage_data_and_losses(full_run, tiny_qwen3_path, plan_files, tmp_path):
    full, _ = full_run
    expected = step_logs(full)
    out = tmp_path / "run"
    interrupted = build(tiny_qwen3_path, plan_files["plan"], out, callbacks=[StopAt(4)])
    interrupted.train()
    assert interrupted.state.global_step == 4 and not (out / "stage3_merged").exists()
    checkpoint = out / "checkpoint-4"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["CurriculumCallback"]
    assert stored["attributes"]["stage_name"] == "supervised" and stored["attributes"]["steps_in_stage"] == 2

    resumed = build(tiny_qwen3_path, plan_files["plan"], out)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = step_logs(resumed)
    assert sorted(resumed.seen) == [5, 6] and sorted(got) == list(range(1, 7))  # steps 1-4 come from the checkpoint
    for step in (5, 6):
        assert got[step]["curriculum/stage"] == 2
        assert resumed.seen[step] == full.seen[step]  # same records in the same order, same loss options
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5, abs=1e-6), (step, got, expected)
        assert resumed.recorder.lrs[step] == pytest.approx(full.recorder.lrs[step], rel=1e-9)
    assert (out / "stage3_merged" / "model.safetensors").is_file()

    # a resume under another plan would change the data order: refused
    changed = plan_files["root"] / "changed.yaml"
    changed.write_text(read_text(plan_files["plan"]).replace("steps: 4", "steps: 5"), encoding="utf-8")
    # (with restore_callback_states_from_checkpoint the Trainer rebuilds the callback from the checkpoint; the
    # trainer keeps its own bound instance, which is the one that refuses)
    other = build(tiny_qwen3_path, str(changed), out, restore_callback_states_from_checkpoint=True)
    with pytest.raises(ValueError, match="another stage plan"):
        other.train(resume_from_checkpoint=str(checkpoint))


DDP_SCRIPT = """
import json, sys
import torch
from ark_hf import create_qwen_trainer

fields, out_file = json.loads(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
torch.manual_seed(0)
trainer = create_qwen_trainer(**fields)
seen = {}
compute = trainer.loss.compute

def spy(query, passages, batch, step):
    seen[trainer.state.global_step + 1] = list(batch.record_ids)
    return compute(query, passages, batch, step)

trainer.loss.compute = spy
trainer.train()
losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
result = {"seen": seen, "losses": losses, "max_steps": trainer.args.max_steps, "merged": trainer.curriculum.merged_path}
with open(f"{out_file}.{trainer.args.process_index}", "w") as handle:
    json.dump(result, handle)
"""


@pytest.mark.slow
def test_two_processes_run_the_same_plan_as_one(full_run, tiny_qwen3_path, plan_files, tmp_path):
    """torchrun, 2 CPU processes (gloo), half the per-device batch, cross-device negatives: every step sees the
    same records as the single-process run (rank 0's then rank 1's half) and logs the same loss."""
    import socket
    import subprocess
    import sys

    full, _ = full_run
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    fields = dict(
        output_dir=str(tmp_path / "run"), learning_rate=LEARNING_RATE, per_device_train_batch_size=2,
        model_name_or_path=tiny_qwen3_path, curriculum=plan_files["plan"], train_group_size=1,
        lr_scheduler_type="linear", use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1,
        save_strategy="steps", save_steps=4, seed=3, negatives_cross_device=True,
    )  # fmt: skip
    with socket.socket() as probe:  # a free port: other test runs may share the machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run(
        [*torchrun, str(script), json.dumps(fields), str(tmp_path / "result")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-9000:]
    ranks = [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in (0, 1)]
    assert all(r["max_steps"] == TOTAL_STEPS for r in ranks)
    for step in range(1, TOTAL_STEPS + 1):
        assert ranks[0]["seen"][str(step)] + ranks[1]["seen"][str(step)] == full.seen[step]["ids"], step
        loss = step_logs(full)[step]["loss"]
        assert ranks[0]["losses"][str(step)] == pytest.approx(loss, rel=1e-4), step
    assert (tmp_path / "run" / "stage3_merged" / "model.safetensors").is_file()


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


# ------------------------------------------------------------------------------------------------ (e) bad plans
def plan_with(plan_files, tmp_path, text):
    path = tmp_path / "bad_plan.yaml"
    path.write_text(text.format(stage1=plan_files["stage1"], stage2=plan_files["stage2"]), encoding="utf-8")
    return str(path)


def test_unknown_key_fails_before_training_with_file_line_and_key(plan_files, tmp_path):
    plan = plan_with(plan_files, tmp_path, PLAN.replace("learning_rate_scale: 0.5", "lr_scale: 0.5"))
    out = tmp_path / "out"
    with pytest.raises(StagePlanError) as error:
        create_qwen_trainer(output_dir=str(out), curriculum=plan, model_name_or_path="/nonexistent", use_cpu=True)
    assert f"{plan}:8: stages[1].lr_scale: key 'lr_scale'" in str(error.value)
    assert "learning_rate_scale" in str(error.value)  # the message lists what is allowed
    assert not out.exists()


def test_missing_dataset_and_other_problems_are_all_reported(plan_files, tmp_path):
    text = PLAN.replace("datasets: [{stage2}]", "datasets: [{stage2}, data/missing.jsonl]").replace(
        "temperature: 0.05", "temperature: cold"
    )
    plan = plan_with(plan_files, tmp_path, text)
    out = tmp_path / "out"
    with pytest.raises(StagePlanError) as error:
        create_qwen_trainer(output_dir=str(out), curriculum=plan, model_name_or_path="/nonexistent", use_cpu=True)
    message = str(error.value)
    assert f"{plan}:6: stages[1].datasets[1]" in message and "data/missing.jsonl" in message
    assert f"{plan}:9: stages[1].loss.temperature: key 'temperature': expected float" in message
    assert not out.exists()


def test_bad_records_of_a_later_stage_fail_before_the_model_loads(plan_files, tmp_path):
    broken = tmp_path / "stage2_broken.jsonl"
    broken.write_text('{"query": "q", "pos": ["p"]}\n{"query": "q2", "pos": "not a list"}\n', encoding="utf-8")
    plan = plan_with(plan_files, tmp_path, PLAN.replace("{stage2}", str(broken)))
    out = tmp_path / "out"
    # the model path does not exist: the data check must come first
    with pytest.raises(DataValidationError, match=rf"{broken}:2: field 'pos'"):
        create_qwen_trainer(output_dir=str(out), curriculum=plan, model_name_or_path="/nonexistent", use_cpu=True)
    assert not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: []\n", "non-empty list"),
        ("stages:\n  - name: a\n    datasets: [{stage1}]\n    epochs: 1\n    steps: 2\n", "exactly one of 'steps'"),
        ("stages:\n  - name: m\n    merge: {{checkpoints: {{last_n: 1}}}}\n", "no data stage"),
        (
            "stages:\n  - name: m\n    merge: {{checkpoints: {{last_n: 1}}}}\n  - name: a\n    datasets: [{stage1}]\n"
            "    epochs: 1\n",
            "must be the last stage",
        ),
        (
            "stages:\n  - name: a\n    datasets: [{stage1}]\n    epochs: 1\n  - name: m\n    merge: {{checkpoints: {{}}}}\n",
            "exactly one of last_n",
        ),
        (
            "stages:\n  - name: a\n    datasets: [{stage1}]\n    epochs: 1\n  - name: m\n    merge:\n"
            "      checkpoints: {{last_n: 2}}\n      from_stage: b\n",
            "no data stage named 'b'",
        ),
        ("plan:\n  - name: a\n", "key 'plan': unknown key"),
    ],
)
def test_plan_problems(plan_files, tmp_path, text, message):
    with pytest.raises(StagePlanError, match=message):
        load_stage_plan(plan_with(plan_files, tmp_path, text))


# ------------------------------------------------------------------------------------------------ units
def test_merge_checkpoints_must_be_saved_and_kept(plan_files):
    callback = CurriculumCallback.from_yaml(plan_files["plan"])
    callback.plan.stage_steps = [2, 4, 0]
    args = SimpleNamespace(save_strategy=SaveStrategy.STEPS, save_steps=4, save_total_limit=None)
    assert callback.plan.choose_merge_checkpoints(args) == [4, 6]
    args.save_steps = 100  # only the stage ends are saved: stage 2 has one checkpoint
    with pytest.raises(ValueError, match="last_n=2"):
        callback.plan.choose_merge_checkpoints(args)
    args.save_steps, args.save_total_limit = 1, 2
    assert callback.plan.choose_merge_checkpoints(args) == [5, 6]
    args.save_steps, args.save_total_limit = 4, 1  # rotation would delete checkpoint-4 before the merge
    with pytest.raises(ValueError, match="save_total_limit=1"):
        callback.plan.choose_merge_checkpoints(args)


def test_stream_is_deterministic_and_every_step_stays_in_one_stage_across_processes():
    """Two processes, gradient accumulation 2: accelerate's shard of the stream keeps each step inside one stage."""
    from accelerate.data_loader import BatchSamplerShard

    def sampler():
        samplers = [RetrievalBatchSampler(10, 2, seed=1), RetrievalBatchSampler(6, 2, seed=2)]
        return CurriculumBatchSampler(samplers, [3 * 2 * 2, 2 * 2 * 2], batch_size=2)  # 3 and 2 steps

    stream = list(sampler())
    assert stream == list(sampler()) and len(stream) == len(sampler()) == 20
    assert all(isinstance(key, CurriculumIndex) for batch in stream for key in batch)
    assert [batch[0].stage for batch in stream] == [0] * 12 + [1] * 8
    assert [batch[0].epoch for batch in stream[:12]] == [0] * 5 + [1] * 5 + [2] * 2  # 5 batches per pass
    for rank in (0, 1):
        shard = list(BatchSamplerShard(sampler(), num_processes=2, process_index=rank))
        assert len(shard) == 10
        steps = [shard[i : i + 2] for i in range(0, 10, 2)]
        assert [{key.stage for batch in step for key in batch} for step in steps] == [{0}] * 3 + [{1}] * 2


@pytest.mark.parametrize("deepspeed_order", [False, True])
def test_learning_rate_scale_is_exact_and_never_compounds(plan_files, deepspeed_order):
    """Trainer order: StepLR (chainable: it keeps whatever rate the group holds, so an unrestored scale would
    compound). DeepSpeed order: the engine steps the scheduler (the Trainer's LambdaLR) before
    `on_optimizer_step`; the scheduler's new rate must be kept."""
    callback = CurriculumCallback.from_yaml(plan_files["plan"])
    callback.plan.stage_steps = [2, 4, 0]
    callback.loss = SimpleNamespace(update_options=lambda **overrides: None)
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    if deepspeed_order:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / TOTAL_STEPS)
        scheduled = [1 - step / TOTAL_STEPS for step in range(TOTAL_STEPS)]
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000)
        scheduled = [1.0] * TOTAL_STEPS
    used = []
    for step in range(TOTAL_STEPS):
        state = SimpleNamespace(global_step=step)
        callback.on_step_begin(None, state, None, optimizer=optimizer)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if deepspeed_order:
            scheduler.step()
            callback.on_optimizer_step(None, state, None)
        else:
            callback.on_optimizer_step(None, state, None)
            scheduler.step()
    scale = [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert used == pytest.approx([lr * s for lr, s in zip(scheduled, scale)], rel=1e-12)
