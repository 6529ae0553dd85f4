"""GPU-only paths (bf16 autocast, SDPA attention, checkpointing on CUDA). Skipped without CUDA; run on a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def write(tmp_path, n=16):
    path = tmp_path / "train.jsonl"
    rows = [{"query": f"question {i} on permits", "pos": [f"answer {i} about permits and roofs"],
             "neg": [f"other text {i} {k}" for k in range(3)], "pos_scores": [5.0], "neg_scores": [1.0, 0.5, 0.0]}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_unified_self_distill_kd_on_cuda(tiny_xlmr_path, tmp_path, checkpointing):
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), bf16=True, report_to="none", max_steps=3, per_device_train_batch_size=4,
        train_group_size=4, query_max_len=16, passage_max_len=32, use_self_distill=True, knowledge_distillation=True,
        kd_loss_type="m3_kd_loss", init_missing_heads=True, activation_checkpointing=checkpointing,
        save_strategy="no", logging_steps=1, learning_rate=1e-3,
    )  # fmt: skip
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = BGETrainer(model=model, config=config, train_dataset=write(tmp_path))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k].detach().cpu())]
    assert any(k.startswith("colbert_linear") for k in changed) and any(k.startswith("model.") for k in changed)
    assert next(trainer.model.parameters()).is_cuda


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_qwen_decoder_on_cuda(tiny_qwen3_path, tmp_path, lora):
    from ark_hf import create_qwen_trainer

    trainer = create_qwen_trainer(
        dataset_paths=[write(tmp_path)], output_dir=str(tmp_path / "qwen"), learning_rate=1e-3, num_train_epochs=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, model_name_or_path=tiny_qwen3_path,
        bf16=True, max_steps=3, train_group_size=2, query_max_len=16, passage_max_len=32, lora=lora,
        report_to="none", save_strategy="no", logging_steps=1, attn_implementation="sdpa",
    )  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert next(trainer.model.parameters()).is_cuda
    trainer.save_model()
    from sentence_transformers import SentenceTransformer

    saved = SentenceTransformer(str(tmp_path / "qwen"), device="cuda")
    model = trainer.accelerator.unwrap_model(trainer.model)
    texts = ["how long does a building permit take?"]
    ours = model.encode(texts, prompt=None, convert_to_tensor=True).float().cpu()
    theirs = saved.encode(texts, convert_to_tensor=True).float().cpu()
    assert torch.allclose(ours, theirs, atol=1e-3)  # fp32 weights on both sides after bf16-autocast training
