"""Every accelerate config x both recipes, on ONE GPU (1 process per config), with GradCache.

Each cell runs `accelerate launch --config_file <config with num_processes: 1> bench/engines.py --worker ...`
in its own process. The worker:
- builds the recipe's trainer;
- trains ~50 steps with `mini_batch_size`;
- records the loss at steps 1/10/50, tokens/s (non-padding tokens of queries and passages) and peak GPU memory;
- embeds a fixed set of texts in memory;
- saves the final model, and the per-tensor sums of the trained weights gathered from the engine's shards; then, in
  a fresh process of the same cell (its own process group, under the cell's timeout), the folder is reloaded: the
  reloaded embeddings are compared with the in-memory ones, and the saved weights with the trained ones (a LoRA
  run: its adapter file). A cell passes when the weights came back bit for bit (relative difference of the sums
  <= 1e-6), or, where none could be compared, when the embeddings agree to 1e-3. An engine that runs its forward
  in bf16 over float32 weights (FSDP's mixed-precision policy) differs from the float32 reload by bf16 rounding
  (about 1e-3) with every weight intact: the weights column tells the two apart.

A cell that fails records its error (the last lines of stderr), and the next cell still runs. Cells run
`--parallel` at a time, and a new one starts as soon as any running cell ends.

Models: random-weight replicas of BGE-M3 (XLM-R large: hidden 1024, 16 heads, FFN 4096, vocab 250,002) and
Qwen3-Embedding-0.6B (hidden 1024, 16/8 heads, FFN 3072, vocab 151,669). Both use the real tokenizers from
`ark_hf.assets`. Depth is cut to 4 layers at full width, so a cell takes ~30 s.

GPU (the whole run must stay under 9 minutes; deepspeed from wheels in .whl/ when it is not installed):
    pip install --no-index --find-links .whl deepspeed hjson ninja py-cpuinfo msgpack  # if needed
    python bench/engines.py --out bench/results/engines_h200.json
CPU smoke test (tiny models, 2 steps, the configs that run on CPU):
    python bench/engines.py --device cpu --tiny --out /tmp/engines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELOAD_MARK = "==== engines.py: training done, reloading ===="
CONFIGS = ["single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
RECIPES = ["bge_m3", "qwen3_embedding", "qwen3_lora"]  # qwen3_lora: the Qwen3 recipe with `lora: true`
TEXTS = [
    "how do I renew a building permit",
    "A building permit can be renewed online before it expires, for a small fee.",
    "what documents does a passport application need",
    "Bygglov förnyas på nätet innan det går ut.",
]


def build_models(folder: Path, tiny: bool) -> dict[str, str]:
    """The two replicas (random weights, real tokenizers), built once."""
    import torch
    from transformers import Qwen3Config, Qwen3Model, XLMRobertaConfig, XLMRobertaModel

    from ark_hf import assets

    paths = {"bge_m3": folder / "bge_m3_replica", "qwen3_embedding": folder / "qwen3_replica"}
    if tiny:
        assets.build_tiny_xlmr(paths["bge_m3"])
        assets.build_tiny_qwen3(paths["qwen3_embedding"])
        return {k: str(v) for k, v in paths.items()}
    torch.manual_seed(0)
    tok = assets.build_xlmr_tokenizer()
    XLMRobertaModel(
        XLMRobertaConfig(vocab_size=len(tok), hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                         intermediate_size=4096, max_position_embeddings=8194, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id),
        add_pooling_layer=False,
    ).save_pretrained(paths["bge_m3"])  # fmt: skip
    tok.save_pretrained(paths["bge_m3"])
    tok = assets.build_qwen3_tokenizer()
    Qwen3Model(
        Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                    tie_word_embeddings=True)
    ).save_pretrained(paths["qwen3_embedding"])  # fmt: skip
    tok.save_pretrained(paths["qwen3_embedding"])
    return {k: str(v) for k, v in paths.items()}


def write_data(path: Path) -> None:
    from ark_hf.assets import load_faq

    rows = load_faq("en")
    n = len(rows)
    path.write_text(
        "".join(
            json.dumps({"query": r["q"], "pos": [r["a"]], "neg": [rows[(i + k) % n]["a"] for k in (1, 2, 3)]}) + "\n"
            for i, r in enumerate(rows)
        )
    )


# ------------------------------------------------------------------------------------------------ worker
def worker(spec: dict) -> None:
    import torch
    from transformers import TrainerCallback

    from ark_hf import BGETrainer
    from ark_hf.trainer.qwen_trainer import QwenTrainer
    from ark_hf.utils.cli import parse_config
    from ark_hf.utils.preflight import preflight

    trainer_class = BGETrainer if spec["recipe"] == "bge_m3" else QwenTrainer
    config = parse_config(trainer_class.config_class, spec["argv"])
    records = preflight(config, trainer_class)
    tokens = {"n": 0}

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            tokens["seconds"] = time.perf_counter() - self.start

    trainer = trainer_class(args=config, train_dataset=records, callbacks=[Meter()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens["n"] += int(batch["query"]["attention_mask"].sum() + batch["passages"]["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    # the trained module itself, without accelerate's autocast wrapper: the embeddings at the weights' own
    # precision (float32 master weights, or the engine's bf16 weights under DeepSpeed), as the reload computes
    plain = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    features = {k: v.to(trainer.args.device) for k, v in plain.tokenize(TEXTS, 64).items()}
    plain.eval()
    with torch.no_grad():
        in_memory = plain(passages=features).passages.dense.float().cpu()
    trainer.save_model(config.output_dir)
    # the trained weights themselves, gathered from the engine's shards (a collective: every rank calls it), as
    # per-tensor sums: the reload compares them with the saved folder's, which tells a precision loss in the
    # weights from one in the comparison of embeddings (an engine may run the forward in bf16)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the engine's wrapper (ZeRO-3 gathers there)
    result = {
        "losses": {str(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
        "tokens_per_s": tokens["n"] / tokens["seconds"],
        "peak_memory_gib": peak,
        "engine": trainer.accelerator.distributed_type.value,
    }
    if trainer.is_world_process_zero():
        torch.save(in_memory, spec["result"] + ".in_memory.pt")
        torch.save(weight_sums(state), spec["result"] + ".weights.pt")
        Path(spec["result"]).write_text(json.dumps(result))


def weight_sums(state: dict) -> dict:
    """Per tensor: dtype, and the float64 sum and sum of squares of its values."""
    return {
        name: (str(t.dtype), float(t.double().sum()), float(t.double().pow(2).sum()))
        for name, t in state.items()
        if hasattr(t, "dtype") and t.is_floating_point()
    }


def lora_key(name: str) -> str | None:
    """`...base_model.model.<module>.lora_A.weight`, the adapter file's name of a LoRA weight (None: not one)."""
    start = name.find("base_model.model.")
    return name[start:].replace(".default.", ".") if "lora_" in name and start >= 0 else None


