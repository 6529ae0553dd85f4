"""Script launcher of the offline CPU demo (`ark_hf/recipes/demo.py`: what it trains, on what, and what it prints).

make demo        # or: python recipes/demo.py --output_dir outputs/demo   (--tiny: a seconds-long smoke run)
"""

from __future__ import annotations

from ark_hf.recipes.demo import faq_split, main, make_config

__all__ = ["faq_split", "main", "make_config"]

if __name__ == "__main__":
    main()
