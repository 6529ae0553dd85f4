"""`report_to=wandb` with `WANDB_MODE=offline`: the run's `.wandb` file, read back, holds what the trainer logged.

Loss components, evaluation metrics per scoring mode, the learning rate, the sparse-health components (BGE-M3),
the masked-negative counts (Qwen3) and `AlignmentCallback`'s `align/*` metrics, each equal to the trainer's own
log. wandb 0.31 writes the offline run only to its transaction log (`run-<id>.wandb`, LevelDB log framing of
`wandb_internal_pb2.Record` protobufs) and has no Python reader for it, so `_history` below reads that framing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

wandb = pytest.importorskip("wandb")

RECORDS = [
    {
        "query": f"how long does permit {i} take",
        "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
        "neg": [f"Parking rules changed in district {i}.", f"Permit {i} takes {i + 2} weeks at the city office."],
    }
    for i in range(6)
]  # fmt: skip  (the second negative equals the positive: the Qwen3 mask removes it)
BLOCK = 32768  # LevelDB log block; a record header is crc32 (4), length (2), type (1: full, 2 first, 3 mid, 4 last)


def _history(run_dir: Path) -> list[dict]:
    """Every `history` record of the offline run, as {key: value}."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def _run(trainer_class, model_path: str, tmp_path: Path, monkeypatch, *extra: str):
    from ark_hf.trainer.runner import run_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    captured = {}
    argv = [
        "--model_name_or_path", model_path, "--train_data", str(data), "--eval_data", str(data),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--train_group_size", "3", "--query_max_len", "12", "--passage_max_len", "16", "--use_cpu",
        "--report_to", "wandb", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--eval_strategy", "steps", "--eval_steps", "2", *extra,
    ]  # fmt: skip

    def keep(trainer, _metrics):
        captured.update(trainer=trainer, run_dir=Path(wandb.run.dir).parent)

    try:
        metrics = run_recipe(trainer_class, argv, after_training=keep)
    finally:
        wandb.finish()
        wandb.teardown()  # the service flushes and exits; the next run reads its own environment
    return captured["trainer"], metrics, _history(captured["run_dir"])


def _check_train_rows(trainer, history: list[dict], components: set[str]) -> None:
    logged = [e for e in trainer.state.log_history if "loss" in e]
    rows = [r for r in history if "train/loss" in r]
    assert len(rows) == len(logged) == 2
    for entry, row in zip(logged, rows):
        assert row["train/global_step"] == entry["step"]
        assert row["train/learning_rate"] == pytest.approx(entry["learning_rate"])
        for key in {"loss", *components}:
            assert row[f"train/{key}"] == pytest.approx(entry[key], rel=1e-6), key


def _check_eval_rows(metrics: dict, history: list[dict], modes: tuple[str, ...]) -> None:
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    assert len(evals) >= 2  # before training and after it (plus the one at eval_steps)
    for phase, row in (("before", evals[0]), ("after", evals[-1])):
        for mode in modes:
            for metric in ("ndcg@10", "mrr@10", "recall@10", "map"):
                key = f"{mode}_{metric}"
                assert row[f"eval/{key}"] == pytest.approx(metrics[phase][f"eval_{key}"]), (phase, key)


def test_bge_m3_run_in_wandb(tiny_xlmr_path, tmp_path, monkeypatch):
    from ark_hf import BGETrainer

    trainer, metrics, history = _run(
        BGETrainer, tiny_xlmr_path, tmp_path, monkeypatch, "--init_missing_heads", "--eval_modes", "dense",
        "sparse", "colbert", "all",
    )  # fmt: skip
    components = {"loss_dense", "loss_lex", "loss_mul", "loss_inter", "sparse/nonzero_tokens", "sparse/mean_weight"}
    _check_train_rows(trainer, history, components)
    assert all(r["train/sparse/nonzero_tokens"] > 0 for r in history if "train/loss" in r)
    _check_eval_rows(metrics, history, ("dense", "sparse", "colbert", "all"))


def test_qwen3_run_in_wandb(tiny_qwen3_path, tmp_path, monkeypatch):
    from ark_hf import QwenTrainer

    trainer, metrics, history = _run(QwenTrainer, tiny_qwen3_path, tmp_path, monkeypatch, "--bf16", "false")
    _check_train_rows(trainer, history, {"masked_negatives", "negatives"})
    rows = [r for r in history if "train/loss" in r]
    assert all(r["train/masked_negatives"] >= 1 for r in rows)  # the negative equal to the positive is masked
    _check_eval_rows(metrics, history, ("dense",))


def test_alignment_callback_metrics_reach_wandb_and_the_log_history(tiny_qwen3_path, tmp_path, monkeypatch):
    import math

    import numpy as np
    import torch

    from ark_hf import AlignmentCallback, QwenTrainer, QwenTrainerConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    probe = []
    for i in range(4):  # scored records as `score_file` writes them (made-up scores: the callback only reads them)
        entries = [{"forward": float(f), "backward": float(b), "parameter": float(p), "tokens": 10, "score": float(s)}
                   for f, b, p, s in rng.normal(size=(3, 4))]  # fmt: skip
        probe.append({"query": f"how long for permit {i}?", "pos": [f"Permit {i} takes {i + 2} weeks."],
                      "neg": [f"The library opens at {i}.", f"Sheds of {i} m2 need no permit."],
                      "alignment": {"index": i, "pos": entries[:1], "neg": entries[1:]}})  # fmt: skip
    config = QwenTrainerConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=tiny_qwen3_path, max_steps=4, learning_rate=1e-3,
        per_device_train_batch_size=2, train_group_size=3, query_max_len=12, passage_max_len=16, use_cpu=True,
        report_to=["wandb"], save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, seed=3,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = QwenTrainer(config=config, train_dataset=RECORDS)
    trainer.add_callback(AlignmentCallback(probe, every_n_steps=2).bind(trainer))
    try:
        trainer.train()
        run_dir = Path(wandb.run.dir).parent
    finally:
        wandb.finish()
        wandb.teardown()
    logged = [e for e in trainer.state.log_history if "align/forward" in e]
    assert [e["step"] for e in logged] == [2, 4]
    rows = [r for r in _history(run_dir) if "train/align/forward" in r]
    assert len(rows) == len(logged)
    keys = ("forward", "backward", "parameter", "grad_probe_cos", "update_grad_cos")
    for entry, row in zip(logged, rows):
        assert row["train/global_step"] == entry["step"]
        for key in keys:
            value = row[f"train/align/{key}"]
            assert math.isfinite(value) and -1.0 <= value <= 1.0, (key, value)
            assert value == pytest.approx(entry[f"align/{key}"], rel=1e-6), key
