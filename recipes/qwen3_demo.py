"""Script launcher of the Qwen3 three-stage CPU walk-through (`ark_hf/recipes/qwen3_demo.py`: what it shows).

make demo-qwen   # or: python recipes/qwen3_demo.py --output_dir outputs/qwen3_demo   (--tiny: smoke run)
"""

from __future__ import annotations

from ark_hf.recipes.qwen3_demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
