"""What a test builds does not depend on the tests that ran before it (conftest's seeding hooks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ark_hf import assets

pytest_plugins = ["pytester"]

INNER_TESTS = """
import pytest
import torch


@pytest.fixture(scope="module")
def weights():
    return torch.nn.Linear(4, 1).weight.detach().clone()


def test_consumes_random_state():
    torch.rand(1000)


def test_with_fixture(weights):
    print("DRAW fixture", weights.flatten().tolist(), "body", torch.rand(2).tolist())
"""


def _draws(pytester: pytest.Pytester, *node_ids: str) -> list[str]:
    result = pytester.runpytest_inprocess("-s", "-p", "no:randomly", "-p", "no:cacheprovider", *node_ids)
    result.assert_outcomes(passed=len(node_ids))
    return [line[line.index("DRAW") :] for line in result.outlines if "DRAW" in line]


def test_fixtures_and_test_bodies_draw_the_same_numbers_in_any_order(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER_TESTS)
    alone = _draws(pytester, "test_inner.py::test_with_fixture")
    after = _draws(pytester, "test_inner.py::test_consumes_random_state", "test_inner.py::test_with_fixture")
    before = _draws(pytester, "test_inner.py::test_with_fixture", "test_inner.py::test_consumes_random_state")
    assert len(alone) == 1
    assert alone == after == before


def test_tiny_model_builder_is_seeded_and_leaves_the_callers_random_state(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = assets.build_tiny_xlmr(tmp_path / "a", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(1000)
    second = assets.build_tiny_xlmr(tmp_path / "b", seed=0)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
