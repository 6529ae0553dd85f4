"""One home per decision: BGE-M3's heads, the Qwen3 loss options and the content hash are each defined once and
the rest derive from them; the loss decides what the model computes in training, and the trainer tells the model."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import ark_hf
from ark_hf.data import collator, hashing
from ark_hf.evaluation import weights
from ark_hf.losses import m3
from ark_hf.losses.infonce import InfoNCELoss
from ark_hf.losses.m3 import M3Loss
from ark_hf.losses.qwen3 import QWEN3_LOSS_OPTION_TYPES, Qwen3InfoNCELoss, Qwen3LossOptions, qwen3_infonce_loss
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder
from ark_hf.models.outputs import M3_HEADS, fields_of_heads, heads_of_fields
from ark_hf.trainer import bge_config
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer
from ark_hf.trainer.qwen_config import QwenTrainerConfig

PACKAGE = Path(ark_hf.__file__).parent
RECORDS = [
    {"query": f"how long does permit {i} take", "pos": [f"Permit {i} takes {i + 2} weeks."],
     "neg": [f"Parking rules changed in district {i}."]}
    for i in range(4)
]  # fmt: skip


def _definitions(pattern: str) -> list[str]:
    """Package files (relative paths) whose source matches `pattern` at the start of a line."""
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if regex.search(p.read_text("utf-8")))


def test_heads_and_hash_are_defined_once():
    assert _definitions(r"^M3_HEADS\s*=") == ["models/outputs.py"]
    assert _definitions(r"^def text_hash\(") == ["data/hashing.py"]
    assert bge_config.M3_HEADS is m3.M3_HEADS is weights.M3_HEADS is M3_HEADS
    assert collator.text_hash is hashing.text_hash


def test_head_fields_derive_from_the_heads():
    assert fields_of_heads(M3_HEADS) == ("dense", "sparse_weights", "input_ids", "colbert", "colbert_mask")
    assert fields_of_heads(["colbert"]) == ("dense", "colbert", "colbert_mask")
    assert heads_of_fields(M3Loss(train_heads=("dense", "sparse")).heads) == ("dense", "sparse")
    assert M3Loss(unified_finetuning=False).heads == ("dense",)
    with pytest.raises(ValueError, match="unknown head"):
        fields_of_heads(["lexical"])


def test_qwen3_options_are_spelled_once():
    names = tuple(f.name for f in dataclasses.fields(Qwen3LossOptions))
    assert tuple(QWEN3_LOSS_OPTION_TYPES) == names
    config_fields = {f.name: f for f in dataclasses.fields(QwenTrainerConfig)}
    for option in dataclasses.fields(Qwen3LossOptions):
        assert config_fields[option.name].default == option.default
        assert config_fields[option.name].metadata["help"] == option.metadata["help"]
    defaults = Qwen3LossOptions()
    signature = inspect.signature(qwen3_infonce_loss).parameters
    for name in names:
        if name in signature:
            assert signature[name].default == getattr(defaults, name), name
    assert Qwen3InfoNCELoss().options == defaults.as_dict()
    config = QwenTrainerConfig(output_dir="unused", use_cpu=True, report_to="none", temperature=0.07, use_dd=False)
    assert Qwen3InfoNCELoss(config).options == config.loss_options == {**defaults.as_dict(), "temperature": 0.07,
                                                                       "use_dd": False}  # fmt: skip
    with pytest.raises(ValueError, match="has no option 'margin'"):
        Qwen3InfoNCELoss(margin=0.2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Qwen3LossOptions(temperature=0.0).check(train_group_size=2, negatives_cross_device=False)


def test_margin_alias_warns_and_equals_false_negative_margin():
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    docs = F.normalize(query.repeat_interleave(2, dim=0) + torch.randn(6, 8, generator=g), dim=-1)
    expected, expected_stats = qwen3_infonce_loss(query, docs, 2, false_negative_margin=0.0)
    with pytest.warns(FutureWarning, match="false_negative_margin"):
        got, stats = qwen3_infonce_loss(query, docs, 2, margin=0.0)
    torch.testing.assert_close(got, expected)
    assert int(stats["masked"]) == int(expected_stats["masked"])
    _, wide = qwen3_infonce_loss(query, docs, 2, false_negative_margin=2.0)
    assert int(wide["masked"]) < int(stats["masked"])  # the margin given is the one applied


@pytest.fixture(scope="module")
def tokenizer(tiny_xlmr_path):
    return AutoTokenizer.from_pretrained(tiny_xlmr_path)


def test_model_computes_in_training_what_the_loss_reads(tiny_xlmr_path, tokenizer):
    model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True)
    features = model.tokenize(["permit office", "city hall hours"], 12)
    model.train()
    model.set_training_outputs(M3Loss(train_heads=("dense", "colbert")).heads)
    assert model.unified_finetuning and model.encode_features(features).colbert is not None
    model.set_training_outputs(InfoNCELoss().heads)
    assert not model.unified_finetuning
    output = model.encode_features(features)
    assert output.colbert is None and output.sparse_weights is None
    model.eval()
    assert model.encode_features(features).colbert is not None  # inference uses every head the model has
    model.unified_finetuning = True  # the public switch still works
    assert model.training_outputs == fields_of_heads(M3_HEADS)
    with pytest.raises(ValueError, match="not EmbeddingOutput fields"):
        model.set_training_outputs(("dense", "lexical_weights"))
    dense_only = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, unified_finetuning=False)
    with pytest.raises(ValueError, match="has no sparse/ColBERT heads"):
        dense_only.set_training_outputs(M3Loss().heads)


def test_decoder_refuses_a_loss_that_reads_heads(tiny_qwen3_path):
    model = DecoderEmbedder(tiny_qwen3_path)
    model.set_training_outputs(("dense",))
    with pytest.raises(ValueError, match="outputs dense vectors only"):
        model.set_training_outputs(M3Loss().heads)


@pytest.mark.parametrize(
    ("loss", "computes_heads"), [(InfoNCELoss(), False), (M3Loss(train_heads=("dense", "sparse")), True)]
)
def test_trainer_tells_the_model_what_its_loss_reads(tiny_xlmr_path, tokenizer, tmp_path, loss, computes_heads):
    """The config says unified fine-tuning and the model was built for it; the loss given decides."""
    model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True)
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16, max_steps=1,
    )  # fmt: skip
    BGETrainer(model=model, config=config, train_dataset=RECORDS, loss=loss)
    assert model.unified_finetuning == computes_heads
    assert model.colbert_linear.weight.requires_grad == (not computes_heads)  # read by nothing: frozen


@pytest.mark.slow
def test_output_dir_is_checked_once_per_launch(tiny_xlmr_path, tmp_path, monkeypatch):
    """`preflight` checks the output directory before the weights load; `train()` then checks only the free space."""
    import json

    from ark_hf.trainer.runner import run_recipe
    from ark_hf.utils import preflight

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    calls: list[str] = []
    free_space: list[int] = []
    check_output_dir, check_free_space = preflight.check_output_dir, preflight.check_free_space
    monkeypatch.setattr(preflight, "check_output_dir", lambda *a, **k: calls.append(a[0]) or check_output_dir(*a, **k))
    monkeypatch.setattr(preflight, "check_free_space", lambda d, n: free_space.append(n) or check_free_space(d, n))
    output_dir = tmp_path / "out"
    run_recipe(
        BGETrainer,
        ["--model_name_or_path", tiny_xlmr_path, "--init_missing_heads", "--train_data", str(data), "--output_dir",
         str(output_dir), "--max_steps", "1", "--per_device_train_batch_size", "2", "--train_group_size", "2",
         "--query_max_len", "12", "--passage_max_len", "16", "--use_cpu", "--report_to", "none", "--save_strategy",
         "no", "--disable_tqdm", "true"],
    )  # fmt: skip
    assert calls == [str(output_dir)]
    assert free_space and free_space[-1] > 0  # the disk check with the built model's checkpoint size


@pytest.mark.parametrize("kind", ["bge_m3", "decoder"])
def test_collator_tokenizes_with_the_models_rule(kind, tiny_xlmr_path, tiny_qwen3_path, tokenizer):
    """Training (the collator) and `model.tokenize` (evaluation, mining, alignment) share the model's rule."""
    import pickle

    from ark_hf.data.collator import RetrievalCollator

    if kind == "bge_m3":
        model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True)
    else:
        model = DecoderEmbedder(tiny_qwen3_path)
    rule = model.text_tokenizer()
    assert pickle.loads(pickle.dumps(rule)).append_eos_token_id == rule.append_eos_token_id  # DataLoader workers
    items = [{"query": "how long does a permit take", "passages": ["two weeks at the city office " * 4, "no"]}]
    collator = RetrievalCollator(model.tokenizer, query_max_len=6, passage_max_len=8, text_tokenizer=rule)
    batch = collator(items)
    for side, texts, length in (("query", [items[0]["query"]], 6), ("passages", items[0]["passages"], 8)):
        expected = model.tokenize(texts, length)
        torch.testing.assert_close(batch[side]["input_ids"], expected["input_ids"])
        torch.testing.assert_close(batch[side]["attention_mask"], expected["attention_mask"])
    if kind == "decoder":  # truncated, and the pooled EOS still last
        assert batch["passages"]["input_ids"][0, -1].item() == model.eos_token_id


def test_trainer_gives_the_collator_the_models_rule(tiny_xlmr_path, tokenizer, tmp_path):
    model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True)
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16, max_steps=1,
    )  # fmt: skip
    trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS)
    assert trainer.data_collator.text_tokenizer == model.text_tokenizer()
