"""Both demos (`make demo`, `make demo-qwen`) run end to end, on tiny models (`--tiny`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ark_hf.recipes import demo, qwen3_demo

pytestmark = pytest.mark.slow  # end-to-end runs of the demo scripts (17 s): the full suite runs them


def test_bge_m3_demo_trains_both_runs_and_writes_its_metrics(tiny_xlmr_path, tmp_path):
    out = tmp_path / "demo"
    result = demo.main(["--tiny", "--output_dir", str(out), "--model_name_or_path", tiny_xlmr_path])

    assert json.loads((out / "demo_metrics.json").read_text()) == json.loads(json.dumps(result))
    assert (result["held_out_queries"], result["corpus"]) == (demo.TINY_HELD_OUT, demo.TINY_ROWS)
    for name in ("unified+self_distill", "unified"):
        run = result["runs"][name]
        for phase in ("before", "after"):
            for mode in demo.MODES:
                value = run[phase][f"{mode}_ndcg@10"]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, f"{name} {phase} {mode}: {value}"
        for head in ("model.safetensors", "sparse_linear.pt", "colbert_linear.pt"):
            assert (out / name / head).is_file(), f"{out / name} lacks {head}"


def test_qwen3_demo_runs_three_stages_and_the_merge(tiny_qwen3_path, tmp_path):
    out = tmp_path / "qwen3_demo"
    result = qwen3_demo.main(["--tiny", "--output_dir", str(out), "--model_name_or_path", tiny_qwen3_path])

    assert json.loads((out / "demo_metrics.json").read_text()) == json.loads(json.dumps(result))
    # 32 training rows, batch 16: two steps per data stage, none for the merge, which reads stage 2's checkpoints
    assert result["stage_steps"] == [2, 2, 0]
    assert result["merge_steps"] == [3, 4]
    assert len(result["losses"]) == 4 and all(math.isfinite(loss) for loss in result["losses"])
    merged = Path(result["merged_path"])
    assert merged == out / "run" / "stage3_merged" and (merged / "config.json").is_file()
    assert result["sentence_transformers_equal"] is True
    for phase in ("before", "after_stage2", "merged"):
        assert 0.0 <= result[phase]["eval_dense_ndcg@10"] <= 1.0
    # the merge is a new model between the two checkpoints it read, a copy of neither
    from safetensors.torch import load_file

    weights = [load_file(folder / "model.safetensors") for folder in (out / "run" / "checkpoint-3", out / "run" /
               "checkpoint-4", merged)]  # fmt: skip
    key = next(name for name in weights[2] if name.endswith("layers.0.self_attn.q_proj.weight"))
    assert not weights[2][key].equal(weights[0][key]) and not weights[2][key].equal(weights[1][key])
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["method"] == "slerp" and [Path(path).name for path in info["checkpoints"]] == [
        "checkpoint-3",
        "checkpoint-4",
    ]
