"""Checkpoint merging: slerp/linear against float64 formulas written here, and the on-disk merge.

The reference slerp below is computed independently in numpy float64 from the textbook formula
`sin((1 - t) θ) / sin θ · a + sin(t θ) / sin θ · b`, with θ the angle between the flattened tensors.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ark_hf.merging import load_checkpoint_weights, merge_checkpoints, merge_state_dicts, slerp


def reference_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    va, vb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    theta = np.arccos(np.clip(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)), -1.0, 1.0))
    out = np.sin((1 - t) * theta) / np.sin(theta) * va + np.sin(t * theta) / np.sin(theta) * vb
    return out.reshape(a.shape)


def as_np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


# ------------------------------------------------------------------------------------------------ slerp
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_slerp_matches_float64_formula(t):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 7, generator=generator), torch.randn(6, 7, generator=generator)
    merged = slerp(a, b, t)
    assert merged.dtype == torch.float32 and merged.shape == a.shape
    np.testing.assert_allclose(as_np(merged), reference_slerp(a.numpy(), b.numpy(), t), atol=1e-6)


def test_slerp_keeps_norm_where_linear_shrinks():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(256, generator=generator)
    b = torch.randn(256, generator=generator)
    b = b / b.norm() * a.norm()
    assert slerp(a, b, 0.5).norm() == pytest.approx(a.norm().item(), rel=1e-5)
    assert ((a + b) / 2).norm() < 0.9 * a.norm()


def test_slerp_keeps_low_precision_dtype():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(32, 16, generator=generator).to(torch.bfloat16)
    b = torch.randn(32, 16, generator=generator).to(torch.bfloat16)
    merged = slerp(a, b, 0.3)
    assert merged.dtype == torch.bfloat16
    np.testing.assert_allclose(as_np(merged), reference_slerp(as_np(a), as_np(b), 0.3), atol=2e-2)


def test_slerp_falls_back_to_linear_for_parallel_or_zero_vectors():
    a = torch.tensor([1.0, -2.0, 3.0])
    for b in (3 * a, -a, torch.zeros(3)):
        for t in (0.25, 0.6):
            torch.testing.assert_close(slerp(a, b, t), (1 - t) * a + t * b)
    assert torch.isfinite(slerp(a, a.clone(), 0.5)).all()
    with pytest.raises(ValueError, match="shape"):
        slerp(a, torch.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        slerp(a, a, 1.5)


# ------------------------------------------------------------------------------------------------ state dicts
def _state_dicts(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(4, 5, generator=generator),
            "b": torch.randn(5, generator=generator),
            "position_ids": torch.arange(5) + index,  # an integer buffer, different per dict
        }
        for index in range(count)
    ]


def test_linear_merge_is_weighted_mean_and_copies_integer_buffers():
    dicts = _state_dicts(3)
    weights = [1.0, 2.0, 3.0]
    merged = merge_state_dicts(dicts, method="linear", weights=weights)
    for key in ("w", "b"):
        expected = sum(w * as_np(d[key]) for w, d in zip(weights, dicts)) / sum(weights)
        np.testing.assert_allclose(as_np(merged[key]), expected, atol=1e-6)
    assert torch.equal(merged["position_ids"], dicts[0]["position_ids"])
    two = merge_state_dicts(dicts[:2], method="linear", t=0.25)
    np.testing.assert_allclose(as_np(two["w"]), 0.75 * as_np(dicts[0]["w"]) + 0.25 * as_np(dicts[1]["w"]), atol=1e-6)


def test_slerp_of_two_uses_t_or_weights():
    a, b = _state_dicts(2)
    merged = merge_state_dicts([a, b], method="slerp", t=0.3)
    np.testing.assert_allclose(as_np(merged["w"]), reference_slerp(a["w"].numpy(), b["w"].numpy(), 0.3), atol=1e-6)
    weighted = merge_state_dicts([a, b], method="slerp", weights=[1.0, 3.0])
    np.testing.assert_allclose(as_np(weighted["b"]), reference_slerp(a["b"].numpy(), b["b"].numpy(), 0.75), atol=1e-6)
    default = merge_state_dicts([a, b])
    np.testing.assert_allclose(as_np(default["w"]), reference_slerp(a["w"].numpy(), b["w"].numpy(), 0.5), atol=1e-6)
    with pytest.raises(ValueError, match="either"):
        merge_state_dicts([a, b], weights=[1.0, 1.0], t=0.5)


def test_slerp_of_three_folds_left_with_cumulative_weights():
    dicts = _state_dicts(3, seed=3)
    weights = [1.0, 1.0, 2.0]
    merged = merge_state_dicts(dicts, method="slerp", weights=weights)
    x = [d["w"].numpy() for d in dicts]
    expected = reference_slerp(reference_slerp(x[0], x[1], 1 / 2), x[2], 2 / 4)
    np.testing.assert_allclose(as_np(merged["w"]), expected, atol=1e-5)


def test_merge_state_dicts_rejects_mismatches():
    a, b = _state_dicts(2)
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts([a, {k: v for k, v in b.items() if k != "b"}])
    with pytest.raises(ValueError, match="shape"):
        merge_state_dicts([a, {**b, "w": torch.zeros(5, 4)}])
    with pytest.raises(ValueError, match="positive"):
        merge_state_dicts(_state_dicts(3), method="slerp", weights=[1.0, 0.0, 1.0])


# ------------------------------------------------------------------------------------------------ checkpoints
def _perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


@pytest.fixture()
def two_checkpoints(tiny_qwen3_path, tmp_path):
    """checkpoint-a: the tiny model folder (safetensors) plus trainer state; checkpoint-b: perturbed weights as .bin."""
    root = tmp_path / "ckpts"
    first = root / "checkpoint-a"
    shutil.copytree(tiny_qwen3_path, first)
    (first / "1_Pooling").mkdir()
    (first / "1_Pooling" / "config.json").write_text('{"pooling_mode_lasttoken": true}')
    torch.save({"state": {}}, first / "optimizer.pt")
    (first / "trainer_state.json").write_text("{}")
    (first / "lora_adapter").mkdir()  # DecoderEmbedder's adapter next to merged weights: stale after a merge
    (first / "lora_adapter" / "adapter_config.json").write_text("{}")
    second = root / "checkpoint-b"
    second.mkdir()
    shutil.copy(first / "config.json", second / "config.json")
    torch.save(_perturbed(load_file(first / "model.safetensors"), seed=7), second / "pytorch_model.bin")
    return first, second


def test_merge_checkpoints_slerp_matches_reference(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    output = tmp_path / "merged"
    returned = merge_checkpoints([first, second], output, method="slerp", t=0.3)
    assert returned == str(output)
    files = set(os.listdir(output))
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "1_Pooling"} <= files
    assert not files & {"optimizer.pt", "trainer_state.json", "pytorch_model.bin", "lora_adapter"}
    state_a = load_file(first / "model.safetensors")
    state_b = torch.load(second / "pytorch_model.bin", weights_only=True)
    merged = load_file(output / "model.safetensors")
    assert merged.keys() == state_a.keys()
    for key, tensor in merged.items():
        assert tensor.dtype == state_a[key].dtype
        expected = reference_slerp(state_a[key].numpy(), state_b[key].numpy(), 0.3)
        np.testing.assert_allclose(as_np(tensor), expected, atol=1e-5, err_msg=key)
    # atomic write: only the checkpoints and the result are left, no staging folder
    assert sorted(os.listdir(tmp_path)) == ["ckpts", "merged"]
    # the folder is a loadable model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(output)
    torch.testing.assert_close(model.embed_tokens.weight.detach(), merged["embed_tokens.weight"])


def test_merge_checkpoints_keeps_shard_layout(tiny_qwen3_path, tmp_path):
    from transformers import AutoModel

    first = tmp_path / "sharded"
    AutoModel.from_pretrained(tiny_qwen3_path).save_pretrained(first, max_shard_size="1MB")
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    state_a = load_checkpoint_weights(first)
    second = tmp_path / "single"
    second.mkdir()
    save_file(_perturbed(state_a, seed=3), str(second / "model.safetensors"), metadata={"format": "pt"})
    output = merge_checkpoints([first, second], tmp_path / "merged", method="linear", weights=[3.0, 1.0])
    merged_index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert merged_index["weight_map"] == index["weight_map"]
    merged = load_checkpoint_weights(output)
    state_b = load_file(second / "model.safetensors")
    for key in state_a:
        np.testing.assert_allclose(
            as_np(merged[key]), 0.75 * as_np(state_a[key]) + 0.25 * as_np(state_b[key]), atol=1e-6, err_msg=key
        )


def _write_adapter(folder, seed: int, lora_alpha: int = 16) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32, generator=generator),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4, generator=generator),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": lora_alpha, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def test_merge_adapter_folders(tmp_path):
    first = _write_adapter(tmp_path / "a", seed=0)
    second = _write_adapter(tmp_path / "b", seed=1)
    output = merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", method="slerp", t=0.5)
    assert sorted(os.listdir(output)) == ["adapter_config.json", "adapter_model.safetensors", "merge_info.json"]
    merged = load_file(os.path.join(output, "adapter_model.safetensors"))
    for key in first:
        expected = reference_slerp(first[key].numpy(), second[key].numpy(), 0.5)
        np.testing.assert_allclose(as_np(merged[key]), expected, atol=1e-6)
    _write_adapter(tmp_path / "c", seed=2, lora_alpha=32)
    with pytest.raises(ValueError, match="adapter configs differ"):
        merge_checkpoints([tmp_path / "a", tmp_path / "c"], tmp_path / "other")


def test_failed_merge_leaves_nothing_behind(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    state_b = torch.load(second / "pytorch_model.bin", weights_only=True)
    state_b["norm.weight"] = torch.ones(7)  # wrong shape: fails while shards are being written
    torch.save(state_b, second / "pytorch_model.bin")
    with pytest.raises(ValueError, match="norm.weight"):
        merge_checkpoints([first, second], tmp_path / "merged")
    assert sorted(os.listdir(tmp_path)) == ["ckpts"]


def test_existing_output_needs_overwrite(two_checkpoints, tmp_path):
    first, second = two_checkpoints
    output = tmp_path / "merged"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        merge_checkpoints([first, second], output)
    merge_checkpoints([first, second], output, method="linear", overwrite=True)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["ckpts", "merged"]
