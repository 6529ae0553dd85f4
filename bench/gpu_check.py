"""One command that checks the whole GPU side of ark_hf on one GPU, in one process tree, within a wall budget.

Parts, in this order, each in its own subprocess under a cap (a part that fails or runs past its cap is recorded,
its process group is stopped, and the next part runs):

1. tests       the CUDA tests: every test marked `gpu` (`pytest -m gpu` over the test files that use the marker),
               with each test's outcome and duration (junit xml).
2. engines     `bench/engines.py`: every accelerate config x recipe cell, 1 process each, `--engines-parallel` cells
               at once; each cell trains, saves, reloads in a fresh process and compares embeddings.
3. qwen_padded the padded Qwen3 default (`QwenTrainerConfig` defaults with `padding_free: false`: SDPA, activation
               checkpointing, bf16 autocast over float32 weights) trained `--qwen-steps` steps with LEFT and with
               RIGHT padding (the two runs at once, same seed and data), on a Qwen3-0.6B-shaped replica (hidden
               1024, 16/8 heads, FFN 3072, the real 151,669-id tokenizer, `--qwen-layers` layers; 8 queries x 8
               passages, up to 512 tokens, the FAQ-text mix of bench/throughput.py). Reports whether every loss
               and gradient norm is finite, the padding side each run really used, and the largest absolute
               difference between the two runs' losses.
4. throughput  the core rows of `bench/throughput.py` (`--core`: each architecture's raw limit, FlagEmbedding's
               unified runner and the trainers' default configs at 8 x 8).
5. refresh     (asked for by `--parts ... refresh`; not in the default run, which fills a 9-minute command)
               `bench/refresh_cost.py`: hard-negative refreshes re-encoding a 100,000-passage corpus with a
               BGE-M3-shaped replica inside a BGETrainer run: seconds per refresh, passages/s, share of training.

Writes `gpu_check_<card>.md`, `gpu_check_<card>.json` and `gpu_check_<card>.log` (the parts' output) into `--out`
(card: h100, h200, ... from `torch.cuda.get_device_name()`; `cpu` in the dry mode), with the versions, the card,
the exact command and every figure. The json is rewritten after every part, so a run cut short keeps what it did.

On the GPU machine (the wheels from /work/shared/gpu/wheels.sh in .whl/): `bash bench/run_gpu_check.sh` (results
into $OUT). Directly:
    python bench/gpu_check.py --out bench/results
Dry mode (every part on tiny models on the CPU; the test suite runs it: tests/test_gpu_check.py):
    python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("tests", "engines", "qwen_padded", "throughput", "refresh")
# the default run: every part but `refresh` (with it the run no longer fits one 9-minute GPU command)
DEFAULT_PARTS = ("tests", "engines", "qwen_padded", "throughput")
# seconds per part on the GPU; None: what is left of the budget (the throughput part, last, measures until then)
CAPS = {"tests": 75, "engines": 200, "qwen_padded": 120, "throughput": None, "refresh": 150}
PACKAGES = ["torch", "transformers", "accelerate", "deepspeed", "peft", "sentence-transformers", "FlagEmbedding",
            "liger-kernel", "triton", "datasets", "pytest"]  # fmt: skip
LOG_LIMIT = 2_000_000  # bytes of the log file that come back: its head and tail are kept


# ------------------------------------------------------------------------------------------------ helpers
def card_name(device_name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100`; `cpu` stays `cpu`."""
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", device_name)
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    import torch

    out["torch.version.cuda"] = torch.version.cuda
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        out["nvidia_driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["nvidia_driver"] = None
    return out


def git_commit() -> str | None:
    """The checked-out commit; `ARK_HF_COMMIT` when set (a machine given a copy of the working tree may hold a
    stale `.git`)."""
    if os.environ.get("ARK_HF_COMMIT"):
        return os.environ["ARK_HF_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (launchers pass it on to their workers), SIGKILL after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_commands(name: str, commands: list[list[str]], cap: float, log, env: dict) -> dict:
    """Start `commands` at once (each its own process group), wait up to `cap` seconds for all of them."""
    log.write(f"\n===== {name}: {len(commands)} process(es), cap {cap:.0f} s =====\n")
    for command in commands:
        log.write("$ " + shlex.join(command) + "\n")
    log.flush()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        for command in commands
    ]
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, cap - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
    return {
        "commands": [shlex.join(c) for c in commands], "returncodes": [p.returncode for p in procs],
        "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ part 1: tests
def gpu_test_files() -> list[str]:
    """Test files that use the `gpu` marker (pyproject.toml: 'needs CUDA; skipped without it')."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def part_tests(ns, work: Path, cap: float, log, env) -> dict:
    junit = work / "junit.xml"
    files = gpu_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rA",
               f"--junitxml={junit}", *files]  # fmt: skip
    result = run_commands("tests", [command], cap, log, env)
    result["files"] = files
    if not junit.exists():
        result["error"] = "no junit xml: pytest did not finish"
        return result
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("failed" if tag == "failure" else tag), (node.get("message") or "")[:300]
                break
        counts[outcome] += 1
        tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time") or 0), 2), "message": message})  # fmt: skip
    result.update(tests=tests, counts=counts)
    if result["returncodes"][0] not in (0, 5) or counts["failed"] or counts["error"]:
        result["error"] = f"pytest exit {result['returncodes'][0]}: {counts}"
    return result


# ------------------------------------------------------------------------------------------------ part 2: engines
def part_engines(ns, work: Path, cap: float, log, env) -> dict:
    out = work / "engines.json"
    command = [sys.executable, str(ROOT / "bench" / "engines.py"), "--out", str(out), "--work", str(work / "engines"),
               "--parallel", str(ns.engines_parallel), "--cell_timeout", str(ns.engines_cell_timeout)]  # fmt: skip
    if ns.engines_steps:
        command += ["--steps", str(ns.engines_steps)]
    if ns.device == "cpu":
        command += ["--device", "cpu"]
    if ns.tiny:
        command += ["--tiny"]
    if ns.engines_cells:
        command += ["--configs", *ns.engines_cells]
    result = run_commands("engines", [command], cap, log, env)
    if not out.exists():
        result["error"] = "no result file: no cell finished"
        return result
    from bench.engines import render

    report = json.loads(out.read_text())
    result["cells"] = [{k: v for k, v in cell.items() if k != "argv"} for cell in report["cells"]]
    for cell in result["cells"]:
        cell["ok"] = "error" not in cell and bool(cell.get("reload_ok")) and (
            cell["recipe"] != "bge_m3" or bool(cell.get("heads_trained"))
        )  # fmt: skip
    result["table"] = render([str(out)])
    result["cells_ok"] = sum(c["ok"] for c in result["cells"])
    if result["timed_out"] or result["returncodes"][0] or result["cells_ok"] < len(result["cells"]):
        result["error"] = f"{result['cells_ok']} of {len(result['cells'])} cells trained, saved and reloaded" + (
            " (cut by the part's cap)" if result["timed_out"] else ""
        )
    return result


# ------------------------------------------------------------------------------------------------ part 3: Qwen3
def qwen_prep(spec: dict) -> None:
    """The replica (random weights, the real tokenizer) and the data, written once for both runs."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from ark_hf import assets
    from bench.throughput import make_data

    model = Path(spec["model"])
    if spec["tiny"]:
        assets.build_tiny_qwen3(model)
    else:
        torch.manual_seed(0)
        tok = assets.build_qwen3_tokenizer()
        config = Qwen3Config(vocab_size=151669, hidden_size=1024, intermediate_size=3072,
                             num_hidden_layers=spec["layers"], num_attention_heads=16, num_key_value_heads=8,
                             head_dim=128, max_position_embeddings=32768, rope_theta=1000000.0,
                             tie_word_embeddings=True, rms_norm_eps=1e-6, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        Qwen3Model(config).save_pretrained(model)
        tok.save_pretrained(model)
    make_data(Path(spec["data"]), n=(spec["steps"] + 2) * spec["batch"])


def qwen_child(spec: dict, side: str) -> None:
    """One padded run; every logged step goes to `<side>.jsonl` at once, so a run cut by the cap keeps its steps."""
    import torch
    from transformers import TrainerCallback

    from ark_hf.trainer.qwen_config import QwenTrainerConfig
    from ark_hf.trainer.qwen_trainer import QwenTrainer

    cuda = spec["device"] == "cuda"
    work = Path(spec["work"])
    progress = open(work / f"{side}.jsonl", "w", encoding="utf-8")
    config = QwenTrainerConfig(
        output_dir=str(work / f"run_{side}"), model_name_or_path=spec["model"], train_data=[spec["data"]],
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch"], train_group_size=spec["group"],
        query_max_len=64, passage_max_len=spec["max_len"], padding_free=False, torch_dtype="float32",
        attn_implementation="sdpa", bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        learning_rate=1e-5, warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=42, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = QwenTrainer(config=config)
    trainer.model.tokenizer.padding_side = side
    backbone = trainer.model.backbone if hasattr(trainer.model, "backbone") else trainer.model.model
    # padded rows by side: in the batches the collator makes, and in what the backbone's differentiated calls get
    padded_rows = {"batches": {"left": 0, "right": 0}, "backbone": {"left": 0, "right": 0}}

    def count(where: str, mask) -> None:
        padded_rows[where]["left"] += int((mask[:, 0] == 0).sum())
        padded_rows[where]["right"] += int((mask[:, -1] == 0).sum())

    collate = trainer.data_collator

    def counting_collate(features):
        batch = collate(features)
        for key in ("query", "passages"):
            count("batches", batch[key]["attention_mask"])
        return batch

    trainer.data_collator = counting_collate

    def count_backbone(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None and mask.dim() == 2:
            count("backbone", mask)

    backbone.register_forward_pre_hook(count_backbone, with_kwargs=True)

    class Progress(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.t0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"),
                       "step_s": round(getattr(self, "seconds", 0.0), 4), "padded_rows": padded_rows}  # fmt: skip
                progress.write(json.dumps(row) + "\n")
                progress.flush()

    trainer.add_callback(Progress())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    outcome = {"side": side}
    try:
        trainer.train()
        outcome["stopped"] = None
    except Exception as error:  # recorded: a non-finite loss stops training with the step and the records
        outcome["stopped"] = f"{type(error).__name__}: {str(error)[:400]}"
    outcome["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None
    outcome["padded_rows"] = padded_rows
    (work / f"{side}.json").write_text(json.dumps(outcome))


def qwen_summary(work: Path, steps: int) -> dict:
    runs = {}
    for side in ("left", "right"):
        path = work / f"{side}.jsonl"
        logged = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        outcome = json.loads((work / f"{side}.json").read_text()) if (work / f"{side}.json").exists() else {}
        losses = [r["loss"] for r in logged]
        norms = [r["grad_norm"] for r in logged if r["grad_norm"] is not None]
        finite = all(math.isfinite(v) for v in losses + norms)
        times = sorted(r["step_s"] for r in logged[1:])
        padded = outcome.get("padded_rows") or (logged[-1]["padded_rows"] if logged else None)
        sides = {
            where: max(rows, key=rows.get) if any(rows.values()) else None for where, rows in (padded or {}).items()
        }
        runs[side] = {
            "steps_logged": len(logged), "finite": finite and len(logged) == steps,
            "first_nonfinite_step": next((r["step"] for r in logged if not all(
                math.isfinite(v) for v in (r["loss"], r["grad_norm"]) if v is not None)), None),
            "stopped": outcome.get("stopped", "no outcome: the run was cut by the part's cap or crashed"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "median_step_s": times[len(times) // 2] if times else None, "peak_mem_GiB": outcome.get("peak_mem_GiB"),
            "padded_rows": padded, "padding_in_batches": sides.get("batches"), "padding_at_backbone": sides.get("backbone"),
            "losses": losses,
        }  # fmt: skip
    left, right = runs["left"]["losses"], runs["right"]["losses"]
    common = min(len(left), len(right))
    diffs = [abs(a - b) for a, b in zip(left[:common], right[:common])]
    return {
        "runs": runs, "steps_compared": common,
        "max_abs_loss_diff": max(diffs) if diffs and all(map(math.isfinite, diffs)) else (None if not diffs else "nan"),
        "max_rel_loss_diff": max((d / max(abs(b), 1e-12) for d, b in zip(diffs, right)), default=None)
        if diffs and all(map(math.isfinite, diffs)) else None,
    }  # fmt: skip


def part_qwen(ns, work: Path, cap: float, log, env) -> dict:
    qwen = work / "qwen"
    qwen.mkdir(parents=True, exist_ok=True)
    spec = {"device": ns.device, "tiny": ns.tiny, "work": str(qwen), "model": str(qwen / "qwen3_replica"),
            "data": str(qwen / "train.jsonl"), "steps": ns.qwen_steps, "layers": ns.qwen_layers,
            "batch": ns.qwen_batch, "group": ns.qwen_group, "max_len": ns.qwen_max_len}  # fmt: skip
    spec_path = qwen / "spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    qwen_prep(spec)  # here: one process start less; a failure is recorded by the caller
    result = {"spec": spec, "prep_s": round(time.perf_counter() - started, 1)}
    me = [sys.executable, str(Path(__file__).resolve()), "--spec", str(spec_path)]
    left = cap - (time.perf_counter() - started)
    runs = run_commands("qwen_padded: left and right", [[*me, "--qwen-child", s] for s in ("left", "right")], left,
                        log, env)  # fmt: skip
    result.update(runs, **qwen_summary(qwen, ns.qwen_steps))
    result["seconds"] = round(time.perf_counter() - started, 1)
    bad = [s for s, r in result["runs"].items() if not r["finite"]]
    wrong_side = [s for s, r in result["runs"].items() if r["padding_in_batches"] not in (s, None)]
    if bad or wrong_side:
        result["error"] = (f"not finite for {ns.qwen_steps} steps: {bad}" if bad else "") + (
            f"; padding side not applied: {wrong_side}" if wrong_side else ""
        )
    return result


# ------------------------------------------------------------------------------------------------ part 4: throughput
def part_throughput(ns, work: Path, cap: float, log, env) -> dict:
    out = work / "throughput"
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--core", "--repeats", str(ns.repeats),
               "--budget", str(max(20, int(cap) - 15)), "--cap", str(ns.throughput_row_cap), "--out", str(out)]  # fmt: skip
    if ns.throughput_steps:
        command += ["--steps", str(ns.throughput_steps)]
    if ns.device == "cpu":
        command += ["--device", "cpu"]
    if ns.tiny:
        command += ["--tiny"]
    if ns.throughput_rows:
        command += ["--only", *ns.throughput_rows]
    result = run_commands("throughput", [command], cap, log, env)
    path = out.with_suffix(".json")
    if not path.exists():
        result["error"] = "no result file: no row finished"
        return result
    from bench.throughput import markdown

    report = json.loads(path.read_text())
    result["report"] = report
    result["table"] = markdown(report).split("\n", 2)[2]  # without its title
    failed = [r["row"] for r in report["rows"] if "error" in r]
    if result["timed_out"] or result["returncodes"][0] or failed or not report["rows"]:
        result["error"] = f"rows failed or skipped: {failed}" if failed else "cut by the part's cap"
    return result


# ------------------------------------------------------------------------------------------------ part 5: refresh
def part_refresh(ns, work: Path, cap: float, log, env) -> dict:
    """`bench/refresh_cost.py`: one hard-negative refresh over a 100,000-passage corpus, inside a BGETrainer run."""
    out = work / "refresh" / "refresh_cost"
    command = [sys.executable, str(ROOT / "bench" / "refresh_cost.py"), "--out", str(out),
               "--work", str(work / "refresh" / "work")]  # fmt: skip
    if ns.device == "cpu":
        command += ["--device", "cpu"]
    if ns.tiny:
        command += ["--tiny"]
    result = run_commands("refresh", [command], cap, log, env)
    path = out.with_suffix(".json")
    if not path.exists():
        result["error"] = "no result file: the run did not finish"
        return result
    result["report"] = json.loads(path.read_text())
    result["table"] = out.with_suffix(".md").read_text().split("\n", 2)[2].strip()  # without its title
    if not result["report"]["refreshes"]:
        result["error"] = "no refresh ran"
    return result


# ------------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "", f"Command: `{report['command']}`"]
    if report.get("launcher"):
        lines.append(f"Launched by: `{report['launcher']}`")
    lines += [
        "", f"Card: {report['card']} ({report['device_name']}); commit {report.get('commit') or 'unknown'}; "
        f"started {report['started']}; total {report.get('total_s')} s of a {report['budget_s']} s budget.",
        "", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
        "| part | result | seconds | cap s |", "|---|---|---|---|",
    ]  # fmt: skip
    for name in PARTS:
        part = report["parts"].get(name)
        if part is None:
            continue
        status = "ok" if "error" not in part else f"**{part['error'][:200]}**".replace("|", "/")
        lines.append(f"| {name} | {status} | {part.get('seconds', '')} | {part.get('cap_s', '')} |")
    tests = report["parts"].get("tests", {})
    if tests.get("tests") is not None:
        lines += ["", "## CUDA tests", "", f"`pytest -m gpu` over {', '.join(tests['files'])}: {tests['counts']}", "",
                  "| test | outcome | seconds |", "|---|---|---|"]  # fmt: skip
        for t in tests["tests"]:
            note = f" ({t['message'][:120]})".replace("|", "/") if t["message"] else ""
            lines.append(f"| {t['id']} | {t['outcome']}{note} | {t['seconds']} |")
    engines = report["parts"].get("engines", {})
    if engines.get("table"):
        lines += ["", "## Engines (`bench/engines.py`, 1 process per config)", "",
                  f"{engines['cells_ok']} of {len(engines['cells'])} cells trained, saved, reloaded (and, for "
                  "BGE-M3, with trained heads).", "", engines["table"]]  # fmt: skip
    qwen = report["parts"].get("qwen_padded", {})
    if qwen.get("runs"):
        spec = qwen["spec"]
        shape = "tiny Qwen3" if spec["tiny"] else f"Qwen3-0.6B-shaped replica, {spec['layers']} layers"
        lines += ["", "## Padded Qwen3 default, left vs right padding", "",
                  f"{shape}; {spec['batch']} queries x {spec['group']} passages, up to {spec['max_len']} tokens; "
                  f"{spec['steps']} steps; `padding_free: false`, SDPA, the config's other defaults; both runs at once.",
                  f"Max abs difference of the losses over {qwen['steps_compared']} steps: {qwen['max_abs_loss_diff']} "
                  f"(max relative {qwen['max_rel_loss_diff']}).", "",
                  "Padded rows by side: in the collator's batches, and in the backbone's differentiated calls (the "
                  "model may move padding before the backbone).", "",
                  "| padding | steps logged | finite | first non-finite step | loss step 1 / last | median step s | "
                  "peak GiB | batches padded | backbone saw | stopped by |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for side, r in qwen["runs"].items():
            stopped = (r["stopped"] or "")[:160].replace("|", "/")
            lines.append(
                f"| {side} | {r['steps_logged']} | {r['finite']} | {r['first_nonfinite_step']} | {r['loss_first']} / "
                f"{r['loss_last']} | {r['median_step_s']} | {r['peak_mem_GiB']} | {r['padding_in_batches']} | "
                f"{r['padding_at_backbone']} | {stopped} |"
            )
    throughput = report["parts"].get("throughput", {})
    if throughput.get("table"):
        lines += ["", "## Throughput core rows (`bench/throughput.py --core`)", "", throughput["table"]]
    refresh = report["parts"].get("refresh", {})
    if refresh.get("table"):
        lines += ["", "## Hard-negative refresh cost (`bench/refresh_cost.py`)", "", refresh["table"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    stem = out / f"gpu_check_{report['card']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))


def trim_log(path: Path) -> None:
    data = path.read_bytes()
    if len(data) > LOG_LIMIT:
        half = LOG_LIMIT // 2
        path.write_bytes(data[:half] + b"\n\n[... cut: the log's middle ...]\n\n" + data[-half:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps in every part (a dry run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the md, json and log")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new one under the temp dir)")
    parser.add_argument("--budget", type=float, default=555.0, help="seconds for the whole run (default 555)")
    parser.add_argument(
        "--parts",
        nargs="*",
        choices=PARTS,
        default=None,
        help="parts to run, in order (default: all but refresh; the dry mode: all)",
    )
    parser.add_argument("--engines-parallel", type=int, default=8, help="engine cells at once (default 8)")
    parser.add_argument("--engines-steps", type=int, default=None, help="steps per cell (default 20; tiny 2)")
    parser.add_argument("--engines-cell-timeout", type=int, default=170)
    parser.add_argument("--engines-cells", nargs="*", help="configs or config:recipe cells (default: every cell)")
    parser.add_argument("--qwen-steps", type=int, default=None, help="steps per padded run (default 200; tiny 3)")
    parser.add_argument(
        "--qwen-layers", type=int, default=4,
        help="layers of the Qwen3-0.6B-shaped replica (default 4 of its 28, full width: 2 x 200 steps fit the cap)",
    )  # fmt: skip
    parser.add_argument("--qwen-batch", type=int, default=None, help="queries per step (default 8; tiny 2)")
    parser.add_argument("--qwen-group", type=int, default=None, help="passages per query (default 8; tiny 2)")
    parser.add_argument("--qwen-max-len", type=int, default=None, help="passage max tokens (default 512; tiny 64)")
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs per row (default 1)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="steps per row (default 20; tiny 1)")
    parser.add_argument("--throughput-row-cap", type=float, default=45.0, help="seconds per throughput row")
    parser.add_argument("--throughput-rows", nargs="*", help="core rows whose name contains one of these")
    for name, cap in CAPS.items():
        default = f"{cap} s" if cap else "what is left of the budget"
        parser.add_argument(f"--cap-{name.replace('_', '-')}", type=float, default=cap,
                            help=f"seconds for the {name} part (default {default})")  # fmt: skip
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--qwen-child", choices=["left", "right"], help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.qwen_child:
        return qwen_child(json.loads(Path(ns.spec).read_text()), ns.qwen_child)

    tiny = ns.tiny
    ns.parts = ns.parts or list(PARTS if tiny else DEFAULT_PARTS)
    ns.engines_steps = ns.engines_steps or (2 if tiny else 20)
    ns.qwen_steps = ns.qwen_steps or (3 if tiny else 200)
    ns.qwen_batch = ns.qwen_batch or (2 if tiny else 8)
    ns.qwen_group = ns.qwen_group or (2 if tiny else 8)
    ns.qwen_max_len = ns.qwen_max_len or (64 if tiny else 512)
    ns.throughput_steps = ns.throughput_steps or (1 if tiny else 20)
    if tiny:  # one cell and one row: the dry run checks the plumbing, the parts' own CPU checks the rest
        ns.engines_cells = ns.engines_cells or ["single_gpu:qwen3_embedding"]
        ns.throughput_rows = ns.throughput_rows or ["QwenTrainer default config"]

    import torch

    started = time.perf_counter()
    if ns.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for the dry run)")
    device_name = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join(["python", "bench/gpu_check.py", *sys.argv[1:]]),
        "launcher": os.environ.get("ARK_HF_GPU_CHECK_LAUNCHER"), "card": card_name(device_name),
        "device_name": device_name, "commit": git_commit(), "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": ns.budget, "parts": {},
    }  # fmt: skip
    log_path = out / f"gpu_check_{report['card']}.log"
    runners = {"tests": part_tests, "engines": part_engines, "qwen_padded": part_qwen, "throughput": part_throughput,
               "refresh": part_refresh}  # fmt: skip
    env = child_env()
    with open(log_path, "w", encoding="utf-8") as log:
        for name in ns.parts:
            left = ns.budget - (time.perf_counter() - started) - 5
            cap = min(getattr(ns, f"cap_{name}") or left, left)
            if cap < 15:
                report["parts"][name] = {"error": f"skipped: {left:.0f} s of the budget left", "cap_s": 0}
                write(report, out)
                continue
            t0 = time.perf_counter()
            try:
                result = runners[name](ns, work, cap, log, env)
            except Exception as error:  # the part's own reading failed: recorded, the next part runs
                result = {"error": f"{type(error).__name__}: {error}"}
            result["seconds"], result["cap_s"] = round(time.perf_counter() - t0, 1), round(cap)
            report["parts"][name] = result
            report["total_s"] = round(time.perf_counter() - started, 1)
            write(report, out)
            print(f"[gpu_check] {name}: {'ok' if 'error' not in result else result['error'][:300]} "
                  f"({result['seconds']} s)", flush=True)  # fmt: skip
    trim_log(log_path)
    report["total_s"] = round(time.perf_counter() - started, 1)
    write(report, out)
    print(markdown(report))


if __name__ == "__main__":
    main()