def compare_weights(saved: dict, in_memory: dict) -> dict:
    """The saved weights against the trained ones: the names both hold (for a LoRA run the adapter's weights, its
    folder's model being the merged one), their dtypes, and the largest relative difference of the per-tensor sums
    and sums of squares (0 when every weight came back bit for bit)."""
    common = sorted(set(saved) & set(in_memory))
    if not common:
        return {"weights_compared": 0, "weights_max_rel_diff": None, "weights_dtypes": None}
    worst = 0.0
    for name in common:
        for a, b in zip(saved[name][1:], in_memory[name][1:]):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    dtypes = sorted({f"{in_memory[n][0]}->{saved[n][0]}" for n in common})
    return {"weights_compared": len(common), "weights_max_rel_diff": worst, "weights_dtypes": dtypes}


def reload_check(spec: dict) -> dict:
    """In a fresh process (no engine, no ZeRO-3 `zero.Init` around `from_pretrained`): load the saved folder
    as a user would, embed the same texts at the precision of the saved weights (no autocast), and compare
    with the in-memory embeddings the worker computed the same way from the trained module."""
    import torch

    from ark_hf import BGEM3Model
    from ark_hf.models.decoder import DecoderEmbedder

    folder = dict(zip(spec["argv"][::2], spec["argv"][1::2]))["--output_dir"]
    device = "cuda" if torch.cuda.is_available() and spec["bf16"] else "cpu"
    model = BGEM3Model.from_pretrained(folder) if spec["recipe"] == "bge_m3" else DecoderEmbedder(folder)
    model = model.to(device).eval()
    features = {k: v.to(device) for k, v in model.tokenize(TEXTS, 64).items()}
    with torch.no_grad():
        again = model(passages=features).passages.dense.float().cpu()
    in_memory = torch.load(spec["result"] + ".in_memory.pt")
    diff = float((again - in_memory).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(again, in_memory, dim=-1).min())
    weights = {p.dtype for p in model.parameters()}
    trained = torch.load(spec["result"] + ".weights.pt")
    weight_check = compare_weights(weight_sums(model.state_dict()), trained)
    adapter = Path(folder) / "lora_adapter" / "adapter_model.safetensors"
    if not weight_check["weights_compared"] and adapter.exists():
        from safetensors.torch import load_file

        lora = {lora_key(n): v for n, v in trained.items() if lora_key(n)}
        weight_check = compare_weights(weight_sums(load_file(adapter)), lora)
    exact = weight_check["weights_compared"] and weight_check["weights_max_rel_diff"] <= 1e-6
    return {
        "reload_max_abs_diff": diff, "reload_min_cosine": cosine,
        # the weights came back bit for bit (an embedding difference is then the forward's precision), or, where
        # no weights could be compared, the embeddings agree to 1e-3
        "reload_ok": bool(exact) or diff <= 1e-3,
        "saved_dtype": sorted(str(w) for w in weights),
        "heads_trained": getattr(model, "heads_trained", None),
        **weight_check,
    }  # fmt: skip


