"""What does `AlignmentCallback` cost? Training steps/s of the CPU demo with and without it, same run length.

    python bench/alignment_overhead.py --output bench/results/alignment_overhead_cpu.json

The training is the README demo's (`recipes/demo.py`): BGE-M3 unified fine-tuning with self-distillation of
the real all-MiniLM-L6-v2 with fresh sparse and ColBERT heads, on the Zaragoza construction FAQ's 400 training
pairs, every setting of `demo.make_config` except the ones named by the flags: the steps, and the batch size
(4 instead of 32, so that six runs of 200 steps fit in about ten minutes on two CPU cores). The callback runs
every `--every_n_steps` optimizer steps with its gradient diagnostics, on a probe set of `--probe_questions`
of the demo's held-out questions (default: as many as the batch has queries, the ratio of the demo's batch of
32 to the callback's default gradient probe of 32 questions), each with its FAQ answer and `--probe_negatives`
random other answers. The callback's cost grows with the probe (its texts are encoded once, and once more with
gradients, per firing) and the step's with the batch, so the overhead follows the probe-to-batch ratio.

The probe's S_f and S_b come from `score_records` with an untrained 2-layer Qwen3-architecture LM (MiniLM
vocabulary) and its S_v from the real MiniLM: the callback's cost depends on the probe's size, not on the
values of its scores (`bench/alignment_validation.py` measures what the scores mean, with a trained LM).

Runs alternate (without, with, without, with, ...) so that a change of machine load hits both alike. Each run
builds the same fresh model with the same seed. steps/s = max_steps / wall time of `trainer.train()` (which
includes the callback's step-0 anchor encoding); overhead = 1 - median(with) / median(without). Two other
estimates, less exposed to other jobs on a shared machine: the same ratio of the process's CPU time, and the
time spent inside the callback's hooks over the run's time. The hooks' time is also given per firing, so the
overhead at another N can be read off: about seconds_per_firing / (N x seconds_per_step); and for the scores
alone (`gradient_diagnostics=False`: `on_step_end` and the anchor, without the gradient hooks).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ark_hf import AlignmentCallback, BGEM3Model, BGETrainer
from ark_hf.alignment import AlignmentScoringConfig, CausalLMScorer, score_records
from ark_hf.alignment.records import AlignmentRecord
from ark_hf.assets import minilm_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alignment_validation import small_lm  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ("on_train_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")


def load_demo():
    path = ROOT / "recipes" / "demo.py"
    spec = importlib.util.spec_from_file_location("ark_hf_demo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ark_hf_demo"] = module
    spec.loader.exec_module(module)
    return module


class TimedAlignmentCallback(AlignmentCallback):
    """`AlignmentCallback` with a perf_counter around each of its hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = dict.fromkeys(HOOKS, 0.0)
        self.firings = 0

    def _timed(self, name, *args, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(super(), name)(*args, **kwargs)
        finally:
            self.seconds[name] += time.perf_counter() - started

    def on_train_begin(self, *args, **kwargs):
        return self._timed("on_train_begin", *args, **kwargs)

    def on_pre_optimizer_step(self, *args, **kwargs):
        return self._timed("on_pre_optimizer_step", *args, **kwargs)

    def on_optimizer_step(self, *args, **kwargs):
        return self._timed("on_optimizer_step", *args, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self.firings += self._due(state.global_step)
        return self._timed("on_step_end", args, state, control, **kwargs)


def build_probe(queries: dict, corpus: dict, n_questions: int, n_negatives: int, seed: int) -> list[dict]:
    """Held-out FAQ questions with their answer and random other answers, scored by `score_records`."""
    rng = random.Random(seed)
    ids = sorted(queries)[:n_questions]
    answer_ids = sorted(corpus)
    records = []
    for index, qid in enumerate(ids):
        negatives = [corpus[a] for a in rng.sample([a for a in answer_ids if a != qid], n_negatives)]
        first_sentence = corpus[qid].split(". ")[0]
        raw = {"query": queries[qid], "answers": [first_sentence], "pos": [corpus[qid]], "neg": negatives}
        fields = ["pos"] + ["neg"] * n_negatives
        records.append(AlignmentRecord(index, index + 1, raw, raw["query"], first_sentence, [corpus[qid], *negatives], fields))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(seed)
    lm = CausalLMScorer(small_lm(tokenizer, 1024).eval(), tokenizer, max_length=512, token_budget=8192)
    retriever = BGEM3Model(str(minilm_path()), pooling="mean", unified_finetuning=False).eval()
    config = AlignmentScoringConfig(query_max_len=48, passage_max_len=160)
    return score_records(records, lm, retriever, config)


def one_run(demo, train, probe, args, with_callback: bool) -> dict:
    config = demo.make_config(str(Path(args.workdir) / "run"), True, 1.0, args.seed)
    config.max_steps = args.steps
    config.per_device_train_batch_size = args.batch_size
    config.query_max_len, config.passage_max_len = args.query_max_len, args.passage_max_len
    config.logging_steps = args.every_n_steps
    torch.manual_seed(args.seed)  # the same fresh heads in every run
    model = BGEM3Model(
        model_name=config.model_name_or_path, unified_finetuning=True, init_missing_heads=True, pooling="mean"
    )
    trainer = BGETrainer(model=model, config=config, train_dataset=train)
    callback = None
    if with_callback:
        callback = TimedAlignmentCallback(probe, every_n_steps=args.every_n_steps).bind(trainer)
        trainer.add_callback(callback)
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    run = {
        "callback": with_callback,
        "seconds": round(seconds, 2),
        "steps_per_second": round(args.steps / seconds, 4),
        "process_cpu_seconds": round(cpu_seconds, 2),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if callback is not None:
        align = [h for h in trainer.state.log_history if "align/forward" in h]
        run["callback_seconds"] = {k: round(v, 2) for k, v in callback.seconds.items()}
        run["callback_firings"] = callback.firings
        run["logged_steps"] = [h["step"] for h in align]
        run["last_logged"] = {k: round(v, 4) for k, v in align[-1].items() if k.startswith("align/")}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="bench/results/alignment_overhead_cpu.json")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every_n_steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each kind, alternating.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--query_max_len", type=int, default=48)
    parser.add_argument("--passage_max_len", type=int, default=160)
    parser.add_argument("--probe_questions", type=int, default=None, help="Default: --batch_size.")
    parser.add_argument("--probe_negatives", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default="outputs/alignment_overhead")
    args = parser.parse_args()
    args.probe_questions = args.probe_questions or args.batch_size
    torch.set_num_threads(args.threads)
    started = time.time()
    demo = load_demo()
    train, queries, corpus, _ = demo.faq_split()
    probe = build_probe(queries, corpus, args.probe_questions, args.probe_negatives, args.seed)
    probe_seconds = time.time() - started

    runs = []
    for repeat in range(args.repeats):
        for with_callback in (False, True):
            runs.append(one_run(demo, train, probe, args, with_callback))
            print(json.dumps({"repeat": repeat, **runs[-1]}), flush=True)
    without = [r["steps_per_second"] for r in runs if not r["callback"]]
    with_ = [r["steps_per_second"] for r in runs if r["callback"]]
    median_without, median_with = statistics.median(without), statistics.median(with_)
    with_runs = [r for r in runs if r["callback"]]
    firings = statistics.median(r["callback_firings"] for r in with_runs)
    inside = statistics.median(sum(r["callback_seconds"].values()) for r in with_runs)
    begin = statistics.median(r["callback_seconds"]["on_train_begin"] for r in with_runs)
    per_firing = (inside - begin) / firings if firings else float("nan")
    step_seconds = 1.0 / median_without
    cpu_without = statistics.median(r["process_cpu_seconds"] for r in runs if not r["callback"])
    cpu_with = statistics.median(r["process_cpu_seconds"] for r in with_runs)
    scores_only = statistics.median(
        r["callback_seconds"]["on_step_end"] + r["callback_seconds"]["on_train_begin"] for r in with_runs
    )
    command = "python bench/alignment_overhead.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "training": (
            f"recipes/demo.py's BGE-M3 unified + self-distillation fine-tuning of all-MiniLM-L6-v2 (fresh heads) on "
            f"{len(train)} FAQ pairs; batch {args.batch_size}, query/passage max length "
            f"{args.query_max_len}/{args.passage_max_len}, {args.steps} steps, logging every {args.every_n_steps}"
        ),
        "callback": (
            f"AlignmentCallback(every_n_steps={args.every_n_steps}) with gradient diagnostics; probe of "
            f"{len(probe)} held-out questions x {1 + args.probe_negatives} candidates"
        ),
        "probe_scores": (
            "S_f, S_b from an untrained 2-layer Qwen3-architecture LM (the cost does not depend on their values), "
            "S_v from all-MiniLM-L6-v2"
        ),
        "every_n_steps": args.every_n_steps,
        "steps": args.steps,
        "steps_per_second": {
            "without": {"median": median_without, "repeats": without},
            "with": {"median": median_with, "repeats": with_},
        },
        "overhead_percent": round(100 * (1 - median_with / median_without), 2),
        "overhead_percent_other_estimates": {
            "process_cpu_time": round(100 * (1 - cpu_without / cpu_with), 2),
            "time_inside_hooks": round(100 * inside / (inside + args.steps * step_seconds), 2),
            "time_inside_hooks_scores_only": round(100 * scores_only / (scores_only + args.steps * step_seconds), 2),
        },
        "callback_firings_per_run": firings,
        "seconds_inside_callback_per_run": round(inside, 2),
        "seconds_anchor_at_train_begin": round(begin, 2),
        "seconds_per_firing": round(per_firing, 3),
        "seconds_per_training_step_without": round(step_seconds, 3),
        "firing_in_training_steps": round(per_firing / step_seconds, 2),
        "runs_in_order": runs,
        "seconds": {"probe_scoring": round(probe_seconds, 1), "total": round(time.time() - started, 1)},
        "machine": (
            f"{platform.machine()} CPU, {os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}"
            " (a machine shared with other jobs: see each run's load average; this run alone adds about 2)"
        ),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "runs_in_order"}, indent=2))


if __name__ == "__main__":
    main()
