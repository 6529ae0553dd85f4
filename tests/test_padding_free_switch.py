"""The `padding_free` switch: `auto` by default, resolved once per trainer for the device it trains on, applied to
whatever model the trainer gets, and `true` refused before weights load for a backbone that cannot pack."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.packing import resolve_padding_free
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer
from ark_hf.trainer.qwen_config import QwenTrainerConfig
from ark_hf.trainer.qwen_trainer import QwenTrainer
from ark_hf.utils.cli import load_yaml_config

RECORDS = [
    {"query": f"question {i} about permits", "pos": [f"answer {i} on the permit office"], "neg": [f"other {i} roof"]}
    for i in range(6)
]
QUICK = dict(
    use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=3, max_steps=2,
    per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16, learning_rate=1e-3,
)  # fmt: skip


def test_default_is_auto_and_booleans_are_accepted(tmp_path):
    assert BGETrainerConfig(output_dir=str(tmp_path)).padding_free == "auto"
    assert BGETrainerConfig(output_dir=str(tmp_path), padding_free=True).padding_free == "true"
    assert QwenTrainerConfig(output_dir=str(tmp_path), padding_free="False").padding_free == "false"
    (tmp_path / "c.yaml").write_text("padding_free: true\n")
    assert load_yaml_config(tmp_path / "c.yaml", BGETrainerConfig) == {"padding_free": "true"}
    with pytest.raises(ValueError, match="padding_free must be one of auto, true, false"):
        BGETrainerConfig(output_dir=str(tmp_path), padding_free="sometimes")


def test_auto_resolves_by_device_and_precision(tiny_qwen3_path):
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(tiny_qwen3_path)
    assert resolve_padding_free("auto", backbone, device="cpu", half_precision=True)[0] is False
    on, why = resolve_padding_free("auto", backbone, device="cuda", half_precision=False)
    assert on is False and "bf16/fp16" in why
    assert resolve_padding_free("auto", backbone, device="cuda", half_precision=True)[0] is True
    assert resolve_padding_free("true", backbone, device="cpu", half_precision=False)[0] is True
    assert resolve_padding_free("false", backbone, device="cuda", half_precision=True)[0] is False


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_a_user_built_model_follows_the_config_and_auto_is_the_exact_padded_path_on_cpu(tiny_xlmr_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr_path)
    runs = {}
    for setting in ("auto", "false", "true"):
        torch.manual_seed(0)
        # the user's model says the opposite of what the config will decide: the config wins
        model = BGEM3Model(
            tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True, padding_free=setting != "true"
        )
        config = BGETrainerConfig(output_dir=str(tmp_path / setting), padding_free=setting, **QUICK)
        trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS)
        assert trainer.model.padding_free is (setting == "true")
        trainer.train()
        runs[setting] = _losses(trainer)
    assert len(runs["auto"]) == 2 and all(math.isfinite(v) for v in runs["auto"])
    assert runs["auto"] == runs["false"]  # auto on CPU is the padded path itself
    assert len(runs["true"]) == 2 and all(math.isfinite(v) for v in runs["true"])  # equality: test_packing.py


def test_padding_free_true_on_a_backbone_that_cannot_pack_is_refused_before_weights_load(tiny_qwen3_path, tmp_path):
    folder = tmp_path / "sliding"
    config = AutoConfig.from_pretrained(tiny_qwen3_path)
    config.use_sliding_window, config.sliding_window = True, 8
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.save_pretrained(folder)  # a config and a tokenizer, no weights: a load attempt would fail otherwise
    AutoTokenizer.from_pretrained(tiny_qwen3_path).save_pretrained(folder)
    out = tmp_path / "out"
    args = QwenTrainerConfig(output_dir=str(out), model_name_or_path=str(folder), padding_free=True, **QUICK)
    with pytest.raises(ValueError, match=r"padding_free=true: .*sliding-window attention.*padding_free: auto"):
        QwenTrainer(config=args, train_dataset=RECORDS)
    assert not out.exists()


def test_cli_config_round_trip_keeps_the_string(tmp_path):
    (tmp_path / "c.yaml").write_text(json.dumps({"padding_free": "auto"}) + "\n")
    assert load_yaml_config(tmp_path / "c.yaml", QwenTrainerConfig) == {"padding_free": "auto"}


def test_the_collator_builds_the_packing_index_on_the_host(tiny_xlmr_path, tmp_path):
    from ark_hf.losses.cached import chunk_features
    from ark_hf.models.packing import PACKING_KEY, PackedBatch

    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr_path)
    tokenizer.padding_side = "left"
    model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True)
    config = BGETrainerConfig(output_dir=str(tmp_path / "o"), padding_free=True, **QUICK)
    trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS)
    assert trainer.data_collator.packing_index
    items = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(items)
    features = batch["passages"]
    index = features[PACKING_KEY]
    assert all(value.device.type == "cpu" for value in index.values() if isinstance(value, torch.Tensor))
    given = PackedBatch.from_features(features, offset=2)
    computed = PackedBatch.from_padded(features["input_ids"], features["attention_mask"], offset=2)
    for name in ("input_ids", "position_ids", "cu_seqlens", "lengths", "flat_index", "segment_ids"):
        assert torch.equal(getattr(given, name), getattr(computed, name)), name
    assert given.max_length == computed.max_length
    mask = features["attention_mask"].bool()
    assert torch.equal(given.input_ids[0], features["input_ids"][mask])  # row-major real tokens, left padding too
    assert torch.equal(given.repad(given.input_ids[0]), features["input_ids"] * mask)
    chunks = list(chunk_features(features, 3))  # GradCache slices rows; each slice packs its own
    assert all(PACKING_KEY not in chunk for chunk in chunks) and sum(len(c["input_ids"]) for c in chunks) == len(mask)
