"""Fine-tune Qwen3-Embedding (or any decoder LLM as an embedder) with `QwenTrainer`.

`--config` takes a shipped config's name (`ark_hf/recipes/configs/`) or a YAML path. `accelerate launch -m
ark_hf.recipes.qwen3_embedding` runs this module under any launcher; from a source checkout the script
`recipes/qwen3_embedding.py` is the same recipe.

Single GPU:
    ark-hf train qwen3 --config qwen3_full --train_data data/train.jsonl --output_dir out/qwen3

Multi GPU (DDP, cross-device negatives):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m ark_hf.recipes.qwen3_embedding \\
        --config qwen3_full --train_data data/train.jsonl --output_dir out/qwen3

DeepSpeed ZeRO-3 (4B / 8B; ZeRO-2 works the same way with deepspeed_zero2.yaml):
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m ark_hf.recipes.qwen3_embedding \\
        --config qwen3_full --model_name_or_path Qwen/Qwen3-Embedding-8B \\
        --train_data data/train.jsonl --output_dir out/qwen3_8b

LoRA (r=8, alpha=32, all linear projections; the saved folder holds merged weights + the adapter):
    ark-hf train qwen3 --config qwen3_lora --train_data data/train.jsonl --output_dir out/qwen3_lora

Curriculum (Qwen3's three stages: weak pairs -> supervised data -> slerp merge of stage-2 checkpoints):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m ark_hf.recipes.qwen3_embedding \\
        --config qwen3_curriculum --curriculum my_stages.yaml --output_dir out/qwen3_3stage
    # my_stages.yaml: a copy of the shipped plan qwen3_stages.yaml with your data paths; the merged model lands
    # in out/qwen3_3stage/stage3_merged

Data: jsonl in the ark layout (`query`, `pos`, `neg`), ms-swift's embedding layout (`messages`,
`positive_messages`, `negative_messages`; a `system` message becomes the query instruction) or
sentence-transformers columns; all of it is validated before the model loads. Any field of
`QwenTrainerConfig` (and of `TrainingArguments`) can be set in the YAML file or overridden on the command line
(`--temperature 0.05`); unknown keys are errors; `--help` lists every option. A CPU walk-through of the whole
pipeline on a tiny random model: `python -m ark_hf.recipes.qwen3_demo`.
"""

from __future__ import annotations

import os

from ark_hf import DecoderEmbedder, QwenTrainer
from ark_hf.trainer.runner import run_recipe


def evaluate_merged_model(trainer: QwenTrainer, metrics: dict) -> None:
    """A curriculum's stage-3 merge is a model of its own: evaluate it too."""
    merged = trainer.curriculum.merged_path if trainer.curriculum is not None else None
    if not merged or not trainer.is_world_process_zero():
        return
    print(f"stage-3 merged model: {merged}")
    if trainer.evaluators and os.path.isfile(os.path.join(merged, "config.json")):
        model = DecoderEmbedder.from_pretrained(merged).to(trainer.args.device)
        metrics["merged"] = {
            f"eval_{key}": value for evaluator in trainer.evaluators for key, value in evaluator(model).items()
        }


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), train, save and return the before/after metrics."""
    return run_recipe(QwenTrainer, argv, after_training=evaluate_merged_model)


if __name__ == "__main__":
    main()
