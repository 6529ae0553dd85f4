"""The extension points: a user's loss through `loss=` in both trainers (and the README's example), no import
cycles, short loss hooks, and the private `Trainer` overrides pinned to the transformers version they follow."""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer, Trainer

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig, LossOutput, RetrievalLoss, create_qwen_trainer
from ark_hf.losses.base import RetrievalBatch
from ark_hf.trainer.atomic_save import OVERRIDDEN_SOURCE_HASHES, PINNED_TRANSFORMERS, AtomicSaveMixin, source_hash
from ark_hf.trainer.base import BaseRetrieverTrainer
from ark_hf.trainer.bge_trainer import BGETrainer as BGETrainerClass
from ark_hf.trainer.qwen_trainer import QwenTrainer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ark_hf"
QUICK = dict(use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=5)


class MarginLoss(RetrievalLoss):
    """A hinge on the dense scores: each query's positive should beat its hardest in-batch negative by 0.2."""

    heads = ("dense",)

    def compute(self, query, passages, batch: RetrievalBatch, step: int) -> LossOutput:
        scores = query.dense @ passages.dense.T
        targets = torch.arange(scores.size(0)) * batch.group_size
        positive = scores[torch.arange(scores.size(0)), targets]
        negatives = scores.scatter(1, targets[:, None], float("-inf"))
        hinge = F.relu(0.2 - positive + negatives.max(dim=1).values).mean()
        self.seen.append((float(hinge.detach()), batch.group_size, len(batch.record_ids)))
        return LossOutput(hinge, {"hinge": hinge.detach(), "positive_score": positive.mean().detach()})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, int, int]] = []


def records(n: int = 8) -> list[dict]:
    return [
        {"query": f"when is permit {i} ready", "pos": [f"Permit {i} is ready after {i + 2} weeks."],
         "neg": [f"Bins are collected on day {i}.", f"Pool {i} opens in June."]}
        for i in range(n)
    ]  # fmt: skip


def changed(model, before) -> int:
    return sum(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)


def check_custom_loss_run(trainer, loss: MarginLoss, group_size: int, batch_size: int) -> None:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2 and len(loss.seen) == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["hinge"] for h in logged] == pytest.approx([value for value, _, _ in loss.seen], rel=1e-5)
    assert all(math.isfinite(h["positive_score"]) for h in logged)
    assert {(g, n) for _, g, n in loss.seen} == {(group_size, batch_size)}
    assert changed(trainer.model, before) > 0


def test_custom_loss_trains_in_bge_trainer(tiny_xlmr_path, tmp_path):
    torch.manual_seed(0)
    model = BGEM3Model(
        tiny_xlmr_path, tokenizer=AutoTokenizer.from_pretrained(tiny_xlmr_path), init_missing_heads=True
    )
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, train_group_size=3, max_steps=2,
        learning_rate=1e-3, unified_finetuning=False, query_max_len=12, passage_max_len=16, **QUICK,
    )  # fmt: skip
    loss = MarginLoss()
    trainer = BGETrainer(model=model, args=config, train_dataset=records(), loss=loss)
    assert trainer.loss is loss
    check_custom_loss_run(trainer, loss, group_size=3, batch_size=4)


def test_custom_loss_trains_in_qwen_trainer(tiny_qwen3_path, tmp_path):
    loss = MarginLoss()
    torch.manual_seed(0)
    trainer = create_qwen_trainer(
        output_dir=str(tmp_path / "out"), train_dataset=records(), model_name_or_path=tiny_qwen3_path,
        per_device_train_batch_size=4, train_group_size=2, max_steps=2, learning_rate=1e-3, loss=loss, **QUICK,
    )  # fmt: skip
    assert isinstance(trainer, QwenTrainer) and trainer.loss is loss
    check_custom_loss_run(trainer, loss, group_size=2, batch_size=4)


def test_readme_custom_loss_example_runs(tiny_xlmr_path, tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Extending ark_hf") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    torch.manual_seed(0)
    namespace = {
        "model": BGEM3Model(
            tiny_xlmr_path, tokenizer=AutoTokenizer.from_pretrained(tiny_xlmr_path), init_missing_heads=True
        ),
        "config": BGETrainerConfig(
            output_dir=str(tmp_path / "out"), train_data=[write_jsonl(tmp_path / "train.jsonl")],
            per_device_train_batch_size=4, train_group_size=2, max_steps=2, unified_finetuning=False,
            query_max_len=12, passage_max_len=16, **QUICK,
        ),
    }  # fmt: skip
    exec(compile(code, "README.md", "exec"), namespace)
    logged = [h for h in namespace["trainer"].state.log_history if "loss" in h]
    assert len(logged) == 2 and all("align" in h and "uniform" in h for h in logged)
    assert all(h["loss"] == pytest.approx(h["align"] + h["uniform"], abs=1e-4) for h in logged)


def write_jsonl(path: Path) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records()), encoding="utf-8")
    return str(path)


