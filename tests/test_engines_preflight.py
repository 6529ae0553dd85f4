"""Bad accelerate configs stop in `preflight` (before the model loads), naming the config key."""

from __future__ import annotations

import importlib.util

import pytest

from ark_hf.utils.cli import ConfigError
from ark_hf.utils.preflight import check_accelerate_config


class _Args:
    use_cpu = False
    mini_batch_size = None
    per_device_train_batch_size = 8
    gradient_accumulation_steps = 1


def test_deepspeed_missing_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else object())
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_CONFIG_FILE": "accelerate_configs/deepspeed_zero2.yaml"}
    with pytest.raises(ConfigError, match=r"deepspeed_zero2\.yaml: key 'distributed_type: DEEPSPEED'.*not installed"):
        check_accelerate_config(_Args(), env)


def test_zero3_without_16bit_save_is_refused():
    pytest.importorskip("deepspeed")
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"}  # fmt: skip
    with pytest.raises(ConfigError, match="zero3_save_16bit_model"):
        check_accelerate_config(_Args(), env)
    env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "true"
    check_accelerate_config(_Args(), env)  # the shipped deepspeed_zero3.yaml passes


def test_fsdp_on_cpu_is_refused():
    args = _Args()
    args.use_cpu = True
    with pytest.raises(ConfigError, match="'distributed_type: FSDP' with 'use_cpu'"):
        check_accelerate_config(args, {"ACCELERATE_USE_FSDP": "true"})


def test_process_count_and_batch_plan():
    args = _Args()
    args.mini_batch_size, args.per_device_train_batch_size, args.gradient_accumulation_steps = 3, 8, 2
    with pytest.raises(ConfigError, match=r"key 'num_processes' \(2\)"):
        check_accelerate_config(args, {"WORLD_SIZE": "2"})
    args.per_device_train_batch_size = 9
    check_accelerate_config(args, {"WORLD_SIZE": "2"})
    check_accelerate_config(_Args(), {})  # no launcher: nothing to check
