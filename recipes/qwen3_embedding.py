"""Fine-tune Qwen3-Embedding (or any decoder LLM as an embedder) with `QwenTrainer`.

Single GPU:
    python recipes/qwen3_embedding.py --config recipes/configs/qwen3_full.yaml \\
        --train_data data/train.jsonl --output_dir out/qwen3

Multi GPU (DDP, cross-device negatives):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/qwen3_embedding.py \\
        --config recipes/configs/qwen3_full.yaml --train_data data/train.jsonl --output_dir out/qwen3

DeepSpeed ZeRO-3 (4B / 8B; ZeRO-2 works the same way with deepspeed_zero2.yaml):
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/qwen3_embedding.py \\
        --config recipes/configs/qwen3_full.yaml --model_name_or_path Qwen/Qwen3-Embedding-8B \\
        --train_data data/train.jsonl --output_dir out/qwen3_8b

LoRA (r=8, alpha=32, all linear projections; the saved folder holds merged weights + the adapter):
    python recipes/qwen3_embedding.py --config recipes/configs/qwen3_lora.yaml \\
        --train_data data/train.jsonl --output_dir out/qwen3_lora

Curriculum (Qwen3's three stages: weak pairs -> supervised data -> slerp merge of stage-2 checkpoints):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/qwen3_embedding.py \\
        --config recipes/configs/qwen3_curriculum.yaml --output_dir out/qwen3_3stage
    # the plan is recipes/configs/qwen3_stages.yaml; the merged model lands in out/qwen3_3stage/stage3_merged

Data: jsonl in the ark layout (`query`, `pos`, `neg`), ms-swift's embedding layout (`messages`,
`positive_messages`, `negative_messages`; a `system` message becomes the query instruction) or
sentence-transformers columns; all of it is validated before the model loads. Any field of
`QwenTrainerConfig` (and of `TrainingArguments`) can be set in the YAML file or overridden on the command line
(`--temperature 0.05`); unknown keys are errors; `--help` lists every option. A CPU walk-through of the whole
pipeline on a tiny random model: `python recipes/qwen3_demo.py`.
"""

from __future__ import annotations

import os

from ark_hf import DecoderEmbedder, QwenTrainer, QwenTrainerConfig
from ark_hf.utils.cli import parse_config
from ark_hf.utils.preflight import preflight


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(QwenTrainerConfig, argv)
    if not config.train_data and not config.curriculum:
        raise SystemExit(
            "no training data: --train_data FILE [FILE ...] or --curriculum PLAN.yaml (or in the YAML config)"
        )
    # everything that can fail is checked before the model loads or anything is written
    records = preflight(config, QwenTrainer)  # data, eval data, config, output dir, tokenizer; then the lock
    trainer = QwenTrainer(args=config, train_dataset=records)
    metrics: dict = {}
    if trainer.evaluators:
        metrics["before"] = trainer.evaluate()
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.evaluators:
        metrics["after"] = trainer.evaluate()
    merged = trainer.curriculum.merged_path if trainer.curriculum is not None else None
    if merged and trainer.is_world_process_zero():
        print(f"stage-3 merged model: {merged}")
        if trainer.evaluators and os.path.isfile(os.path.join(merged, "config.json")):
            merged_model = DecoderEmbedder.from_pretrained(merged).to(trainer.args.device)
            metrics["merged"] = {
                key: value for evaluator in trainer.evaluators for key, value in evaluator(merged_model).items()
            }
    trainer.save_retrieval_metrics(metrics)
    if config.push_to_hub:
        trainer.push_to_hub()
    return metrics


if __name__ == "__main__":
    main()
