"""GradCache on one GPU: the largest contrastive batch that trains, with and without the cache, and what it costs.

Replicas with random weights and the real tokenizers' vocabularies: BGE-M3 (XLM-R large: hidden 1024, 24 layers,
16 heads) and Qwen3-0.6B (hidden 1024, 28 layers, 16 heads, 8 KV heads, intermediate 3072, head_dim 128). bf16
autocast over fp32 master weights, fused AdamW, SDPA attention; queries of 64 tokens, passages of 256, groups of
G = 8 passages per query (so B = passages / 8 queries).

(i) For BGE-M3 unified + self-distillation, BGE-M3 dense-only and Qwen3-0.6B, with and without the cache
(`GradCache`, `--mini-batch` texts per forward): the passages per step are doubled until a step runs out of memory
(`torch.cuda.OutOfMemoryError`), the time budget of that search would be exceeded (the next attempt's time is
predicted from the last one: a step's time is linear in the batch), or `--max-passages`; an attempt counts when two
optimizer steps finish with a finite loss. (ii) At a batch both fit, seconds per step (median of 3 after a warm-up)
uncached, cached, and uncached with activation checkpointing.

    python bench/gradcache.py --out bench/results/gradcache_h200.json          # one H200, about 8 minutes
    python bench/gradcache.py --device cpu --tiny --out /tmp/gradcache_cpu.json  # tiny models: the script runs

The JSON holds the command, the device, every attempt (passages, seconds per step, peak memory, outcome) and the
ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

G, LQ, LP = 8, 64, 256


def build_model(kind: str, tiny: bool, device: str):
    """(model, vocab size, eos id or None, loss) of a replica; `tiny` shrinks the layers, not the vocabulary."""
    from ark_hf.losses.m3 import M3Loss
    from ark_hf.losses.qwen3 import Qwen3InfoNCELoss

    torch.manual_seed(0)
    if kind.startswith("bge"):
        from transformers import XLMRobertaConfig, XLMRobertaModel

        from ark_hf.assets import build_xlmr_tokenizer
        from ark_hf.models.bge_m3 import BGEM3Model

        tokenizer = build_xlmr_tokenizer()
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64) if tiny else dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        )  # fmt: skip
        config = XLMRobertaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, attn_implementation="sdpa", **size,
        )  # fmt: skip
        unified = kind == "bge_unified"
        encoder = XLMRobertaModel(config, add_pooling_layer=False)
        model = BGEM3Model(backbone=encoder, tokenizer=tokenizer, unified_finetuning=unified, init_missing_heads=True)
        loss = M3Loss(temperature=0.02, unified_finetuning=unified, use_self_distill=unified)
        return model.to(device), len(tokenizer), None, loss
    from transformers import Qwen3Config, Qwen3Model

    from ark_hf.assets import build_qwen3_tokenizer
    from ark_hf.models.decoder import DecoderEmbedder

    tokenizer = build_qwen3_tokenizer()
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=64) if tiny else dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072,
    )  # fmt: skip
    config = Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=32768, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **size,
    )  # fmt: skip
    model = DecoderEmbedder(Qwen3Model(config), tokenizer=tokenizer)
    return model.to(device), len(tokenizer), tokenizer.eos_token_id, Qwen3InfoNCELoss(temperature=0.05)


def texts(n: int, length: int, vocab: int, eos: int | None, seed: int, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 150000), (n, length), generator=generator)
    if eos is None:
        ids[:, 0], ids[:, -1] = 0, 2  # XLM-R's <s> ... </s>
    else:
        ids[:, -1] = eos  # the decoder reads the hidden state at the appended EOS
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


class Runner:
    """Optimizer steps of one model on synthetic batches, cached or not."""

    def __init__(self, kind: str, args: argparse.Namespace) -> None:
        self.kind, self.args = kind, args
        self.model, self.vocab, self.eos, self.loss = build_model(kind, args.tiny, args.device)
        self.model.train()

    def set_checkpointing(self, on: bool) -> None:
        if on:
            self.model.activation_checkpointing_enable()
        elif hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()
        elif hasattr(self.model, "gradient_checkpointing_disable"):
            self.model.gradient_checkpointing_disable()
        else:
            for module in self.model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False

    def steps(self, passages: int, cached: bool, n_steps: int) -> list[float]:
        """Seconds of each of `n_steps` optimizer steps; raises OutOfMemoryError, or ValueError on a non-finite loss."""
        from ark_hf.losses.base import RetrievalBatch
        from ark_hf.losses.cached import GradCache

        device, cuda = self.args.device, self.args.device == "cuda"
        queries = max(1, passages // G)
        q = texts(queries, LQ, self.vocab, self.eos, 1, device)
        p = texts(queries * G, LP, self.vocab, self.eos, 2, device)
        batch = RetrievalBatch(G, passage_hashes=torch.arange(queries * G, device=device))
        params = [param for param in self.model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        times = []
        try:
            for _ in range(n_steps):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with autocast:
                    if cached:
                        output = GradCache(min(self.args.mini_batch, queries * G)).step(
                            encode=lambda f: self.model(passages=f).passages,
                            query_features=q,
                            passage_features=p,
                            compute_loss=lambda qe, pe: self.loss(qe, pe, batch, 1),
                            backward=lambda t: t.backward(),
                        )
                        loss = output.loss
                    else:
                        out = self.model(query=q, passages=p)
                        loss = self.loss(out.query, out.passages, batch, 1).loss
                        loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss)  # syncs
                if not math.isfinite(value):
                    raise ValueError(f"non-finite loss {value}")
                times.append(time.perf_counter() - start)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, q, p
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return times


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def search(runner: Runner, cached: bool, start: int, budget_s: float, max_passages: int, max_attempts: int) -> dict:
    """Double the passages per step until OOM, the budget or the cap; the largest that trained two steps."""
    attempts, best, n, spent, last = [], None, start, 0.0, None
    while n <= max_passages and len(attempts) < max_attempts:
        if last is not None:
            predicted = 2 * last * (n / attempts[-1]["passages"]) * 1.2
            if spent + predicted > budget_s:
                attempts.append({"passages": n, "outcome": f"skipped: predicted {predicted:.0f} s over the budget"})
                break
        peak_reset(runner.args.device)
        began = time.perf_counter()
        try:
            times = runner.steps(n, cached, 2)
        except torch.cuda.OutOfMemoryError:
            spent += time.perf_counter() - began
            attempts.append({"passages": n, "outcome": "out of memory"})
            gc.collect()
            torch.cuda.empty_cache()
            break
        spent += time.perf_counter() - began
        last = times[-1]
        attempts.append(
            {"passages": n, "outcome": "trained", "s_per_step": [round(t, 3) for t in times],
             "peak_gib": peak_gib(runner.args.device)}
        )  # fmt: skip
        best = n
        n *= 2
    return {"largest_passages": best, "search_s": round(spent, 1), "attempts": attempts}


def step_times(runner: Runner, passages: int, n_steps: int) -> dict:
    """Median seconds per step (after one warm-up) uncached, cached, and uncached with checkpointing."""
    result = {"passages": passages}
    for name, cached, checkpointing in (
        ("uncached", False, False),
        ("cached", True, False),
        ("checkpointed", False, True),
    ):
        runner.set_checkpointing(checkpointing)
        try:
            times = runner.steps(passages, cached, n_steps + 1)[1:]
            result[f"{name}_s"] = round(statistics.median(times), 4)
        except torch.cuda.OutOfMemoryError:
            result[f"{name}_s"] = None
        finally:
            runner.set_checkpointing(False)
    if result.get("uncached_s") and result.get("cached_s"):
        result["cached_over_uncached"] = round(result["cached_s"] / result["uncached_s"], 3)
    if result.get("checkpointed_s") and result.get("cached_s"):
        result["cached_over_checkpointed"] = round(result["cached_s"] / result["checkpointed_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU check that the script runs)")
    parser.add_argument("--out", default="bench/results/gradcache_h200.json")
    parser.add_argument("--mini-batch", type=int, default=256, help="texts per forward in the cache")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the whole run")
    parser.add_argument("--max-passages", type=int, default=131072)
    parser.add_argument("--models", nargs="+", default=["bge_unified", "bge_dense", "qwen3"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no GPU is visible (use --device cpu --tiny for the CPU check)")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    began = time.perf_counter()
    start, max_attempts, timing_steps = (8, 2, 1) if args.tiny else (64, 12, 3)
    # budget: per model, 15% uncached search, 55% cached search, 30% timing (model build is outside the split)
    per_model = args.budget_s / len(args.models)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {"group_size": G, "query_tokens": LQ, "passage_tokens": LP, "mini_batch": args.mini_batch,
                     "tiny": args.tiny, "budget_s": args.budget_s},
        "models": {},
    }  # fmt: skip
    for kind in args.models:
        model_began = time.perf_counter()
        runner = Runner(kind, args)
        entry = {"parameters": sum(p.numel() for p in runner.model.parameters())}
        entry["uncached"] = search(runner, False, start, 0.15 * per_model, args.max_passages, max_attempts)
        entry["cached"] = search(runner, True, start, 0.55 * per_model, args.max_passages, max_attempts)
        both = entry["uncached"]["largest_passages"]
        if both:
            entry["step_time"] = step_times(runner, max(start, both // 2), timing_steps)
        entry["wall_s"] = round(time.perf_counter() - model_began, 1)
        report["models"][kind] = entry
        del runner
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({kind: entry}), flush=True)
    report["wall_s"] = round(time.perf_counter() - began, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
