"""`load_embedder`: every saved kind (BGE-M3 with and without heads, decoder, merged LoRA, LoRA adapter folder) is
detected once and loads to the same embeddings through mining, ARK's alignment and `ark-hf eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ark_hf.alignment.embedding import encode_dense, load_retriever
from ark_hf.cli import main
from ark_hf.constants import ADAPTER_CONFIG_NAME
from ark_hf.evaluation.ir import MODES
from ark_hf.mining import load_mining_model, mine_hard_negatives
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder
from ark_hf.models.loading import (
    detect_embedder_kind,
    embedder_kind,
    load_embedder,
    resolve_embedder_kind,
)

TEXTS = ["permit office hours", "the city office issues permits in two weeks", "parking rules changed"]
RECORDS = [
    {"query": f"how long does permit {i} take", "pos": [f"Permit {i} takes {i + 2} weeks."],
     "neg": [f"Parking rules changed in district {i}."]}
    for i in range(4)
]  # fmt: skip
KINDS = ["bge_m3_heads", "bge_m3_dense", "decoder", "decoder_lora_merged", "decoder_lora_adapter"]

pytestmark = pytest.mark.slow  # every saved kind trained, saved and reloaded; the full suite runs it


def _perturb_lora(model: DecoderEmbedder) -> None:
    """peft starts lora_B at zero (the adapter changes nothing); give it weight so a lost adapter shows."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)


def _build(kind: str, tiny_xlmr_path: str, tiny_qwen3_path: str, folder: Path) -> torch.nn.Module:
    if kind == "bge_m3_heads":
        model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    elif kind == "bge_m3_dense":
        model = BGEM3Model(tiny_xlmr_path, unified_finetuning=False)
    elif kind == "decoder":
        model = DecoderEmbedder(tiny_qwen3_path)
    else:
        model = DecoderEmbedder(tiny_qwen3_path, lora=True, lora_r=4)
        _perturb_lora(model)
    if kind == "decoder_lora_adapter":
        model.save_pretrained(folder, merge_lora=False)
        assert (folder / ADAPTER_CONFIG_NAME).is_file() and not (folder / "config.json").is_file()
    else:
        model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tiny_xlmr_path, tiny_qwen3_path, tmp_path_factory):
    """kind -> (saved folder, the dense embeddings of TEXTS from the model that wrote it)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind) / "model"
        model = _build(kind, tiny_xlmr_path, tiny_qwen3_path, folder)
        with torch.no_grad():
            out[kind] = (folder, encode_dense(model, TEXTS, max_length=16))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_kind_detected_once_and_embeddings_survive_the_round_trip(saved, kind):
    folder, expected = saved[kind]
    detected = detect_embedder_kind(folder)
    assert detected == ("bge_m3" if kind.startswith("bge_m3") else "decoder")
    model = load_embedder(folder, device="cpu")
    assert embedder_kind(model) == detected
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(encode_dense(model, TEXTS, max_length=16), expected)
    if kind.startswith("bge_m3"):
        assert model.has_heads == (kind == "bge_m3_heads")


@pytest.mark.parametrize("kind", KINDS)
def test_mining_and_alignment_load_every_kind_through_load_embedder(saved, kind):
    folder, expected = saved[kind]
    for model in (load_mining_model(str(folder), device="cpu"), load_retriever(str(folder), device="cpu")):
        with torch.no_grad():
            torch.testing.assert_close(encode_dense(model, TEXTS, max_length=16), expected)
    result = mine_hard_negatives(
        RECORDS, str(folder), num_negatives=1, range_min=0, query_max_len=16, passage_max_len=16,
        show_progress_bar=False, device="cpu",
    )  # fmt: skip
    assert len(result.records) == len(RECORDS)
    assert all(len(record["neg"]) == 1 for record in result.records)


@pytest.mark.parametrize("kind", KINDS)
def test_ark_hf_eval_scores_every_kind(saved, kind, tmp_path, capsys):
    folder, _ = saved[kind]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    output = tmp_path / "metrics.json"
    assert main(["eval", str(folder), "--data", str(data), "--output", str(output), "--device", "cpu"]) == 0
    metrics = json.loads(output.read_text())
    modes = {key.split("_")[0] for key in metrics}
    assert modes == (set(MODES) if kind == "bge_m3_heads" else {"dense"})
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_kind_spellings_and_refusals(tiny_xlmr_path):
    assert resolve_embedder_kind("bge-m3") == resolve_embedder_kind("bge_m3") == "bge_m3"
    assert resolve_embedder_kind("qwen3") == resolve_embedder_kind("decoder") == "decoder"
    with pytest.raises(ValueError, match="embedder kind must be one of auto, bge_m3, decoder"):
        load_embedder(tiny_xlmr_path, "colbert")
    with pytest.raises(TypeError, match="Linear is not an ark_hf embedder"):
        embedder_kind(torch.nn.Linear(2, 2))
