"""The demo's self-distillation effect over several seeds: is the sparse head's gain more than noise?

    python bench/skd_seeds.py --seeds 1 2 3 --out bench/results/skd_seeds_cpu.json

Runs `recipes/demo.py` once per seed (BGE-M3 unified fine-tuning of all-MiniLM-L6-v2 with fresh heads on the
FAQ, with and without self-distillation, same data, steps and seed) and collects nDCG@10 after training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dense", "sparse", "colbert", "dense+sparse", "all")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"seed{seed}"
            subprocess.run(
                [sys.executable, str(ROOT / "recipes" / "demo.py"), "--output_dir", str(out), "--seed", str(seed)],
                check=True,
                capture_output=True,
            )
            runs = json.loads((out / "demo_metrics.json").read_text())["runs"]
            per_seed[seed] = {
                mode: {
                    "with_self_distill": runs["unified+self_distill"]["after"][f"{mode}_ndcg@10"],
                    "without": runs["unified"]["after"][f"{mode}_ndcg@10"],
                    "before": runs["unified"]["before"][f"{mode}_ndcg@10"],
                }
                for mode in MODES
            }
            print(seed, json.dumps(per_seed[seed]), flush=True)
    summary = {}
    for mode in MODES:
        gains = [per_seed[s][mode]["with_self_distill"] - per_seed[s][mode]["without"] for s in args.seeds]
        summary[mode] = {
            "mean_gain": statistics.mean(gains),
            "min_gain": min(gains),
            "max_gain": max(gains),
            "seeds_with_gain": sum(g > 0 for g in gains),
        }
    result = {"command": f"python bench/skd_seeds.py --seeds {' '.join(map(str, args.seeds))}", "seeds": per_seed,
              "summary": summary}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for mode, row in summary.items():
        print(f"{mode:<14} mean gain {row['mean_gain']:+.4f}  range [{row['min_gain']:+.4f}, {row['max_gain']:+.4f}]  "
              f"gain on {row['seeds_with_gain']}/{len(args.seeds)} seeds")  # fmt: skip


if __name__ == "__main__":
    main()
