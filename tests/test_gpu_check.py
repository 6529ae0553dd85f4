"""bench/gpu_check.py, the one GPU acceptance command: its CPU dry mode runs every part, so the script cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}  # fmt: skip


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_one_md_one_json_one_log(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_cpu.json", "gpu_check_cpu.log", "gpu_check_cpu.md"]
    report = json.loads((out / "gpu_check_cpu.json").read_text())
    assert report["card"] == "cpu" and report["command"].startswith("python bench/gpu_check.py --device cpu --tiny")
    assert report["versions"]["torch"] and report["versions"]["transformers"]
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert {name: part.get("error") for name, part in parts.items()} == dict.fromkeys(gpu_check.PARTS)

    tests = parts["tests"]
    assert "tests/test_gpu.py" in tests["files"] and tests["counts"]["failed"] == 0
    assert len(tests["tests"]) >= 5 and all(t["outcome"] == "skipped" for t in tests["tests"])  # no CUDA here

    engines = parts["engines"]
    assert engines["cells_ok"] == len(engines["cells"]) == 1
    cell = engines["cells"][0]
    assert cell["reload_max_abs_diff"] <= 1e-3 and all(math.isfinite(v) for v in cell["loss"].values() if v)

    qwen = parts["qwen_padded"]
    for side in ("left", "right"):
        run = qwen["runs"][side]
        assert run["finite"] and run["steps_logged"] == 3 and run["stopped"] is None
        assert run["padding_in_batches"] == side  # the run really was padded on that side
    assert qwen["steps_compared"] == 3 and qwen["max_abs_loss_diff"] < 1e-4  # float32 on CPU: the same losses

    rows = parts["throughput"]["report"]["rows"]
    assert [r["row"] for r in rows] == ["ark_hf QwenTrainer default config"]
    assert rows[0]["real_tokens_per_s"] > 0 and rows[0]["spread"]["runs"] == 1

    refresh = parts["refresh"]["report"]  # bench/refresh_cost.py: every refresh timed inside a training run
    assert refresh["corpus_passages"] == 300 and refresh["refreshes"] == 2
    assert all(s > 0 for s in refresh["refresh_seconds"]) and 0 < refresh["refresh_share_of_train"] < 1
    assert [m["hard_negatives/full_group_share"] for m in refresh["refresh_metrics"]] == [1.0, 1.0]

    text = (out / "gpu_check_cpu.md").read_text()
    for heading in ("## CUDA tests", "## Engines", "## Padded Qwen3 default", "## Throughput core rows"):
        assert heading in text
    assert "===== engines" in (out / "gpu_check_cpu.log").read_text()


def test_help_documents_the_parts_and_the_dry_mode():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--help"], capture_output=True,
                          text=True, env=ENV, timeout=120)  # fmt: skip
    assert proc.returncode == 0
    for word in ("--device cpu --tiny", "--out", "--budget", "--qwen-layers", "run_gpu_check.sh", *gpu_check.PARTS):
        assert word in proc.stdout


@pytest.mark.parametrize(
    ("name", "card"),
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("cpu", "cpu")],
)
def test_card_name(name, card):
    assert gpu_check.card_name(name) == card


def test_a_non_finite_step_and_a_cut_run_are_reported(tmp_path):
    """The Qwen3 summary marks a NaN loss, the step it appeared at, and a run cut before its last step."""
    rows = {"left": [(1, 2.0, 1.0), (2, float("nan"), float("nan"))], "right": [(1, 2.0, 1.0), (2, 1.5, 1.0)]}
    for side, logged in rows.items():
        lines = [json.dumps({"step": s, "loss": loss, "grad_norm": norm, "step_s": 0.1,
                             "padded_rows": {"batches": {side: 4}, "backbone": {"right": 4}}}) for s, loss, norm in logged]  # fmt: skip
        (tmp_path / f"{side}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "right.json").write_text(json.dumps({"stopped": None, "padded_rows": None}))
    summary = gpu_check.qwen_summary(tmp_path, steps=3)
    left, right = summary["runs"]["left"], summary["runs"]["right"]
    assert not left["finite"] and left["first_nonfinite_step"] == 2 and "cut" in left["stopped"]
    assert not right["finite"] and right["first_nonfinite_step"] is None  # finite, but 2 of 3 steps
    assert left["padding_in_batches"] == "left" and left["padding_at_backbone"] == "right"
    assert summary["max_abs_loss_diff"] == "nan"


def test_every_test_that_needs_cuda_carries_the_gpu_marker():
    """gpu_check selects the CUDA tests by the `gpu` marker: each skip-without-CUDA decorator sits next to it
    (or the module's `pytestmark` carries it), in a file gpu_check runs."""
    needs_cuda = re.compile(r"skipif\(\s*not\s+(torch\.cuda\.is_available|packing\.varlen_attention_available)")
    selected, found = set(gpu_check.gpu_test_files()), 0
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text()
        module_marked = re.search(r"pytestmark = \[[^\]]*mark\.gpu", text, re.S) is not None
        for match in needs_cuda.finditer(text):
            found += 1
            decorators = text[text.rfind("\n\n", 0, match.start()) : match.start()]
            assert module_marked or "mark.gpu" in decorators, f"{path.name}: a CUDA test without the gpu marker"
            assert str(path.relative_to(ROOT)) in selected
    assert found >= 2