def test_a_loss_that_is_not_a_retrieval_loss_is_refused(tiny_xlmr_path, tmp_path):
    config = BGETrainerConfig(output_dir=str(tmp_path / "out"), max_steps=1, **QUICK)
    with pytest.raises(TypeError, match="RetrievalLoss"):
        BGETrainer(model=None, args=config, train_dataset=records(), loss=torch.nn.MSELoss())


def test_stage_options_go_through_the_loss():
    from ark_hf.losses.m3 import M3Loss
    from ark_hf.losses.matryoshka import MatryoshkaLoss
    from ark_hf.losses.qwen3 import Qwen3InfoNCELoss

    with pytest.raises(ValueError, match="M3Loss has no option 'temperature'"):
        M3Loss().update_options(temperature=0.1)
    loss = MatryoshkaLoss(Qwen3InfoNCELoss(temperature=0.1), dims=[4, 8])
    loss.update_options(temperature=0.05)
    assert loss.loss.options["temperature"] == 0.05
    loss.update_options(use_qq=False)  # not cumulative: each stage starts from the constructor's options
    assert loss.loss.options["temperature"] == 0.1 and loss.loss.options["use_qq"] is False
    with pytest.raises(ValueError, match="must be float"):
        loss.update_options(temperature="cold")
    with pytest.raises(ValueError, match="no negatives"):
        loss.check_stage_options({"in_batch_negatives": False}, train_group_size=1, where="stage 'a'")


# ------------------------------------------------------------------------------------------------ structure
def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    """ark_hf modules a file imports anywhere (functions included); those under `if TYPE_CHECKING:` only when
    `type_checking` (a type checker follows them, and they say the two modules know each other)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):
        if not type_checking and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_cycles(type_checking: bool = False) -> list[tuple[str, str]]:
    """(module, imported module that leads back to it) for every edge of an import cycle in the package."""
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in files}
    graph = {module_name(path): imported_modules(path, known, type_checking) - {module_name(path)} for path in files}

    def reaches(start: str, target: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            node = stack.pop()
            for nxt in graph[node]:
                if nxt == target:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    return sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))


def test_no_module_imports_one_that_imports_it_back():
    cycles = import_cycles()
    assert not cycles, f"import cycles (module, imported module that leads back): {cycles}"


def test_no_import_cycle_through_type_checking_imports_either():
    cycles = import_cycles(type_checking=True)
    assert not cycles, f"import cycles with TYPE_CHECKING imports (module, imported module that leads back): {cycles}"


def test_import_cycle_finder_sees_type_checking_imports():
    """The finder is not blind: the package's TYPE_CHECKING imports are edges exactly when asked for."""
    init = PACKAGE / "__init__.py"
    known = {"ark_hf.callbacks.curriculum", "ark_hf.models.bge_m3"}
    assert imported_modules(init, known) == set()
    assert imported_modules(init, known, type_checking=True) == known


def test_every_module_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "__main__.py":  # the command's entry point runs the command when imported
            importlib.import_module(module_name(path))


def test_public_names_resolve():
    import ark_hf

    for name in ark_hf.__all__:
        assert getattr(ark_hf, name).__name__ == name


@pytest.mark.parametrize(
    "method",
    [BaseRetrieverTrainer.compute_loss, BGETrainerClass.build_loss, BGETrainerClass.retrieval_batch,
     QwenTrainer.build_loss],
    ids=lambda m: m.__qualname__,
)  # fmt: skip
def test_loss_hooks_are_short(method):
    assert len(inspect.getsource(method).splitlines()) <= 30


def test_private_trainer_overrides_match_the_pinned_transformers():
    """Fails loudly when transformers changes a method that AtomicSaveMixin overrides: re-read the override."""
    private = {name for name in vars(AtomicSaveMixin) if name.startswith("_") and not name.startswith("__")}
    assert private <= set(OVERRIDDEN_SOURCE_HASHES), (
        f"overrides without a pinned hash: {private - set(OVERRIDDEN_SOURCE_HASHES)}"
    )
    changed_methods = {
        name: source_hash(getattr(Trainer, name))
        for name in OVERRIDDEN_SOURCE_HASHES
        if source_hash(getattr(Trainer, name)) != OVERRIDDEN_SOURCE_HASHES[name]
    }
    assert not changed_methods, (
        f"transformers {transformers.__version__} changed Trainer methods that ark_hf overrides (written for "
        f"{PINNED_TRANSFORMERS}): {sorted(changed_methods)}; review ark_hf/trainer/atomic_save.py and update the hashes"
    )
    for cls in (BaseRetrieverTrainer, BGETrainerClass, QwenTrainer):
        own = {name for klass in cls.__mro__ if klass.__module__.startswith("ark_hf") and klass is not AtomicSaveMixin
               for name in vars(klass) if name.startswith("_") and not name.startswith("__")}  # fmt: skip
        overrides_of_trainer = {name for name in own if hasattr(Trainer, name)}
        assert not overrides_of_trainer, f"{cls.__name__} overrides private Trainer methods outside atomic_save.py"
