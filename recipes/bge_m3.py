"""Fine-tune BGE-M3 (dense + sparse + ColBERT) with `BGETrainer`.

Single GPU / CPU:
    python recipes/bge_m3.py --config recipes/configs/bge_m3_unified_self_distill.yaml \\
        --train_data data/train.jsonl --output_dir out/m3

Multi GPU (DDP) / DeepSpeed ZeRO-2 / ZeRO-3 / FSDP:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/bge_m3.py \\
        --config recipes/configs/bge_m3_unified_self_distill.yaml --train_data data/train.jsonl --output_dir out/m3
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/bge_m3.py --config ...

On CPU, `torchrun --nproc_per_node 2 recipes/bge_m3.py ...` runs two processes over gloo (tests use it).

Any field of `BGETrainerConfig` (and of `TrainingArguments`) can be set in the YAML file or overridden on
the command line (`--learning_rate 5e-6`); unknown keys are errors. `--help` lists every option.
"""

from __future__ import annotations

from ark_hf import BGETrainer, BGETrainerConfig
from ark_hf.trainer.bge_trainer import build_bge_model
from ark_hf.utils.cli import parse_config
from ark_hf.utils.preflight import preflight


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(BGETrainerConfig, argv)
    if not config.train_data:
        raise SystemExit("train_data is required (--train_data FILE [FILE ...] or in the YAML config)")
    # everything that can fail is checked before the model loads or anything is written
    records = preflight(config, BGETrainer)  # data, eval data, config, output dir, tokenizer; then the lock
    trainer = BGETrainer(model=build_bge_model(config), args=config, train_dataset=records)
    metrics: dict = {}
    if trainer.evaluators:
        metrics["before"] = trainer.evaluate()
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.evaluators:
        metrics["after"] = trainer.evaluate()
    trainer.save_retrieval_metrics(metrics)
    if config.push_to_hub:
        trainer.push_to_hub()
    return metrics


if __name__ == "__main__":
    main()
