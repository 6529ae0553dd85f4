"""The shipped accelerate configs under the real `accelerate launch` (2 CPU processes, gloo).

CPU configs are made in a tmp dir from the shipped ones, changing only `num_processes: 2`, `mixed_precision:
'no'` (float32/64 on CPU) and the port. `use_cpu: true` / `MULTI_CPU` would not do: `accelerate launch` then
starts ONE process (multi-CPU launches need mpirun); with the shipped `use_cpu: false` it starts torchrun, and
the training config's `use_cpu: true` makes each process a gloo (MULTI_CPU) rank.
DeepSpeed runs on CPU (its CPU accelerator, gloo). FSDP2 runs on CPU in torch (gloo), but accelerate applies an
FSDP plugin only on accelerators (`AcceleratorState` keeps `MULTI_CPU`, which never becomes `FSDP`, and preflight
refuses the combination for users); the FSDP tests put `tests/fsdp_on_cpu` on PYTHONPATH with
ARK_HF_FSDP_ON_CPU=1, which lifts exactly that refusal, so accelerate's and torch's FSDP code runs for real.

This file is also the worker of the gradient test: `accelerate launch tests/test_engines.py grads OUT MINI`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_config(name: str, folder: Path) -> Path:
    """The shipped `accelerate_configs/<name>.yaml` with only what 2 CPU processes require changed."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_port=_free_port())
    path = folder / f"{name}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FSDP_ON_CPU = {"PYTHONPATH": f"{ROOT / 'tests' / 'fsdp_on_cpu'}{os.pathsep}{ROOT}", "ARK_HF_FSDP_ON_CPU": "1"}


def _launch(config: Path, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")  # the console script of this environment
    command = [str(accelerate), "launch", "--config_file", str(config), script, *args]
    env = {**ENV, **FSDP_ON_CPU} if config.name.startswith("fsdp") else ENV
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from ark_hf.assets import load_faq

    rows = load_faq("en")[:16]
    path = tmp_path_factory.mktemp("engines_data") / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"query": r["q"], "pos": [r["a"]], "neg": [rows[(i + 1) % len(rows)]["a"]]}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    return path


RECIPE_ARGS = {
    "bge_m3": ["--config", str(ROOT / "recipes/configs/bge_m3_cpu_demo.yaml"), "--eval_modes", "dense"],
    "qwen3_embedding": [
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--query_max_len",
        "32",
        "--passage_max_len",
        "64",
    ],
}


def _recipe(engine: str, recipe: str, model: str, train_file: Path, out: Path, tmp: Path) -> dict:
    """Two GradCache steps of a recipe under an engine; a checkpoint at step 2 and the final save."""
    _launch(
        cpu_config(engine, tmp),
        str(ROOT / "recipes" / f"{recipe}.py"),
        *RECIPE_ARGS[recipe],
        "--model_name_or_path", model, "--train_data", str(train_file), "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--train_group_size", "2", "--mini_batch_size", "3",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
    )  # fmt: skip
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "checkpoint-2" / "rng_state_1.pth").is_file()  # two processes ran
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
    return state


