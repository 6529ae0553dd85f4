"""Quiet by default: loading, saving and the `ark-hf train` command print only what a user can act on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from ark_hf import cli
from ark_hf.cli import main
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.utils.quiet import DEEPSPEED_CPU_NOTICE

ROOT = Path(__file__).resolve().parents[1]


def _pooler(folder: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith("pooler.")}


def test_bert_backbone_loads_and_saves_without_pooler_reports(minilm_path, tmp_path, capfd):
    original = _pooler(minilm_path)
    assert set(original) == {"pooler.dense.weight", "pooler.dense.bias"}  # MiniLM's checkpoint has a pooler
    model = BGEM3Model(minilm_path, pooling="mean", unified_finetuning=False)
    assert not any(name.startswith("model.pooler") for name, _ in model.named_parameters())  # not trained
    model.save_pretrained(tmp_path / "saved")
    loading = capfd.readouterr().err
    assert "LOAD REPORT" not in loading and "pooler" not in loading, loading
    assert DEEPSPEED_CPU_NOTICE not in loading
    saved = _pooler(tmp_path / "saved")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    # sentence-transformers and FlagEmbedding build the pooler: it loads from the folder, nothing is reported
    AutoModel.from_pretrained(tmp_path / "saved")
    elsewhere = capfd.readouterr().err
    assert "MISSING" not in elsewhere and "Consider training" not in elsewhere, elsewhere


def test_load_problems_other_than_the_pooler_are_still_reported(minilm_path, tmp_path, capfd, caplog):
    """A checkpoint missing an encoder weight: one warning naming it (the report is hidden, not its content)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    folder.mkdir()
    for item in Path(minilm_path).iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(str(Path(minilm_path) / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if k != "encoder.layer.0.output.dense.bias"}, folder / "model.safetensors"
    )
    with caplog.at_level("WARNING", logger="ark_hf"):
        BGEM3Model(str(folder), pooling="mean", unified_finetuning=False)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "ark_hf.models.backbone"]
    assert re.search(r"weights missing \(initialised randomly\): encoder\.layer\.0\.output\.dense\.bias$", warning)
    assert "LOAD REPORT" not in capfd.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing DeepSpeed (4 s)
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed prints its CPU notice only without a GPU")
def test_deepspeed_cpu_notice_is_silenced_by_importing_ark_hf():
    pytest.importorskip("deepspeed")
    probe = "from accelerate.utils import is_deepspeed_available; import deepspeed; deepspeed.get_accelerator()"
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert DEEPSPEED_CPU_NOTICE in plain.stdout + plain.stderr  # what a user saw on every save
    quiet = subprocess.run(
        [sys.executable, "-c", "import ark_hf; " + probe], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert quiet.returncode == 0, quiet.stderr
    assert DEEPSPEED_CPU_NOTICE not in quiet.stdout + quiet.stderr


def test_train_help_without_a_recipe_lists_the_recipes(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ark-hf train {bge-m3,qwen3}")
    assert "bge-m3" in out and "qwen3" in out and "bge_m3_cpu_demo" in out
    assert "qwen3_stages" not in out  # a stage plan, not a training config


def test_train_without_a_recipe_says_what_to_add(capsys):
    assert main(["train"]) == cli.EXIT_USER_ERROR
    assert "name a recipe: ark-hf train {bge-m3,qwen3}" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["bge-m3", "qwen3"])
def test_recipe_help_lists_each_option_once(recipe, capsys):
    assert main(["train", recipe, "--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  --(\w+) \(default", out, flags=re.M)
    names = re.findall(r"--(\w+)", out.split("TrainingArguments' options, also taken")[1])
    assert "train_data" in listed and "per_device_train_batch_size" in names
    assert len(listed) == len(set(listed)) and not set(listed) & set(names)
    assert len(set(names)) == len(names)
    assert len(out.splitlines()) < 200


def test_train_prints_the_metrics_once(monkeypatch, capsys):
    """The recipe prints its metrics table; the command adds nothing (it used to print them again as JSON)."""

    class Recipe:
        @staticmethod
        def main(argv):
            print("Retrieval metrics table")
            return {"after": {"eval_dense_ndcg@10": 0.5}}

    monkeypatch.setattr(cli, "_recipe", lambda name: Recipe)
    assert main(["train", "bge-m3", "--output_dir", "unused"]) == 0
    assert capsys.readouterr().out == "Retrieval metrics table\n"