def render(paths: list[str]) -> str:
    """One markdown table over the cells of several runs (a later run's cell replaces an earlier one's)."""
    cells, runs = {}, []
    for path in paths:
        report = json.loads(Path(path).read_text())
        runs.append(f"- `{report['command']}` ({Path(path).name}: {report.get('total_seconds')} s)")
        cells.update({(c["config"], c["recipe"]): c for c in report["cells"]})
    lines = ["Runs:", *runs, "", "| config | recipe | engine | loss @1 / @10 / @last | tokens/s | peak GiB | saved "
             "| reload max abs diff / min cos | weights back: tensors, max rel diff | heads trained | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (config, recipe), c in sorted(cells.items(), key=lambda kv: (CONFIGS.index(kv[0][0]), kv[0][1])):
        if "error" in c:
            named = [ln.strip() for ln in c["error"].splitlines() if "Error" in ln and "ChildFailed" not in ln]
            error = (named[-1] if named else " ".join(c["error"].split())[-300:]).replace("|", "/")
            lines.append(f"| {config} | {recipe} | | | | | | | | | failed: {error} |")
            continue
        loss = " / ".join(f"{v:.3f}" if v is not None else "-" for v in c["loss"].values())
        ok = "trained, saved, reloaded" + ("" if c["reload_ok"] else " (diff above 1e-3)")
        compared = c.get("weights_compared")
        weights = f"{compared}, {c['weights_max_rel_diff']:.1e}" if compared else "-"
        lines.append(
            f"| {config} | {recipe} | {c['engine']} | {loss} | {c['tokens_per_s']:,.0f} "
            f"| {'-' if c['peak_memory_gib'] is None else format(c['peak_memory_gib'], '.1f')} "
            f"| {','.join(d.removeprefix('torch.') for d in c['saved_dtype'])} "
            f"| {c['reload_max_abs_diff']:.1e} / {c['reload_min_cosine']:.6f} | {weights} | {c['heads_trained']} | {ok} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ driver
def worker_error(stderr: str) -> str:
    """The worker's own traceback (the launcher's ChildFailedError that follows it says nothing)."""
    start = stderr.find("Traceback (most recent call last)")
    launcher = stderr.find("accelerate_cli.py")
    block = stderr[start:launcher] if 0 <= start < launcher else stderr
    return block[-3000:]


def launch_config(name: str, folder: Path, cpu: bool, port: int) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "accelerate_configs" / f"{name}.yaml").read_text())
    config.update(num_processes=1, main_process_port=port)
    if cpu:
        config["mixed_precision"] = "no"
    path = folder / f"{name}_{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cell_spec(name: str, recipe: str, models: dict, data: Path, work: Path, steps: int, tiny: bool, cpu: bool):
    out = work / f"{name}_{recipe}"
    argv = [
        "--model_name_or_path", models[recipe], "--train_data", str(data), "--output_dir", str(out),
        "--overwrite_output_dir", "true", "--max_steps", str(steps), "--logging_steps", "1",
        "--per_device_train_batch_size", "4" if tiny else "32", "--train_group_size", "4",
        "--mini_batch_size", "4" if tiny else "32", "--query_max_len", "64", "--passage_max_len", "256",
        "--save_strategy", "no", "--report_to", "none", "--learning_rate", "1e-5",
        "--gradient_checkpointing", "true",
    ]  # fmt: skip
    argv += ["--use_cpu", "true"] if cpu else ["--bf16", "true"]
    if recipe == "bge_m3":
        argv += ["--init_missing_heads", "true", "--unified_finetuning", "true", "--use_self_distill", "true"]
    if recipe == "qwen3_lora":
        argv += ["--lora", "true", "--lora_r", "16", "--learning_rate", "1e-4"]
    return {"recipe": recipe, "argv": argv, "bf16": not cpu, "result": str(out) + ".json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 2 steps (a smoke test)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "engines_h200.json"))
    parser.add_argument("--work", default="/tmp/ark_hf_engines_bench")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cell_timeout", type=int, default=150)
    parser.add_argument("--configs", nargs="*", default=None)
    parser.add_argument("--recipes", nargs="*", default=RECIPES, choices=RECIPES)
    parser.add_argument(
        "--parallel", type=int, default=1,
        help="cells run at the same time (one GPU shared: each cell's tokens/s is then a lower bound)",
    )  # fmt: skip
    parser.add_argument("--render", nargs="*", help="result JSONs to render as one markdown table (to --out)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.render:
        return Path(args.out).write_text(render(args.render))
    if args.reload:
        spec = json.loads(args.reload)
        return Path(spec["result"] + ".reload.json").write_text(json.dumps(reload_check(spec)))

    cpu = args.device == "cpu"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.tiny)
    models["qwen3_lora"] = models["qwen3_embedding"]
    data = work / "train.jsonl"
    write_data(data)
    steps = args.steps or (2 if args.tiny else 50)
    configs = args.configs or ([c for c in CONFIGS if c in ("single_gpu", "deepspeed_zero2")] if cpu else CONFIGS)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    report = {"command": " ".join(["python", *sys.argv]), "parallel": args.parallel, "cells": []}
    started = time.perf_counter()

    def start(name: str, recipe: str, port: int):
        spec = cell_spec(name, recipe, models, data, work, steps, args.tiny, cpu)
        for stale in Path(spec["result"]).parent.glob(Path(spec["result"]).name + "*"):
            stale.unlink()
        launch = [
            str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(launch_config(name, work, cpu, port)), __file__, "--worker", json.dumps(spec),
        ]  # fmt: skip
        reload = [sys.executable, __file__, "--reload", json.dumps(spec)]
        # the reload follows the training in the cell's own process chain, so cells reload in parallel too
        command = ["bash", "-c", f"{shlex.join(launch)} && echo {RELOAD_MARK} && {shlex.join(reload)}"]
        log = open(spec["result"] + ".log", "w")
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True
        )
        return spec, proc, log, time.perf_counter()

    def finish(name: str, spec: dict, proc, log, t0: float) -> dict:
        cell = {"config": name, "recipe": spec["recipe"], "steps": steps, "argv": spec["argv"],
                "command": f"accelerate launch --config_file <accelerate_configs/{name}.yaml, num_processes: 1> "
                           "bench/engines.py --worker <spec>"}  # fmt: skip
        try:
            proc.wait(timeout=max(1.0, args.cell_timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
            proc.wait()
            cell["error"] = f"timed out after {args.cell_timeout} s"
        log.close()
        text = Path(spec["result"] + ".log").read_text()
        trained = Path(spec["result"]).exists()
        if trained:
            result = json.loads(Path(spec["result"]).read_text())
            losses = result.pop("losses")
            cell["loss"] = {s: losses.get(str(s)) for s in (1, 10, steps)}
            cell.update(result)
        if "error" not in cell and proc.returncode != 0:
            reloading = trained and RELOAD_MARK in text
            cell["error"] = ("reload: " if reloading else "") + worker_error(text.split(RELOAD_MARK)[-1])
        elif "error" not in cell:
            cell.update(json.loads(Path(spec["result"] + ".reload.json").read_text()))
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        return cell

    def next_finished():
        """The first running cell that has ended or is past its timeout (cells end in any order)."""
        while True:
            for index, (_, _spec, proc, _log, t0) in enumerate(running):
                if proc.poll() is not None or time.perf_counter() - t0 > args.cell_timeout:
                    return running.pop(index)
            time.sleep(0.5)

    # a `config:recipe` entry of --configs names one cell
    queue = [tuple(n.split(":")) if ":" in n else (n, r) for n in configs for r in args.recipes]
    queue = list(dict.fromkeys(queue))
    running, port = [], 29600
    while queue or running:
        while queue and len(running) < args.parallel:
            port += 1
            name, recipe = queue.pop(0)
            running.append((name, *start(name, recipe, port)))
        cell = finish(*next_finished())
        print(json.dumps({k: v for k, v in cell.items() if k not in ("error", "argv")}),
              "ERROR\n" + cell["error"][-1500:] if "error" in cell else "", flush=True)  # fmt: skip
        report["cells"].append(cell)
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))  # after every cell: a cut run keeps its cells


if __name__ == "__main__":
    main()
