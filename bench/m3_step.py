"""One BGE-M3 training step, ark_hf vs FlagEmbedding's own model code, side by side on one GPU.

Both run on the same random-init replica of BGE-M3 (XLM-R large, 568M parameters) with the real XLM-R
tokenizer, the same batch (B queries x G passages: 1 positive + G-1 negatives; fixed lengths, no padding),
bf16 autocast over fp32 master weights and fused AdamW, as `shared/bench/peer_anchor_m3.py` measures the
peers. Reported: seconds per step, tokens/s (query + passage tokens), peak GPU memory, and the loss (the two
implementations must agree on it: same weights, same batch, same objective).

    python bench/m3_step.py --out bench/results/m3_step_h100.jsonl

FlagEmbedding's unified path scatters token weights into a [B, L, vocab] tensor (250,002 ids) during
training; ark_hf maps the batch's ids to a compact vocabulary and never builds it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

B, G, LQ, LP = 8, 8, 64, 256
WARMUP, STEPS = 2, 6


def replica(path: str) -> str:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from ark_hf.assets import build_xlmr_tokenizer

    if not os.path.exists(os.path.join(path, "config.json")):
        tokenizer = build_xlmr_tokenizer()
        config = XLMRobertaConfig(
            vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def batch(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 150000, (n, length), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda()}


def measure(name: str, parameters, step) -> dict:
    optimizer = torch.optim.AdamW([p for p in parameters if p.requires_grad], lr=1e-5, fused=True)

    def one() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    try:
        first = one()  # the loss of identical weights on the first batch: the two implementations must agree
        for _ in range(WARMUP - 1):
            one()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(STEPS):
            one()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / STEPS
        tokens = B * LQ + B * G * LP
        result = {
            "config": name, "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds),
            "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2), "first_loss": round(first, 5),
        }  # fmt: skip
    except torch.OutOfMemoryError:
        result = {"config": name, "error": "OOM"}
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def build_backbone(path: str, checkpointing: bool):
    from transformers import AutoModel

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(path, attn_implementation="sdpa", add_pooling_layer=False).cuda()
    if checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    heads = (torch.nn.Linear(1024, 1024).cuda(), torch.nn.Linear(1024, 1).cuda())
    return encoder, heads


def flagembedding(path: str, unified: bool, checkpointing: bool) -> dict:
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
    from transformers import AutoTokenizer

    encoder, (colbert, sparse) = build_backbone(path, checkpointing)
    model = EncoderOnlyEmbedderM3Model(
        {"model": encoder, "colbert_linear": colbert, "sparse_linear": sparse},
        tokenizer=AutoTokenizer.from_pretrained(path), temperature=0.02, normalize_embeddings=True,
        unified_finetuning=unified, use_self_distill=unified, self_distill_start_step=-1,
    )  # fmt: skip
    model.train()
    q, p = batch(B, LQ, 1), batch(B * G, LP, 2)
    name = f"flagembedding {'unified+self-distill' if unified else 'dense'}{' +ckpt' if checkpointing else ''}"
    result = measure(name, list(model.parameters()), lambda: model(queries=q, passages=p).loss)
    return result


def ark(path: str, unified: bool, checkpointing: bool) -> dict:
    from transformers import AutoTokenizer

    from ark_hf.losses.m3 import M3Loss
    from ark_hf.models.bge_m3 import BGEM3Model

    encoder, (colbert, sparse) = build_backbone(path, False)
    model = BGEM3Model(backbone=encoder, tokenizer=AutoTokenizer.from_pretrained(path), unified_finetuning=unified,
                       init_missing_heads=True).cuda()  # fmt: skip
    model.colbert_linear.load_state_dict(colbert.state_dict())
    model.sparse_linear.load_state_dict(sparse.state_dict())
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    loss_fn = M3Loss(temperature=0.02, unified_finetuning=unified, use_self_distill=unified)
    q, p = batch(B, LQ, 1), batch(B * G, LP, 2)

    def step():
        out = model(query=q, passages=p)
        return loss_fn(out.query, out.passages, G, step=1)[0]

    name = f"ark_hf {'unified+self-distill' if unified else 'dense'}{' +ckpt' if checkpointing else ''}"
    result = measure(name, list(model.parameters()), step)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    path = replica(os.path.join(tempfile.gettempdir(), "bge_m3_replica"))
    import transformers

    rows = [{"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
             "B": B, "G": G, "LQ": LQ, "LP": LP, "steps": STEPS, "command": "python bench/m3_step.py --out ..."}]  # fmt: skip
    print(json.dumps(rows[0]), flush=True)
    for unified in (False, True):
        for checkpointing in (False, True):
            for run in (flagembedding, ark):
                try:
                    result = run(path, unified, checkpointing)
                except Exception as error:  # noqa: BLE001 - a failing configuration is a result too
                    result = {
                        "config": f"{run.__name__} unified={unified} ckpt={checkpointing}",
                        "error": repr(error)[:300],
                    }
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(result)
                print(json.dumps(result), flush=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
