"""`dataloader_num_workers: -1` (auto, the default): batches tokenized in 2 worker processes when training on CUDA,
in the main process elsewhere; worker processes give the same batches, hence the same losses."""

from __future__ import annotations

import json

import pytest
import torch

from ark_hf import BGETrainer, BGETrainerConfig, HardNegativeRefresh
from ark_hf.assets import load_faq


def _config(tmp_path, **fields) -> BGETrainerConfig:
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no")
    return BGETrainerConfig(**{**base, **fields})


def test_auto_is_the_default_and_resolves_to_the_main_process_on_cpu(tmp_path):
    config = _config(tmp_path)
    assert config.dataloader_num_workers == 0 and config._num_workers_auto
    explicit = _config(tmp_path, dataloader_num_workers=3)
    assert explicit.dataloader_num_workers == 3 and not explicit._num_workers_auto
    with pytest.raises(ValueError, match=r"dataloader_num_workers must be -1 \(auto\) or >= 0, got -2"):
        _config(tmp_path, dataloader_num_workers=-2)


def test_auto_on_cuda_uses_two_workers_but_none_with_a_step_refresh(tmp_path, monkeypatch):
    config = _config(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config.use_cpu, config.dataloader_num_workers = False, -1
    config.dataloader_num_workers = config._resolve_num_workers()  # what __post_init__ does
    assert config.dataloader_num_workers == 2 and config._num_workers_auto

    # a step-based refresh (from the config, as the trainer builds it before training; or given as a callback):
    # auto workers are turned off, explicit ones refused
    records = [{"query": r["q"], "pos": [r["a"]]} for r in load_faq("en")[:4]]
    config.refresh_negatives, config.refresh_negatives_steps = "steps", 2
    HardNegativeRefresh.from_config(config).check_before_training(records, config, trust_remote_code=False)
    assert config.dataloader_num_workers == 0
    refresh = HardNegativeRefresh(every_n_steps=2)
    config.dataloader_num_workers, config._num_workers_auto = 2, True
    refresh.check_before_training(records, config, trust_remote_code=False)
    assert config.dataloader_num_workers == 0
    config.dataloader_num_workers, config._num_workers_auto = 2, False
    with pytest.raises(ValueError, match="refresh_negatives=steps needs dataloader_num_workers=0"):
        refresh.check_before_training(records, config, trust_remote_code=False)


@pytest.mark.slow
def test_worker_processes_give_the_same_losses(tiny_xlmr_path, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = load_faq("en")[:24]
    data.write_text("".join(json.dumps({"query": r["q"], "pos": [r["a"]]}) + "\n" for r in rows), encoding="utf-8")
    losses = {}
    for workers in (0, 2):
        config = _config(
            tmp_path / str(workers), model_name_or_path=tiny_xlmr_path, init_missing_heads=True,
            train_data=[str(data)], train_group_size=2, per_device_train_batch_size=4, query_max_len=16,
            passage_max_len=32, max_steps=3, logging_steps=1, disable_tqdm=True, dataloader_num_workers=workers,
        )  # fmt: skip
        trainer = BGETrainer(config=config)
        trainer.train()
        losses[workers] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[0]) == 3 and losses[2] == losses[0]
