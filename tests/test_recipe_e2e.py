"""End to end through the recipe: YAML + overrides -> validate -> train -> evaluate -> save -> reload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ark_hf import BGEM3Model
from ark_hf.assets import load_faq, minilm_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bge_m3_recipe_on_real_model_and_data(tmp_path):
    rows = load_faq("en")
    train, dev = rows[:64], rows[64:84]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"query": r["q"], "pos": [r["a"]]}) + "\n" for r in train)
    )
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"query": r["q"], "pos": [r["a"]]}) + "\n" for r in dev))
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "recipes" / "bge_m3.py"),
        "--config", str(ROOT / "recipes" / "configs" / "bge_m3_cpu_demo.yaml"),
        "--model_name_or_path", str(minilm_path()),
        "--train_data", str(tmp_path / "train.jsonl"),
        "--eval_data", str(tmp_path / "dev.jsonl"),
        "--output_dir", str(out),
        "--max_steps", "3", "--per_device_train_batch_size", "16",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "retrieval_metrics.json").read_text())
    for stage in ("before", "after"):
        for mode in ("dense", "sparse", "colbert", "dense+sparse", "all"):
            assert 0.0 <= metrics[stage][f"eval_{mode}_ndcg@10"] <= 1.0
    assert metrics["after"]["eval_sparse_ndcg@10"] != metrics["before"]["eval_sparse_ndcg@10"]
    for name in ("model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "modules.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    reloaded = BGEM3Model.from_pretrained(str(out))
    assert reloaded.pooling == "mean"  # read back from the folder
    assert reloaded.has_heads and reloaded.heads_trained

    # the same output_dir again, without --overwrite_output_dir: refused before anything changes
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and "overwrite_output_dir" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_bge_m3_recipe_under_two_processes(tmp_path):
    """The recipe under torchrun (2 CPU processes, gloo): cross-device negatives, logging and saving on rank 0."""
    rows = load_faq("en")[:64]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"query": r["q"], "pos": [r["a"]]}) + "\n" for r in rows))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        str(ROOT / "recipes" / "bge_m3.py"),
        "--config", str(ROOT / "recipes" / "configs" / "bge_m3_cpu_demo.yaml"),
        "--model_name_or_path", str(minilm_path()), "--train_data", str(tmp_path / "train.jsonl"),
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--negatives_cross_device", "true", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert state["log_history"][-1]["epoch"] == pytest.approx(0.75)  # 64 records / (8 per process x 2 processes)
    assert all("loss_dense" in h for h in state["log_history"] if "loss" in h)
    assert (out / "checkpoint-3" / "rng_state_1.pth").is_file()  # both ranks' RNG saved for an exact resume
    assert BGEM3Model.from_pretrained(str(out)).has_heads
