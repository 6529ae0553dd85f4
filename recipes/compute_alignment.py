"""Score a jsonl with ARK's triple alignment (forward, backward, parameter) and rebuild training records.

One shard (records 0 to 1000) on one GPU, resumable (run the same command again after an interruption):
    python recipes/compute_alignment.py --input_file data/train.jsonl \\
        --output_file data/train.align.0_1000.jsonl --start 0 --end 1000 \\
        --lm_name_or_path Qwen/Qwen2.5-7B-Instruct --retriever_name_or_path BAAI/bge-m3

Shards in parallel (one GPU each), then training records with `pos_scores` / `neg_scores`:
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python recipes/compute_alignment.py --config align.yaml \\
        --start $((i*1000)) --end $(((i+1)*1000)) --output_file data/train.align.$i.jsonl & done; wait
    cat data/train.align.*.jsonl > data/train.align.jsonl
    python recipes/compute_alignment.py --rebuild_only data/train.align.jsonl --rebuild_output data/train.ark.jsonl

`ark-hf score` runs the same job with the same flags. Every field of `ComputeAlignmentConfig` is a flag or a
YAML key (`--help` lists them); records are checked (file:line:field) before any model loads.
"""

from __future__ import annotations

from ark_hf.alignment.pipeline import ComputeAlignmentConfig, compute_alignment, main

__all__ = ["ComputeAlignmentConfig", "compute_alignment", "main"]

if __name__ == "__main__":
    print(main())
