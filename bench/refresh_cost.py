"""What one hard-negative refresh costs: `HardNegativeRefresh` re-encoding a corpus of `--passages` passages
with the model being trained, re-mining every training record's negatives, inside a real `BGETrainer` run.

The model is a BGE-M3-shaped replica (XLM-R large: 24 layers, hidden 1024, the real 250,002-id tokenizer, random
weights: a refresh's cost does not depend on what the weights have learned); the records are the FAQ-text mix of
`bench/throughput.py` (`--records`); the corpus is the records' own passages plus FAQ-text passages at the same
length mix up to `--passages` in all (real text, each one distinct). Training runs `--steps` optimizer steps with
`refresh_negatives: steps` every `--every` steps (bf16 on a GPU; a refresh runs after a step that is not the last), and this script reports each refresh's
`hard_negatives/seconds` (re-encoding, mining, handing the negatives to the sampler), the training steps' time
around them, and the refresh cost as a share of the run.

    python bench/refresh_cost.py --out bench/results/refresh_cost_h100            # GPU: 100,000 passages
    python bench/refresh_cost.py --device cpu --tiny --out /tmp/refresh_cost       # a check, not a measurement
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(records_path: Path, corpus_path: Path, passages: int, seed: int = 1) -> int:
    """The records' passages first, then distinct FAQ-text passages (log-normal lengths, median 60 words)."""
    from ark_hf import assets

    texts: dict[str, None] = {}
    for line in records_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for text in record["pos"] + record["neg"]:
            texts.setdefault(text, None)
    stream = " ".join(f"{row['q']} {row['a']}" for row in assets.load_faq("en")).split()
    rng = random.Random(seed)
    while len(texts) < passages:
        k = max(3, min(600, int(rng.lognormvariate(math.log(60), 0.8))))
        start = rng.randrange(0, len(stream) - k)
        texts.setdefault(" ".join(stream[start : start + k]), None)
    with open(corpus_path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 300 passages, 3 steps (a dry run)")
    parser.add_argument("--passages", type=int, default=None, help="corpus size (default 100,000; tiny 300)")
    parser.add_argument("--records", type=int, default=None, help="training records (default 704; tiny 24)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 3; tiny 3)")
    parser.add_argument(
        "--every", type=int, default=None, help="refresh every this many steps (default 2: one refresh; tiny 1)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="texts per forward pass when re-encoding")
    parser.add_argument("--out", required=True, help="writes <out>.json and <out>.md")
    parser.add_argument("--work", default=None)
    ns = parser.parse_args()
    tiny = ns.tiny
    passages = ns.passages or (300 if tiny else 100_000)
    records = ns.records or (24 if tiny else 704)
    steps, every = ns.steps or 3, ns.every or (1 if tiny else 2)

    import torch
    from transformers import TrainerCallback

    from bench.throughput import PLEN, QLEN, G, make_data, make_replicas

    work = Path(ns.work or tempfile.mkdtemp(prefix="refresh_cost_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_data(work / "train.jsonl", records)
    corpus_size = make_corpus(work / "train.jsonl", work / "corpus.jsonl", passages)
    model_path = make_replicas(work / "models", tiny, archs=("bge",))["bge"]
    prep_s = time.perf_counter() - started

    from ark_hf.trainer.bge_config import BGETrainerConfig
    from ark_hf.trainer.bge_trainer import BGETrainer

    cuda = ns.device == "cuda"
    config = BGETrainerConfig(
        output_dir=str(work / "out"), max_steps=steps, per_device_train_batch_size=2 if tiny else 8, learning_rate=1e-5,
        warmup_steps=0, bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=42, model_name_or_path=model_path, train_data=[str(work / "train.jsonl")],
        train_group_size=G, query_max_len=QLEN, passage_max_len=64 if tiny else PLEN, unified_finetuning=True, use_self_distill=True,
        refresh_negatives="steps", refresh_negatives_steps=every, refresh_negatives_corpus=[str(work / "corpus.jsonl")],
        refresh_negatives_batch_size=ns.batch_size,
        # no margin filter: on random weights every score is close to the positive's and the 5% margin would drop
        # every candidate; the refresh costs the same, and the sampler gets negatives
        refresh_negatives_relative_margin=None,
    )  # fmt: skip
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    trainer = BGETrainer(config=config)
    # first: the step's time is measured before the refresh callback (a later one) runs at the same step end
    trainer.callback_handler.callbacks.insert(0, StepTimer())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    refreshes = [row for row in trainer.state.log_history if "hard_negatives/seconds" in row]
    refresh_s = [row["hard_negatives/seconds"] for row in refreshes]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    report = {
        "command": "python " + " ".join(sys.argv),
        "device": device_name,
        "model": "BGE-M3-shaped replica (XLM-R large, random weights)" if not tiny else "tiny XLM-R",
        "corpus_passages": corpus_size,
        "training_records": records,
        "steps": steps,
        "refresh_every": every,
        "encode_batch_size": ns.batch_size,
        "refreshes": len(refreshes),
        "refresh_seconds": refresh_s,
        "refresh_metrics": refreshes,
        "passages_per_s": [round(corpus_size / s, 1) for s in refresh_s if s],
        "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else None,
        "train_s": round(train_s, 2),
        "refresh_share_of_train": round(sum(refresh_s) / train_s, 4) if train_s else None,
        "prep_s": round(prep_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Hard-negative refresh cost: {device_name}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{report['model']}; {corpus_size:,} corpus passages (up to {PLEN} tokens), {records} training records, "
        f"{steps} steps, a refresh every {every} steps (the first at step {every}); re-encoding batch "
        f"{ns.batch_size}.",
        "",
        "| refresh | seconds | passages/s | changed share | full-group share | margin |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(refreshes):
        rate = corpus_size / row["hard_negatives/seconds"] if row["hard_negatives/seconds"] else 0
        lines.append(
            f"| {i + 1} (step {row.get('step')}) | {row['hard_negatives/seconds']:.1f} | {rate:,.0f} | "
            f"{row['hard_negatives/changed_share']:.3f} | {row['hard_negatives/full_group_share']:.3f} | "
            f"{row['hard_negatives/margin']:.4f} |"
        )
    lines += ["", f"Training {train_s:.1f} s in all (median step {report['median_step_s'] or 0:.3f} s); the "
              f"refreshes {report['refresh_share_of_train'] or 0:.1%} of it."]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "refresh_metrics"}))


if __name__ == "__main__":
    main()
