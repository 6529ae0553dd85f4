"""Every Python block of README.md and docs/*.md marked runnable (a fence opened with "```python runnable") runs
as written: the Hub names it uses resolve to tiny models placed in a private Hugging Face cache, its data paths
to FAQ files, and the blocks of one file run in order in one interpreter (a later block may use an earlier
block's names). Documentation cannot drift from the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ark_hf import assets

pytestmark = pytest.mark.slow  # whole training runs of the documented examples; the full suite runs them

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python runnable[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {path: FENCE.findall(path.read_text(encoding="utf-8")) for path in DOCS}
RUNNABLE = {path: blocks for path, blocks in RUNNABLE.items() if blocks}


def _cache_model(cache: Path, repo_id: str, build) -> None:
    """Lay out `repo_id` as a downloaded snapshot in a Hugging Face cache folder (what an offline load reads)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    build(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def _tiny_m3(folder: Path) -> None:
    assets.build_tiny_xlmr(folder)
    hidden = 32
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), folder / "colbert_linear.pt")
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), folder / "sparse_linear.pt")


@pytest.fixture(scope="module")
def doc_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    cache = base / "hub"
    _cache_model(cache, "BAAI/bge-m3", _tiny_m3)
    _cache_model(cache, "Qwen/Qwen3-Embedding-0.6B", assets.build_tiny_qwen3)
    work = base / "work"
    assets.write_faq_jsonl(work / "data" / "train.jsonl", negatives=7, limit=8)
    assets.write_faq_jsonl(work / "data" / "dev.jsonl", limit=24)
    return cache, work


def test_the_docs_have_runnable_blocks():
    assert ROOT / "README.md" in RUNNABLE  # the quickstart is runnable: a broken marker would skip everything


@pytest.mark.parametrize("path", sorted(RUNNABLE), ids=lambda p: p.name)
def test_runnable_blocks_run_as_written(path, doc_world):
    cache, work = doc_world
    script = "\n\n".join(textwrap.dedent(block) for block in RUNNABLE[path])
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{path.name}:\n{script}\n--- stderr ---\n{result.stderr[-4000:]}"
