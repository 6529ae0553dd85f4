"""The recipes and their configs live in the package: `--config NAME` works from any folder and from a wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ark_hf import BGETrainerConfig, QwenTrainerConfig
from ark_hf.utils.cli import (
    SHIPPED_CONFIG_DIR,
    ConfigError,
    parse_config,
    resolve_config_file,
    shipped_config_names,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    "bge_m3_cpu_demo", "bge_m3_cpu_mined", "bge_m3_dense", "bge_m3_unified_kd", "bge_m3_unified_self_distill",
    "qwen3_curriculum", "qwen3_full", "qwen3_lora", "qwen3_stages",
]  # fmt: skip


def test_configs_are_package_data_of_the_recipes():
    assert SHIPPED_CONFIG_DIR == ROOT / "ark_hf" / "recipes" / "configs"
    assert set(SHIPPED) <= set(shipped_config_names())
    # the checkout's old paths (`recipes/configs/NAME.yaml`, in scripts and earlier docs) reach the same files
    assert sorted(path.stem for path in (ROOT / "recipes" / "configs").glob("*.yaml")) == shipped_config_names()


@pytest.mark.parametrize("name", ["bge_m3_dense", "bge_m3_dense.yaml"])
def test_a_shipped_name_resolves_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_file(name) == SHIPPED_CONFIG_DIR / "bge_m3_dense.yaml"
    config = parse_config(BGETrainerConfig, ["--config", name, "--output_dir", "o", "--bf16", "false"])
    assert config.model_name_or_path == "BAAI/bge-m3" and config.unified_finetuning is False
    assert config.train_group_size == 8 and config.temperature == 0.02


def test_a_file_in_the_working_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bge_m3_dense.yaml").write_text("temperature: 0.07\n", encoding="utf-8")
    assert resolve_config_file("bge_m3_dense.yaml") == Path("bge_m3_dense.yaml")
    config = parse_config(BGETrainerConfig, ["--config", "bge_m3_dense.yaml", "--output_dir", "o"])
    assert config.temperature == 0.07 and config.model_name_or_path != "BAAI/bge-m3"


def test_an_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        parse_config(BGETrainerConfig, ["--config", "bge_m3_unifed", "--output_dir", "o"])
    message = str(error.value)
    assert message.startswith("bge_m3_unifed: config file not found")
    assert "bge_m3_unified_self_distill" in message and str(SHIPPED_CONFIG_DIR) in message
    with pytest.raises(ConfigError, match="sub/none.yaml: config file not found"):  # a path is not looked up
        parse_config(BGETrainerConfig, ["--config", "sub/none.yaml", "--output_dir", "o"])


def test_the_curriculum_config_names_the_shipped_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("stage1_pairs.jsonl", "stage2_supervised.jsonl", "stage2_synthetic_filtered.jsonl"):
        (tmp_path / "data" / name).write_text("", encoding="utf-8")  # the plan's example files
    config = parse_config(
        QwenTrainerConfig,
        ["--config", "qwen3_curriculum", "--output_dir", "o", "--bf16", "false", "--use_cpu"],
    )
    assert config.curriculum == "qwen3_stages"
    from ark_hf.curriculum.plan import StagePlanError, load_stage_plan

    assert [stage.name for stage in load_stage_plan(config.curriculum)] == ["weak_pairs", "supervised", "merge"]
    with pytest.raises(StagePlanError, match="qwen3_stagse: stage plan not found"):
        load_stage_plan("qwen3_stagse")


def test_the_checkout_launchers_run_the_package_recipes():
    import ark_hf.recipes.bge_m3
    import ark_hf.recipes.demo
    import ark_hf.recipes.qwen3_demo
    import ark_hf.recipes.qwen3_embedding

    for script, module in [
        ("bge_m3", ark_hf.recipes.bge_m3),
        ("qwen3_embedding", ark_hf.recipes.qwen3_embedding),
        ("demo", ark_hf.recipes.demo),
        ("qwen3_demo", ark_hf.recipes.qwen3_demo),
    ]:
        spec = importlib.util.spec_from_file_location(f"launcher_{script}", ROOT / "recipes" / f"{script}.py")
        launcher = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(launcher)
        assert launcher.main is module.main, f"recipes/{script}.py does not launch {module.__name__}.main"


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


@pytest.mark.slow  # builds a wheel, a virtual environment and trains in a fresh process (about 40 s)
def test_wheel_trains_a_shipped_config_from_another_folder(tiny_xlmr_path, tmp_path):
    # build from a copy of the sources, so the build leaves nothing in the checkout
    source = tmp_path / "source"
    shutil.copytree(ROOT / "ark_hf", source / "ark_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = dist.glob("ark_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"ark_hf/recipes/configs/{name}.yaml" for name in SHIPPED} <= names
    assert "ark_hf/recipes/bge_m3.py" in names and not any(name.startswith("recipes/") for name in names)

    # a fresh environment: the wheel's ark_hf, dependencies read from this environment's site-packages (a plain
    # path in a .pth file: the editable install's own .pth, which points at the checkout, is not processed)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (_site_packages(python) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    where = subprocess.run(
        [str(python), "-c", "import ark_hf; print(ark_hf.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), f"ark_hf imported from {where.stdout.strip()}"

    rows = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(8)]
    (elsewhere / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    result = subprocess.run(
        [str(venv / "bin" / "ark-hf"), "train", "bge-m3", "--config", "bge_m3_unified_self_distill",
         "--model_name_or_path", tiny_xlmr_path, "--init_missing_heads", "true", "--train_data", "train.jsonl",
         "--output_dir", "out", "--max_steps", "2", "--per_device_train_batch_size", "2", "--train_group_size", "2",
         "--query_max_len", "16", "--passage_max_len", "16", "--bf16", "false", "--use_cpu", "true",
         "--activation_checkpointing", "false", "--logging_steps", "1"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = elsewhere / "out"
    for name in ("model.safetensors", "sparse_linear.pt", "colbert_linear.pt", "training_args.bin"):
        assert (out / name).is_file(), f"{out} lacks {name}: {sorted(p.name for p in out.iterdir())}"
    from safetensors.torch import load_file

    before, after = load_file(Path(tiny_xlmr_path) / "model.safetensors"), load_file(out / "model.safetensors")
    key = next(k for k in before if k.endswith("encoder.layer.0.attention.self.query.weight"))
    trained = next(k for k in after if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not before[key].equal(after[trained]), "the saved encoder equals the initial one: no training step ran"
