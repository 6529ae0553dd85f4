"""Where a training step's time goes: `torch.profiler` over a few steps of ark_hf's trainers, padded and
padding-free, on the replicas and data of `bench/throughput.py` (8 queries x 8 passages, FAQ text, max 512
tokens, bf16 autocast over fp32 weights, fused AdamW).

Per row: wall time per step, the device's busy time per step (the sum of kernel times, so `1 - busy / wall`
is the share of the step the GPU waited for the host), the host-device synchronisations the step made
(`aten::_local_scalar_dense` = `.item()` / `int()` / `bool()` of a device tensor, `aten::nonzero` = boolean
indexing, `cudaStreamSynchronize` / `cudaDeviceSynchronize`, device-to-host copies) and the ten operators with
the largest device time. Writes `<out>.json` and `<out>.md`.

    python bench/profile_step.py --out bench/results/profile_step_h100             # GPU
    python bench/profile_step.py --device cpu --tiny --out /tmp/profile_tiny        # a check, not a measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "BGETrainer unified+self-distill padded": ("bge", {"padding_free": "false"}),
    "BGETrainer unified+self-distill padding-free": ("bge", {"padding_free": "true"}),
    "QwenTrainer padded": ("qwen", {"padding_free": "false"}),
    "QwenTrainer padding-free": ("qwen", {"padding_free": "true"}),
}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def build_trainer(arch: str, options: dict, models: dict, data: Path, output_dir: str, device: str, steps: int):
    from ark_hf.trainer.bge_config import BGETrainerConfig
    from ark_hf.trainer.bge_trainer import BGETrainer
    from ark_hf.trainer.qwen_config import QwenTrainerConfig
    from ark_hf.trainer.qwen_trainer import QwenTrainer
    from bench.throughput import LR, PLEN, QLEN, G

    cuda = device == "cuda"
    fields = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8, learning_rate=LR, warmup_steps=0,
        bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=42, model_name_or_path=models[arch],
        train_data=[str(data)], train_group_size=G, query_max_len=QLEN, passage_max_len=PLEN, **options,
    )  # fmt: skip
    if arch == "bge":
        config = BGETrainerConfig(**fields, unified_finetuning=True, use_self_distill=True, self_distill_start_step=-1,
                                  temperature=0.02)  # fmt: skip
        return BGETrainer(config=config)
    config = QwenTrainerConfig(**fields, torch_dtype="float32", attn_implementation="sdpa", temperature=0.02)
    return QwenTrainer(config=config)


def profile_row(name: str, arch: str, options: dict, models: dict, data: Path, work: Path, ns) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    cuda = ns.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    trainer = build_trainer(arch, options, models, data, str(work / name.replace(" ", "_")), ns.device,
                            ns.warmup + ns.steps)  # fmt: skip
    # started by hand after the warm-up steps and stopped after the last one: a schedule that is still cycling
    # when the profiler exits replaces the collected window with an empty one
    prof = profile(activities=activities)
    marks: list[float] = []

    def mark() -> None:
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == ns.warmup:
                mark()
                prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > ns.warmup:
                mark()
            if state.global_step == ns.warmup + ns.steps:
                prof.stop()

    trainer.add_callback(Step())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    walls = [b - a for a, b in zip(marks, marks[1:])]
    events = prof.key_averages()

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0))

    busy_us = sum(device_us(e) for e in events)
    syncs = {e.key: e.count // ns.steps for e in events if e.key in SYNC_OPS or "DtoH" in e.key}
    top = sorted(events, key=device_us if cuda else (lambda e: e.self_cpu_time_total), reverse=True)[:10]
    wall = sum(walls) / len(walls)
    return {
        "row": name,
        "padding_free": trainer.model.padding_free,
        "wall_s_per_step": round(wall, 4),
        "device_busy_s_per_step": round(busy_us / 1e6 / ns.steps, 4) if cuda else None,
        "device_idle_share": round(1 - busy_us / 1e6 / ns.steps / wall, 3) if cuda else None,
        "syncs_per_step": syncs,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count // ns.steps,
                "device_ms_per_step": round(device_us(e) / 1e3 / ns.steps, 2),
                "cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / ns.steps, 2),
            }
            for e in top
        ],  # fmt: skip
    }


def markdown(report: dict) -> str:
    lines = [
        f"# One training step, profiled ({report['device_name']})",
        "",
        f"`{report['command']}`; {report['steps']} profiled steps after {report['warmup']} warm-up steps; "
        f"torch {report['torch']}, transformers {report['transformers']}.",
        "",
        "| row | wall s/step | device busy s/step | device idle | host syncs per step | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:120]} | | | | |")
            continue
        syncs = ", ".join(f"{k} {v}" for k, v in sorted(r["syncs_per_step"].items())) or "none"
        lines.append(f"| {r['row']} | {r['wall_s_per_step']} | {r['device_busy_s_per_step']} | "
                     f"{r['device_idle_share']} | {syncs} | {r['peak_gib']} |")  # fmt: skip
    for r in report["rows"]:
        if "top_ops" not in r:
            continue
        lines += ["", f"## {r['row']}: top operators", "", "| op | calls/step | device ms/step | host ms/step |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{o['op']}` | {o['calls_per_step']} | {o['device_ms_per_step']} | {o['cpu_ms_per_step']} |"
                  for o in r["top_ops"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a check, not a measurement)")
    parser.add_argument("--warmup", type=int, default=None, help="unprofiled first steps (default 4; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default 3; tiny 1)")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these")
    parser.add_argument("--out", default="bench/results/profile_step_gpu", help="output path without extension")
    ns = parser.parse_args(argv)
    ns.warmup = ns.warmup if ns.warmup is not None else (1 if ns.tiny else 4)
    ns.steps = ns.steps if ns.steps is not None else (1 if ns.tiny else 3)

    import torch
    import transformers

    from bench.throughput import make_data, make_replicas

    work = Path(tempfile.mkdtemp(prefix="ark_profile_"))
    models = make_replicas(work, tiny=ns.tiny)
    data = work / "train.jsonl"
    make_data(data, 64 if ns.tiny else 512)
    rows = []
    for name, (arch, options) in ROWS.items():
        if ns.only and not any(key in name for key in ns.only):
            continue
        try:
            rows.append(profile_row(name, arch, options, models, data, work, ns))
        except Exception as error:  # noqa: BLE001 - recorded, the next row runs
            rows.append({"row": name, "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(rows[-1])[:400], flush=True)
    report = {
        "command": "python bench/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device_name": torch.cuda.get_device_name() if ns.device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "warmup": ns.warmup, "steps": ns.steps, "rows": rows,
    }  # fmt: skip
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