# ------------------------------------------------------------------------------------------------ FSDP wrap
@pytest.mark.parametrize("kind", ["bge", "qwen"])
def test_fsdp_wrap_policy_finds_the_layer_classes(kind, tiny_xlmr_path, tiny_qwen3_path):
    """accelerate's TRANSFORMER_BASED_WRAP, configured from fsdp.yaml, resolves the backbone's layer classes."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from ark_hf.models.bge_m3 import BGEM3Model
    from ark_hf.models.decoder import DecoderEmbedder

    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "bge":
        model, layer = BGEM3Model(tiny_xlmr_path, init_missing_heads=True), "XLMRobertaLayer"
    else:
        model, layer = DecoderEmbedder(tiny_qwen3_path), "Qwen3DecoderLayer"
    assert layer in model._no_split_modules
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower()
    )
    plugin.set_auto_wrap_policy(model)  # FSDP1's path
    classes = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert layer in classes
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy=transformer_auto_wrap_policy)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # FSDP2's path (fsdp.yaml)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    n_layers = model.config.num_hidden_layers
    assert sum(type(m).__name__ == layer for _, m in model.named_modules() if policy(m)) == n_layers, wrapped


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.parametrize("recipe", ["bge_m3"])  # Qwen3 under DDP: the LoRA test below (every engine)
def test_recipe_under_ddp_with_gradcache(recipe, train_file, tiny_xlmr_path, tiny_qwen3_path, tmp_path):
    from ark_hf import BGEM3Model
    from ark_hf.models.decoder import DecoderEmbedder

    model = tiny_xlmr_path if recipe == "bge_m3" else tiny_qwen3_path
    out = tmp_path / "out"
    _recipe("multi_gpu", recipe, model, train_file, out, tmp_path)
    if recipe == "bge_m3":
        assert BGEM3Model.from_pretrained(str(out)).heads_trained
    else:
        DecoderEmbedder(str(out))


# ------------------------------------------------------------------------------------------------ DeepSpeed
# Qwen3 full fine-tuning under ZeRO-3 (sharded parameters); Qwen3 under ZeRO-2: the LoRA test below
@pytest.mark.parametrize(
    ("recipe", "engine"),
    [("bge_m3", "deepspeed_zero2"), ("bge_m3", "deepspeed_zero3"), ("qwen3_embedding", "deepspeed_zero3")],
)
def test_recipe_under_deepspeed_with_gradcache(engine, recipe, train_file, tiny_xlmr_path, tiny_qwen3_path, tmp_path):
    pytest.importorskip("deepspeed")
    from ark_hf.models.decoder import DecoderEmbedder

    model = tiny_xlmr_path if recipe == "bge_m3" else tiny_qwen3_path
    out = tmp_path / "out"
    _recipe(engine, recipe, model, train_file, out, tmp_path)
    if recipe == "qwen3_embedding":
        reloaded = DecoderEmbedder(str(out))
        start = DecoderEmbedder(model)
        moved = [
            not torch.equal(a, b)
            for a, b in zip(reloaded.backbone.state_dict().values(), start.backbone.state_dict().values())
        ]
        assert any(moved)  # the saved weights are the trained ones, gathered from the shards
        return
    _check_flag_embedding_loads_trained_heads(out, tiny_xlmr_path)


# ------------------------------------------------------------------------------------------------ FSDP
@pytest.mark.parametrize("recipe", ["bge_m3", "qwen3_embedding"])
def test_recipe_under_fsdp_with_gradcache(recipe, train_file, tiny_xlmr_path, tiny_qwen3_path, tmp_path):
    """fsdp.yaml (FSDP2, full shard, layers wrapped): GradCache trains, the checkpoint holds FSDP's own files, and
    the final folder (gathered on rank 0, written by rank 0 only) loads with the trained weights."""
    from ark_hf.models.decoder import DecoderEmbedder

    model = tiny_xlmr_path if recipe == "bge_m3" else tiny_qwen3_path
    out = tmp_path / "out"
    _recipe("fsdp", recipe, model, train_file, out, tmp_path)
    assert (out / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # FSDP's save path ran: it was sharded
    if recipe == "bge_m3":
        _check_flag_embedding_loads_trained_heads(out, tiny_xlmr_path)
        return
    reloaded, start = DecoderEmbedder(str(out)), DecoderEmbedder(model)
    pairs = zip(reloaded.backbone.state_dict().values(), start.backbone.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in pairs)


# ------------------------------------------------------------------------------------------------ LoRA, every engine
def test_lora_with_gradcache_trains_and_saves_the_same_under_every_engine(train_file, tiny_qwen3_path, tmp_path):
    """Qwen3 + LoRA + GradCache + gradient checkpointing, 2 processes: DDP, FSDP2 and ZeRO-3 log the same losses and gradient norms
    (each engine reduces once; the seeded LoRA init is the same on every rank and launch) and write the same merged
    weights and adapter (gathered from the shards, written by rank 0)."""
    from safetensors.torch import load_file

    logged, merged, adapters = {}, {}, {}
    # ZeRO-2 passes too (add it here, ~30 s more); the GPU check trains, saves and reloads Qwen3 + LoRA under it
    for engine in ("multi_gpu", "fsdp", "deepspeed_zero3"):
        if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            continue
        out = tmp_path / engine
        _launch(
            cpu_config(engine, tmp_path), str(ROOT / "recipes" / "qwen3_embedding.py"), *RECIPE_ARGS["qwen3_embedding"],
            "--model_name_or_path", tiny_qwen3_path, "--train_data", str(train_file), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--train_group_size", "2", "--mini_batch_size", "3",
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
            "--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
            "--gradient_checkpointing", "true",
        )  # fmt: skip
        history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        logged[engine] = [value for h in history if "loss" in h for value in (h["loss"], h["grad_norm"])]
        merged[engine] = load_file(out / "model.safetensors")
        adapters[engine] = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    reference = "multi_gpu"
    assert len(logged[reference]) == 4 and adapters[reference]  # loss and grad norm at steps 1 and 2
    for engine in logged:
        assert logged[engine] == pytest.approx(logged[reference], rel=1e-4), engine
        for saved in (merged, adapters):
            assert saved[engine].keys() == saved[reference].keys(), engine
            for key, value in saved[reference].items():
                torch.testing.assert_close(saved[engine][key], value, rtol=1e-4, atol=1e-6, msg=f"{engine} {key}")


def _check_flag_embedding_loads_trained_heads(out: Path, start_path: str) -> None:
    """The saved folder loads in FlagEmbedding; its heads are the trained ones (not fresh, not partial)."""
    flag_embedding = pytest.importorskip("FlagEmbedding")
    from ark_hf import BGEM3Model

    ours = BGEM3Model.from_pretrained(str(out))
    assert ours.heads_trained
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        state = torch.load(out / name, map_location="cpu")
        assert all(v.numel() > 0 and torch.isfinite(v).all() for v in state.values()), name
    torch.manual_seed(0)  # the same seed gives the same fresh heads: the saved ones must differ from them
    fresh = BGEM3Model(start_path, init_missing_heads=True)
    assert not torch.equal(ours.colbert_linear.weight, fresh.colbert_linear.weight)
    flag = flag_embedding.BGEM3FlagModel(str(out), use_fp16=False, devices="cpu", pooling_method="mean")
    texts = ["how do I renew a building permit", "A building permit can be renewed online before it expires."]
    theirs = flag.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=32)
    mine = ours.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=32)
    torch.testing.assert_close(
        torch.as_tensor(theirs["dense_vecs"]).float(), torch.as_tensor(mine["dense_vecs"]).float(), atol=1e-5, rtol=0
    )
    for a, b in zip(theirs["colbert_vecs"], mine["colbert_vecs"]):
        torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=1e-5, rtol=0)


# FSDP2: its own checkpoint files and sharded optimizer state, over the same sharded data loader as DDP (whose resume
# passes too: add "multi_gpu", ~1 min; ZeRO-2, ~2 min), kept out of the suite's time
@pytest.mark.parametrize("engine", ["fsdp"])
def test_resume_under_an_engine_reproduces_the_uninterrupted_losses(engine, train_file, tiny_xlmr_path, tmp_path):
    """4 GradCache steps under 2 processes, checkpoints at 2 and 4; a second launch resumes from checkpoint-2 (model,
    optimizer, scheduler, each rank's RNG, the sampler's position) and logs the same losses at steps 3 and 4."""
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    common = [
        *RECIPE_ARGS["bge_m3"], "--model_name_or_path", tiny_xlmr_path, "--train_data", str(train_file),
        "--max_steps", "4", "--per_device_train_batch_size", "2", "--train_group_size", "2", "--mini_batch_size", "3",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
    ]  # fmt: skip
    script = str(ROOT / "recipes" / "bge_m3.py")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(cpu_config(engine, tmp_path), script, *common, "--output_dir", str(full))
    _launch(
        cpu_config(engine, tmp_path), script, *common, "--output_dir", str(resumed),
        "--resume_from_checkpoint", str(full / "checkpoint-2"),
    )  # fmt: skip

    def losses(folder: Path) -> dict[int, float]:
        state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    expected, got = losses(full), losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (step, got, expected)


# ------------------------------------------------------------------------------------------------ gradients
def _grads_worker(out: str, mini_batch_size: int) -> None:
    """One optimizer step of BGETrainer (float64, no dropout) under the launcher; each rank saves the gradients
    the optimizer sees (after DDP's reduction)."""
    from transformers import TrainerCallback

    from ark_hf import BGETrainer, BGETrainerConfig
    from ark_hf.models.bge_m3 import BGEM3Model

    data, model_path = json.loads(Path(out, "inputs.json").read_text())
    torch.manual_seed(0)
    model = BGEM3Model(model_path, init_missing_heads=True, pooling="mean").double()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    grads: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, param in model.named_parameters():
                if param.grad is not None:
                    grads[name.removeprefix("module.")] = param.grad.detach().clone()

    args = BGETrainerConfig(
        output_dir=str(Path(out, f"run{mini_batch_size}")), use_cpu=True, report_to="none", save_strategy="no",
        max_steps=1, per_device_train_batch_size=3, train_group_size=2, query_max_len=16, passage_max_len=24,
        unified_finetuning=True, use_self_distill=True, negatives_cross_device=True, learning_rate=1e-3,
        mini_batch_size=mini_batch_size or None, sentence_pooling_method="mean", seed=0, max_grad_norm=0.0,
    )  # fmt: skip
    trainer = BGETrainer(model=model, args=args, train_dataset=data, callbacks=[Capture()])
    trainer.train()
    rank = trainer.accelerator.process_index
    assert trainer.accelerator.num_processes == 2
    torch.save(grads, Path(out, f"grads{mini_batch_size}_rank{rank}.pt"))


@pytest.mark.slow  # two launches, ~50 s
def test_gradcache_under_ddp_reduces_once(train_file, tiny_xlmr_path, tmp_path):
    """GradCache + DDP (gloo, 2 processes): the optimizer's gradients equal the uncached run's, on both ranks."""
    records = [json.loads(line) for line in train_file.read_text().splitlines()][:6]
    (tmp_path / "inputs.json").write_text(json.dumps([records, tiny_xlmr_path]))
    config = cpu_config("multi_gpu", tmp_path)
    for mini in (0, 2):
        _launch(config, __file__, "grads", str(tmp_path), str(mini))
    runs = {(mini, rank): torch.load(tmp_path / f"grads{mini}_rank{rank}.pt") for mini in (0, 2) for rank in (0, 1)}
    reference = runs[(0, 0)]
    assert len(reference) > 10 and any(g.abs().sum() > 0 for g in reference.values())
    assert all(g.dtype == torch.float64 for g in reference.values())
    for key, got in runs.items():
        assert got.keys() == reference.keys(), key
        for name in reference:  # the same on both ranks (reduced) and cached == uncached (reduced once)
            torch.testing.assert_close(got[name], reference[name], rtol=1e-8, atol=1e-10, msg=f"{key} {name}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "grads":
    _grads_worker(sys.argv[2], int(sys.argv[3]))
