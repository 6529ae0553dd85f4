"""Script launcher of the BGE-M3 recipe (`ark_hf/recipes/bge_m3.py`, where its commands and options are documented).

    python recipes/bge_m3.py --config bge_m3_unified_self_distill --train_data data/train.jsonl --output_dir out/m3
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/bge_m3.py --config ...
    torchrun --nproc_per_node 2 recipes/bge_m3.py --config ...

`ark-hf train bge-m3` and `accelerate launch -m ark_hf.recipes.bge_m3` run the same code without this file.
"""

from __future__ import annotations

from ark_hf.recipes.bge_m3 import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
