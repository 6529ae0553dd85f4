"""Where the padded QwenTrainer row of bench/throughput.py turns non-finite on the GPU (bf16, 28-layer replica)."""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import TrainerCallback  # noqa: E402

from ark_hf.trainer.qwen_config import QwenTrainerConfig  # noqa: E402
from ark_hf.trainer.qwen_trainer import QwenTrainer  # noqa: E402
from bench.throughput import PLEN, QLEN, G, make_data, make_replicas  # noqa: E402

work = Path(tempfile.mkdtemp())
TINY = not torch.cuda.is_available()
if TINY:
    models = make_replicas(work, tiny=True)
else:  # the Qwen3 replica of bench/throughput.py only
    from transformers import Qwen3Config, Qwen3Model

    from ark_hf import assets

    torch.manual_seed(0)
    qtok = assets.build_qwen3_tokenizer()
    qcfg = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       eos_token_id=qtok.eos_token_id, pad_token_id=qtok.pad_token_id)  # fmt: skip
    models = {"qwen": str(work / "qwen3_replica")}
    Qwen3Model(qcfg).save_pretrained(models["qwen"])
    qtok.save_pretrained(models["qwen"])
make_data(work / "train.jsonl", 512)
out = {}
for name, attn, side in [
    ("sdpa-left", "sdpa", "left"),
    ("eager-left", "eager", "left"),
    ("sdpa-right", "sdpa", "right"),
]:
    log = []
    config = QwenTrainerConfig(
        output_dir=str(work / name), max_steps=2 if TINY else 6, use_cpu=TINY, per_device_train_batch_size=8, learning_rate=1e-5, warmup_steps=0,
        bf16=not TINY, optim="adamw_torch" if TINY else "adamw_torch_fused", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=42, model_name_or_path=models["qwen"], train_data=[str(work / "train.jsonl")],
        train_group_size=G, query_max_len=QLEN, passage_max_len=PLEN, torch_dtype="float32",
        attn_implementation=attn, temperature=0.02, use_qq=False, use_dd=False, mask_false_negatives=False,
        query_instruction=None,
    )  # fmt: skip
    trainer = QwenTrainer(config=config)
    trainer.model.tokenizer.padding_side = side
    backbone = trainer.model.backbone if hasattr(trainer.model, "backbone") else trainer.model.model

    def hook(module, args, kwargs, output, log=log):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        mask = kwargs.get("attention_mask")
        if mask is not None and torch.is_grad_enabled():
            bad = ~torch.isfinite(hidden).all(-1)
            log.append({"nan_at_pad": int((bad & (mask == 0)).sum()), "nan_at_real": int((bad & (mask == 1)).sum()),
                        "max_abs": float(hidden.float().abs().max())})  # fmt: skip

    backbone.register_forward_hook(hook, with_kwargs=True)

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, log=log, **kw):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad = sum(int(~torch.isfinite(g).all()) for g in grads)
            log.append({"step": state.global_step + 1, "params_with_nonfinite_grad": bad, "of": len(grads)})

    trainer.add_callback(Grads())
    try:
        trainer.train()
        result = "ok"
    except Exception as error:  # noqa: BLE001
        result = f"{type(error).__name__}: {str(error)[:200]}"
    out[name] = {"result": result, "losses": [h.get("loss") for h in trainer.state.log_history if "loss" in h],
                 "grad_norms": [h.get("grad_norm") for h in trainer.state.log_history if "grad_norm" in h],
                 "trace": log[:40]}  # fmt: skip
    print(name, json.dumps(out[name])[:3000], flush=True)
    del trainer
    torch.cuda.empty_cache()
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
