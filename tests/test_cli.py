"""`--config file.yaml` + command-line overrides: values, precedence and precise errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ark_hf import BGETrainerConfig
from ark_hf.utils.cli import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_and_cli_overrides(tmp_path):
    path = write(tmp_path, "temperature: 0.05\nuse_self_distill: true\nlearning_rate: 2.0e-5\ntrain_data: a.jsonl\n")
    config = parse_config(
        BGETrainerConfig, ["--config", path, "--output_dir", str(tmp_path / "o"), "--learning_rate", "3e-6"]
    )
    assert config.temperature == 0.05
    assert config.use_self_distill is True
    assert config.learning_rate == 3e-6  # the command line wins
    assert config.train_data == ["a.jsonl"]  # a single path becomes a list


def test_every_shipped_config_parses():
    for path in sorted((ROOT / "recipes" / "configs").glob("bge_m3*.yaml")):
        config = parse_config(
            BGETrainerConfig, ["--config", str(path), "--output_dir", "/tmp/unused", "--bf16", "false"]
        )
        # the CPU recipes name their model on the command line (the demo passes the packaged MiniLM)
        assert config.model_name_or_path or path.name in ("bge_m3_cpu_demo.yaml", "bge_m3_cpu_mined.yaml")


@pytest.mark.parametrize(
    ("text", "line", "key", "phrase"),
    [
        ("temperature: 0.02\ntemprature: 0.05\n", 2, "temprature", "unknown option"),
        ("learning_rate: 1e-5\nuse_self_distill: yes please\n", 2, "use_self_distill", "expected bool"),
        ("train_group_size: eight\n", 1, "train_group_size", "expected int"),
        ("temperature: [0.1]\n", 1, "temperature", "expected float or int"),
        ("query_max_len: true\n", 1, "query_max_len", "expected int"),
    ],
)
def test_bad_yaml_names_file_line_and_key(tmp_path, text, line, key, phrase):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", str(tmp_path / "o")])
    assert f"{path}:{line}: key '{key}'" in str(error.value)
    assert phrase in str(error.value)
    assert not (tmp_path / "o").exists()


def test_typo_suggestion_and_unknown_flag(tmp_path):
    path = write(tmp_path, "use-self-distill: true\n")
    with pytest.raises(ConfigError, match="did you mean 'use_self_distill'"):
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"])
    with pytest.raises(ConfigError, match="unknown command-line arguments: --no_such_flag"):
        parse_config(BGETrainerConfig, ["--output_dir", "o", "--no_such_flag", "1"])


def test_invalid_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "temperature: 0.02\n  bad: [\n")
    with pytest.raises(ConfigError, match=f"{path}:"):
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(BGETrainerConfig, ["--config", str(tmp_path / "none.yaml"), "--output_dir", "o"])


def test_impossible_combination_is_refused(tmp_path):
    path = write(tmp_path, "unified_finetuning: false\nuse_self_distill: true\n")
    with pytest.raises(ConfigError, match="use_self_distill needs unified_finetuning"):
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"])


@pytest.mark.slow
def test_recipe_help_works():
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "bge_m3.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--use_self_distill" in result.stdout and "--config" in result.stdout
