"""Script launcher of the Qwen3-Embedding recipe (`ark_hf/recipes/qwen3_embedding.py`: commands and options).

    python recipes/qwen3_embedding.py --config qwen3_full --train_data data/train.jsonl --output_dir out/qwen3
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/qwen3_embedding.py --config ...

`ark-hf train qwen3` and `accelerate launch -m ark_hf.recipes.qwen3_embedding` run the same code without this file.
"""

from __future__ import annotations

from ark_hf.recipes.qwen3_embedding import evaluate_merged_model, main

__all__ = ["evaluate_merged_model", "main"]

if __name__ == "__main__":
    main()
