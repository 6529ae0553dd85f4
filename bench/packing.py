"""Padded vs padding-free (packed) training steps on variable-length text, one GPU.

Each step embeds B queries and B x G passages (1 positive + G-1 negatives) and runs forward, loss, backward
and fused AdamW under bf16 autocast, on random-init replicas with the real tokenizers:

- `m3`: BGE-M3 (XLM-R large, 568M) with `BGEM3Model` + `M3Loss` (unified + self-distillation);
- `qwen3`: Qwen3-0.6B with `DecoderEmbedder` + InfoNCE (temperature 0.05).

Lengths follow the issue's mix: queries 4-40 words, passages log-normal with a median of 60 words (sigma
`--sigma`), about 1.3 tokens per word, cut at `--max-len` tokens. The default sigma 0.3 gives 49.5% padding
at 8 x 8, close to the 51% measured on the trainer's variable-length data; `--sigma 0.8` gives 76% (the
long-tailed case). Token ids are random (the cost does not
depend on them). Every mode sees the same batches from the same initial weights; its `first_loss` (first
batch, initial weights, dropout off) must agree across modes up to bf16 noise. Modes:

- `padded`: the ordinary forward on `[N, L]` padded batches (SDPA);
- `packed`: `padding_free=True`, the backbone on the real tokens only, attention through torch's
  `varlen_attn` (CUDA, bf16);
- `packed_sdpa`: packed, but attention through the exact SDPA fallback (what a GPU without the varlen kernel
  runs).

Reported per mode: real (non-padding) tokens/s, computed tokens/s (padded positions included), the padding
fraction, seconds per step, peak GPU memory, the first-step loss.

    python bench/packing.py --out bench/results/packing_h200.json            # GPU
    python bench/packing.py --device cpu --steps 2 --out /tmp/packing.json   # CPU smoke run, tiny models
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

from ark_hf import assets
from ark_hf.losses.infonce import contrastive_loss
from ark_hf.losses.m3 import M3Loss
from ark_hf.models import packing
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.decoder import DecoderEmbedder

TOKENS_PER_WORD = 1.3


def lengths(n: int, kind: str, max_len: int, sigma: float, generator: torch.Generator) -> list[int]:
    """Token counts (specials included) of n queries (4-40 words) or passages (log-normal, median 60 words)."""
    if kind == "query":
        words = torch.randint(4, 41, (n,), generator=generator).double()
    else:
        words = torch.exp(math.log(60.0) + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    tokens = (words * TOKENS_PER_WORD).round().long() + 2
    return tokens.clamp(4, max_len).tolist()


def make_batch(sizes: list[int], model_kind: str, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-padded XLM-R batch (`<s> ... </s>`, pad 1) or left-padded Qwen3 batch (`... <|endoftext|>`)."""
    width = max(sizes)
    if model_kind == "m3":
        ids = torch.ones(len(sizes), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, size in enumerate(sizes):
            ids[row, :size] = torch.randint(5, vocab, (size,), generator=generator)
            ids[row, 0], ids[row, size - 1] = 0, 2
            mask[row, :size] = 1
    else:
        eos = 151643
        ids = torch.full((len(sizes), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, size in enumerate(sizes):
            ids[row, width - size :] = torch.randint(0, 150000, (size,), generator=generator)
            ids[row, width - 1] = eos
            mask[row, width - size :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def build(model_kind: str, tiny: bool, device: torch.device):
    """A random-init replica (full size on GPU, 2-layer toy on CPU) with the real tokenizer."""
    from transformers import Qwen3Config, Qwen3Model, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    if model_kind == "m3":
        tokenizer = assets.build_xlmr_tokenizer()
        size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        if not tiny:
            size = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
        config = XLMRobertaConfig(
            vocab_size=250002, max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_implementation="sdpa", **size,
        )  # fmt: skip
        with device:
            backbone = XLMRobertaModel(config, add_pooling_layer=False)
        model = BGEM3Model(backbone=backbone, tokenizer=tokenizer, init_missing_heads=True)
    else:
        tokenizer = assets.build_qwen3_tokenizer()
        size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
        size |= {"head_dim": 8, "intermediate_size": 64}
        if not tiny:
            size = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8}
            size |= {"head_dim": 128, "intermediate_size": 3072}
        config = Qwen3Config(
            vocab_size=151669, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
            eos_token_id=151643, pad_token_id=151643, bos_token_id=151643, attn_implementation="sdpa", **size,
        )  # fmt: skip
        with device:
            backbone = Qwen3Model(config)
        model = DecoderEmbedder(backbone, tokenizer=tokenizer)
    return model.to(device).train()


def run_mode(model, mode: str, batches, model_kind: str, group: int, warmup: int, device: torch.device) -> dict:
    model.padding_free = mode != "padded"
    force_sdpa = (
        contextlib.nullcontext()
        if mode != "packed_sdpa"
        else _patched(packing, "_varlen_unusable", lambda q, k, v: "forced by --modes packed_sdpa")
    )
    m3_loss = M3Loss(temperature=0.02, use_self_distill=True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda"
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def loss_of(queries, passages) -> torch.Tensor:
        with autocast:
            out = model(query=queries, passages=passages)
            if model_kind == "m3":
                return m3_loss(out.query, out.passages, group, step=1)[0]
            return contrastive_loss(out.query.dense @ out.passages.dense.T / 0.05, group)

    def step(queries, passages) -> None:
        loss_of(queries, passages).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    result: dict = {"mode": mode}
    try:
        with force_sdpa:
            # the loss of the initial weights on the first batch, dropout off: equal across modes up to bf16 noise
            model.eval()
            with torch.no_grad():
                first_loss = loss_of(*batches[0]).item()
            model.train()
            for queries, passages in batches[: max(warmup, 1)]:
                step(queries, passages)
            timed = batches[max(warmup, 1) :]
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for queries, passages in timed:
                step(queries, passages)
            sync()
            seconds = time.perf_counter() - start
        real = sum(int(q["attention_mask"].sum() + p["attention_mask"].sum()) for q, p in timed)
        computed = sum(q["attention_mask"].numel() + p["attention_mask"].numel() for q, p in timed)
        if mode != "padded":
            computed = real
        result |= {
            "steps_timed": len(timed),
            "step_s": round(seconds / len(timed), 4),
            "real_tokens_per_s": round(real / seconds),
            "computed_tokens_per_s": round(computed / seconds),
            "first_loss": round(first_loss, 5),
        }
        if device.type == "cuda":
            result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.OutOfMemoryError:
        result["error"] = "OOM"
    finally:
        model.padding_free = False
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", default="m3,qwen3", help="comma-separated: m3, qwen3")
    parser.add_argument(
        "--modes", default="padded,packed,packed_sdpa", help="comma-separated: padded, packed, packed_sdpa"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (each on a new batch)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step (B)")
    parser.add_argument("--group-size", type=int, default=8, help="passages per query (G)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--sigma", type=float, default=0.3, help="log-normal sigma of passage word counts")
    parser.add_argument("--out", default=None, help="default: bench/results/packing_h200.json on cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu for a smoke run")
    out = Path(args.out or ("bench/results/packing_h200.json" if device.type == "cuda" else "/tmp/packing_cpu.json"))
    tiny = device.type == "cpu"

    import transformers

    header = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny 2-layer models, fp32)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "varlen_attn_available": packing.varlen_attention_available(device),
        "B": args.batch_size,
        "G": args.group_size,
        "max_len": args.max_len,
        "sigma": args.sigma,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(json.dumps(header), flush=True)
    results = []
    for model_kind in args.models.split(","):
        generator = torch.Generator().manual_seed(1234)
        batches = []
        for _ in range(max(args.warmup, 1) + args.steps):
            q_sizes = lengths(args.batch_size, "query", args.max_len, args.sigma, generator)
            p_sizes = lengths(args.batch_size * args.group_size, "passage", args.max_len, args.sigma, generator)
            batch = [make_batch(sizes, model_kind, 250002, generator) for sizes in (q_sizes, p_sizes)]
            batches.append([{k: v.to(device) for k, v in part.items()} for part in batch])
        real = sum(int(part["attention_mask"].sum()) for pair in batches for part in pair)
        padded = sum(part["attention_mask"].numel() for pair in batches for part in pair)
        model = build(model_kind, tiny, device)
        initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        for mode in args.modes.split(","):
            model.load_state_dict(initial)
            row = {"model": model_kind, "padding_fraction": round(1 - real / padded, 3)}
            row |= run_mode(model, mode, batches, model_kind, args.group_size, args.warmup, device)
            results.append(row)
            print(json.dumps(row), flush=True)
        by_mode = {r["mode"]: r for r in results if r["model"] == model_kind and "error" not in r}
        if "padded" in by_mode and "packed" in by_mode:
            speedup = by_mode["packed"]["real_tokens_per_s"] / by_mode["padded"]["real_tokens_per_s"]
            print(json.dumps({"model": model_kind, "packed_over_padded_real_tokens_per_s": round(speedup, 2)}))
        del model, initial
        gc.collect()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
