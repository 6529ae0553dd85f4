"""The recipes, inside the package so that an installed ark_hf trains from any folder.

| module | runs | command |
| --- | --- | --- |
| `ark_hf.recipes.bge_m3` | `BGETrainer` (BGE-M3 dense + sparse + ColBERT) | `ark-hf train bge-m3 --config NAME_OR_PATH ...` |
| `ark_hf.recipes.qwen3_embedding` | `QwenTrainer` (Qwen3-Embedding, decoder embedders) | `ark-hf train qwen3 --config ...` |
| `ark_hf.recipes.demo` | the offline CPU demo: BGE-M3 unified fine-tuning of all-MiniLM-L6-v2 | `python -m ark_hf.recipes.demo` |
| `ark_hf.recipes.qwen3_demo` | the offline CPU walk-through of Qwen3's three stages | `python -m ark_hf.recipes.qwen3_demo` |

The YAML configs are package data in `ark_hf/recipes/configs/`; `--config` takes a path or a shipped config's
name (`bge_m3_unified_self_distill`, with or without `.yaml`; the lookup is `ark_hf.utils.cli.resolve_config_file`).
Multi-process launchers run the same modules: `accelerate launch -m ark_hf.recipes.bge_m3 --config ...`, or from
a source checkout the thin scripts `recipes/bge_m3.py` and `recipes/qwen3_embedding.py`.
"""
