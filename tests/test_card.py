"""Model card details that need no training: how models are named, which settings count as changed."""

from __future__ import annotations

import pytest

from ark_hf.hub import _non_default_hyperparameters, model_display_name
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.qwen_config import QwenTrainerConfig


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("BAAI/bge-m3", "BAAI/bge-m3"),
        ("xlm-roberta-large", "xlm-roberta-large"),
        ("/home/me/.cache/huggingface/hub/models--BAAI--bge-m3/snapshots/5617a9f6", "BAAI/bge-m3"),
        ("/home/me/models/my-encoder", "my-encoder"),
        ("./checkpoints/run-3", "run-3"),
        ("~/models/minilm", "minilm"),
    ],
)
def test_model_display_name_never_shows_a_local_path(name, shown):
    assert model_display_name(name) == shown


@pytest.mark.parametrize("config_class", [BGETrainerConfig, QwenTrainerConfig])
def test_a_default_config_lists_no_hyperparameter(config_class, tmp_path):
    # use_cpu turns dataloader pinning off, debug becomes [], accelerator_config a dict, checkpointing a bool
    config = config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert _non_default_hyperparameters(config) == []


def test_changed_settings_are_listed_with_their_values(tmp_path):
    config = QwenTrainerConfig(
        output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-4, lr_scheduler_type="cosine",
        activation_checkpointing=False, debug="underflow_overflow",
    )  # fmt: skip
    assert _non_default_hyperparameters(config) == [
        ("activation_checkpointing", False),  # the Qwen default is on
        ("debug", ["underflow_overflow"]),
        ("learning_rate", 0.0001),
        ("lr_scheduler_type", "cosine"),
    ]
    assert ("activation_checkpointing", True) in _non_default_hyperparameters(
        BGETrainerConfig(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=True)
    )
