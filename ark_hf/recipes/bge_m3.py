"""Fine-tune BGE-M3 (dense + sparse + ColBERT) with `BGETrainer`.

Single GPU / CPU (`--config` takes a shipped config's name or a YAML path):
    ark-hf train bge-m3 --config bge_m3_unified_self_distill --train_data data/train.jsonl --output_dir out/m3

Multi GPU (DDP) / DeepSpeed ZeRO-2 / ZeRO-3 / FSDP:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m ark_hf.recipes.bge_m3 \\
        --config bge_m3_unified_self_distill --train_data data/train.jsonl --output_dir out/m3
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m ark_hf.recipes.bge_m3 --config ...

From a source checkout, `recipes/bge_m3.py` is the same recipe as a script (`accelerate launch recipes/bge_m3.py
...`). On CPU, `torchrun --nproc_per_node 2 recipes/bge_m3.py ...` runs two processes over gloo (tests use it).

Any field of `BGETrainerConfig` (and of `TrainingArguments`) can be set in the YAML file or overridden on
the command line (`--learning_rate 5e-6`); unknown keys are errors. `--help` lists every option.
"""

from __future__ import annotations

from ark_hf import BGETrainer
from ark_hf.trainer.runner import run_recipe


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), train, save and return the before/after metrics."""
    return run_recipe(BGETrainer, argv)


if __name__ == "__main__":
    main()
