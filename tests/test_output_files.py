"""Files ark_hf writes are like any file the user writes, and the shipped configs show the loss of short runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from ark_hf.mining import write_records

CONFIGS = Path(__file__).resolve().parents[1] / "ark_hf" / "recipes" / "configs"
TRAINING_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "stages" not in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_mined_file_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_records([{"query": "q", "pos": ["p"], "neg": ["n"]}], tmp_path / "mined.jsonl")
    finally:
        os.umask(previous)
    assert (tmp_path / "mined.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask  # 0644, 0640: not mkstemp's 0600
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_shipped_config_logs_the_loss_of_a_short_run():
    assert len(TRAINING_CONFIGS) >= 8
    for path in TRAINING_CONFIGS:
        config = yaml.safe_load(path.read_text())
        assert config.get("logging_first_step") is True, f"{path.name}: a run shorter than logging_steps logs nothing"
        if "cpu" in path.stem:  # the CPU demos run a few dozen steps
            assert config["logging_steps"] == 1, path.name
