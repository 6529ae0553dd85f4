"""accelerate_configs/multi_node_ddp.yaml as 2 "machines" of 1 process each on this host (loopback, gloo), and the
checks `python -m ark_hf.launch` makes before anything starts.

The two machines are two `python -m ark_hf.launch --machine_rank 0/1` commands (each `accelerate launch`, so each
its own torchrun agent) meeting at 127.0.0.1. They must log the same losses as the single-machine 2-process run
(`multi_gpu.yaml`) and write one complete model folder. All three launches run at once.

This file is also the worker: `... tests/test_multi_node.py worker OUT MODEL DATA`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(name: str, folder: Path, **changes) -> Path:
    """A shipped config with what this host needs changed: CPU precision, the port, and what `changes` say."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config.update(mixed_precision="no", main_process_port=_free_port(), **changes)
    path = folder / f"{name}_{config['main_process_port']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(config: Path, *flags: str, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "ark_hf.launch", "--config_file", str(config), *flags, __file__, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)


def _worker(out: str, model: str, data: str) -> None:
    """Two BGE-M3 unified + self-distill steps (cross-device negatives), the final save, each rank's losses."""
    from ark_hf import BGETrainer, BGETrainerConfig
    from ark_hf.utils.preflight import preflight

    config = BGETrainerConfig(
        output_dir=out, model_name_or_path=model, train_data=[data], use_cpu=True, report_to="none", max_steps=2,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=16, passage_max_len=32,
        unified_finetuning=True, use_self_distill=True, negatives_cross_device=True, init_missing_heads=True,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    records = preflight(config, BGETrainer)
    trainer = BGETrainer(args=config, train_dataset=records)
    trainer.train()
    trainer.save_model()
    rank = trainer.accelerator.process_index
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "rank": rank,
              "world": trainer.accelerator.num_processes, "machine": int(os.environ["GROUP_RANK"])}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from ark_hf.assets import load_faq

    rows = load_faq("en")[:8]
    path = tmp_path_factory.mktemp("multi_node_data") / "train.jsonl"
    path.write_text("".join(json.dumps({"query": r["q"], "pos": [r["a"]], "neg": [rows[(i + 1) % 8]["a"]]}) + "\n"
                            for i, r in enumerate(rows)))  # fmt: skip
    return path


@pytest.mark.slow
def test_two_machines_train_like_one_machine_with_two_processes(train_file, tiny_xlmr_path, tmp_path):
    from safetensors.torch import load_file

    from ark_hf import BGEM3Model

    one, two = tmp_path / "one_machine", tmp_path / "two_machines"
    nodes = _config("multi_node_ddp", tmp_path, main_process_ip="127.0.0.1", num_processes=2)
    runs = [
        _launch(_config("multi_gpu", tmp_path, num_processes=2), args=["worker", str(one), tiny_xlmr_path,
                                                                         str(train_file)]),  # fmt: skip
        *(_launch(nodes, "--machine_rank", str(r), args=["worker", str(two), tiny_xlmr_path, str(train_file)])
          for r in (0, 1)),
    ]  # fmt: skip
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-4000:]
    results = {(folder.name, r): json.loads((folder / f"rank{r}.json").read_text()) for folder in (one, two)
               for r in (0, 1)}  # fmt: skip
    assert {results[("two_machines", r)]["machine"] for r in (0, 1)} == {0, 1}  # one rank on each machine
    assert {results[("one_machine", r)]["machine"] for r in (0, 1)} == {0}
    reference = results[("one_machine", 0)]["losses"]
    assert len(reference) == 2 and all(v > 0 for v in reference)
    for key, result in results.items():
        assert result["world"] == 2, key
        assert result["losses"] == pytest.approx(reference, rel=1e-6), key
    # one complete save, written once, equal to the single-machine run's
    for name in ("model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "config.json", "tokenizer.json"):
        assert (two / name).is_file(), name
    assert BGEM3Model.from_pretrained(str(two)).heads_trained
    saved, expected = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert (saved[key] - value).abs().max() <= 1e-6, key


@pytest.mark.slow
def test_a_missing_main_process_ip_is_refused_before_anything_starts(tmp_path):
    """Plain `accelerate launch` waits without end here (torch's rendezvous looks for host 'None')."""
    config = _config("multi_node_ddp", tmp_path, num_processes=2)
    run = _launch(config, "--machine_rank", "0", args=["worker", str(tmp_path / "never"), "model", "data"])
    output = run.communicate(timeout=120)[0]
    assert run.returncode != 0, output[-2000:]
    assert re.search(rf"{config.name}: key 'main_process_ip' is missing: with num_machines: 2", output), output
    assert not (tmp_path / "never").exists()  # no worker started


@pytest.mark.parametrize(
    ("changes", "flags", "match"),
    [
        ({"machine_rank": 2}, [], r"multi_node_ddp_\d+\.yaml: key 'machine_rank' is 2, outside num_machines: 2"),
        ({}, ["--machine_rank", "2"], r"--machine_rank \(on the accelerate launch command line\) is 2, outside"),
        ({"num_machines": 3}, ["--machine_rank", "1"], r"key 'num_processes' is 2: .* multiple of num_machines \(3\)"),
    ],
)  # fmt: skip
def test_a_machine_rank_outside_num_machines_is_refused(tmp_path, changes, flags, match):
    from ark_hf.launch import main

    config = _config("multi_node_ddp", tmp_path, num_processes=2, main_process_ip="127.0.0.1", **changes)
    with pytest.raises(SystemExit, match=match):
        main(["--config_file", str(config), *flags, __file__, "worker", str(tmp_path / "never"), "model", "data"])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("name", ["multi_node_ddp", "multi_node_zero2", "multi_node_zero3"])
def test_shipped_multi_node_configs_name_the_keys_a_user_edits(name):
    from ark_hf.utils.cli import ConfigError
    from ark_hf.utils.preflight import check_accelerate_config_file

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    config = yaml.safe_load(text)
    assert config["num_machines"] == 2 and config["num_processes"] % 2 == 0 and config["machine_rank"] == 0
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for key in ("main_process_ip", "main_process_port", "machine_rank", "num_machines", "num_processes"):
        assert key in comments and key in config, key
    with pytest.raises(ConfigError, match="main_process_ip' is missing"):  # the address is the user's to give
        check_accelerate_config_file(path)
    edited = check_accelerate_config_file(path, {"main_process_ip": "10.1.2.3", "machine_rank": 1})
    assert edited["machine_rank"] == 1
    with pytest.raises(ConfigError, match=r"--num_processes .* multiple of num_machines \(2\)"):
        check_accelerate_config_file(path, {"main_process_ip": "10.1.2.3", "num_processes": 3})


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(*sys.argv[2:5])
