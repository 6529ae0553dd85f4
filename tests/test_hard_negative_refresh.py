"""`HardNegativeRefresh`: hard negatives re-mined with the model being trained (ark_hf/callbacks/hard_negatives.py).

A refresh with a frozen model gives exactly the negatives of offline mining (`ark_hf.mining`); with a trained model
the negatives change, never hold a positive, nor a candidate the teacher scored at or above the positive; a run
killed after a checkpoint and resumed trains on the negatives of the uninterrupted run; two DDP processes hold the
same negatives; bad input is refused before any weights load.

This file is also the worker of the DDP test: `accelerate launch tests/test_hard_negative_refresh.py ddp OUT ...`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ark_hf import BGEM3Model, BGETrainer, BGETrainerConfig, HardNegativeRefresh  # noqa: E402
from ark_hf.assets import load_faq  # noqa: E402
from ark_hf.callbacks.hard_negatives import content_key  # noqa: E402
from ark_hf.mining import mine_hard_negatives  # noqa: E402

N_RECORDS, N_CORPUS = 16, 48
# a tiny random model scores every text alike (cosines near 1), so the margin that suits it is absolute: nothing
# scoring above the positive
MINING = {"num_negatives": 3, "range_max": 12, "absolute_margin": 0.0}


def faq_data() -> tuple[list[dict], list[str]]:
    """16 FAQ question -> answer records, and a corpus of 48 answers that holds their positives."""
    rows = load_faq("en")[:N_CORPUS]
    records = [{"query": r["q"], "pos": [r["a"]]} for r in rows[:N_RECORDS]]
    return records, [r["a"] for r in rows]


def make_config(out: Path, **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(out), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=4, train_group_size=4, query_max_len=16, passage_max_len=32,
        max_steps=2, logging_steps=1, learning_rate=1e-3, seed=5, unified_finetuning=False,
        dataloader_drop_last=True,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


def make_model(path: str) -> BGEM3Model:
    torch.manual_seed(0)
    return BGEM3Model(path, unified_finetuning=False, init_missing_heads=True)


def negatives_of(trainer) -> list[list[str]]:
    return [list(record["neg"]) for record in trainer.train_dataset.records]


def negatives_after_first_refresh(refresh: HardNegativeRefresh, trainer) -> list[list[str]]:
    """A list that the refresh at step 0 fills with the negatives it hands to the dataset."""
    captured: list[list[str]] = []
    original = refresh.refresh

    def capture(model, step):
        metrics = original(model, step)
        if step == 0:
            captured.extend(negatives_of(trainer))
        return metrics

    refresh.refresh = capture
    return captured


def refresh_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "hard_negatives/seconds" in h]


def write_corpus(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, tiny_xlmr_path) -> str:
    """A tiny random cross-encoder (sequence classification, 1 label) with the real XLM-R tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_xlmr_path, num_labels=1)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("teacher") / "cross_encoder"
    XLMRobertaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_xlmr_path).save_pretrained(folder)
    return str(folder)


def test_refresh_with_a_frozen_model_reproduces_offline_mining(tiny_xlmr_path, tmp_path):
    records, corpus = faq_data()
    model = make_model(tiny_xlmr_path)
    offline = mine_hard_negatives(
        records, model, corpus=corpus, query_max_len=16, passage_max_len=32, show_progress_bar=False, **MINING
    )
    refresh = HardNegativeRefresh(every_n_steps=1, at_start=True, corpus=corpus, **MINING)
    config = make_config(tmp_path / "frozen", learning_rate=0.0)  # the model does not move
    trainer = BGETrainer(model=model, config=config, train_dataset=records, callbacks=[refresh])
    trainer.train()
    expected = [out["neg"] for out in offline.records]
    assert negatives_of(trainer) == expected
    assert any(expected)
    logs = refresh_logs(trainer)
    assert [h["step"] for h in logs] == [0, 1]  # at start, after step 1 (not after the last step)
    for entry in logs:
        assert entry["hard_negatives/corpus"] == N_CORPUS
        assert entry["hard_negatives/teacher_filtered"] == 0
        assert entry["hard_negatives/seconds"] > 0
        assert 0 < entry["hard_negatives/full_group_share"] <= 1
        assert entry["hard_negatives/margin"] > 0  # the margin keeps negatives below the positive
    assert logs[1]["hard_negatives/changed_share"] == 0  # same model, same negatives
    # a refresh's own log line does not swallow its step's loss line
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]


@pytest.mark.slow
def test_trained_model_changes_negatives_never_a_positive_nor_a_teacher_filtered_text(
    tiny_xlmr_path, teacher_path, tmp_path
):
    from ark_hf.models.teacher import TeacherScorer

    records, corpus = faq_data()
    # two records share a query: their positives are both positives of that query, never its negatives
    records.append({"query": records[0]["query"], "pos": [records[1]["pos"][0]]})
    refresh = HardNegativeRefresh(
        every_n_steps=3, at_start=True, corpus=corpus, num_negatives=3, range_max=24, teacher=teacher_path
    )
    config = make_config(tmp_path / "trained", max_steps=4, learning_rate=2e-3)
    trainer = BGETrainer(model=make_model(tiny_xlmr_path), config=config, train_dataset=records, callbacks=[refresh])
    start_negatives = negatives_after_first_refresh(refresh, trainer)
    trainer.train()
    final = negatives_of(trainer)
    logs = refresh_logs(trainer)
    assert [h["step"] for h in logs] == [0, 3]
    assert final != start_negatives and logs[1]["hard_negatives/changed_share"] > 0
    assert sum(h["hard_negatives/teacher_filtered"] for h in logs) > 0

    positives_of: dict[str, set[str]] = {}
    for record in records:
        positives_of.setdefault(record["query"], set()).update(content_key(p) for p in record["pos"])
    teacher = TeacherScorer(teacher_path)
    for record, negatives in zip(records, final):
        assert not {content_key(n) for n in negatives} & positives_of[record["query"]]
        assert content_key(record["query"]) not in {content_key(n) for n in negatives}
        if negatives:
            scores = teacher.score([record["query"]], list(record["pos"]) + negatives)[0].tolist()
            assert max(scores[len(record["pos"]) :]) < min(scores[: len(record["pos"])])


@pytest.mark.slow
def test_qwen3_recipe_with_gradcache_and_padding_free(tiny_qwen3_path, tmp_path):
    """The decoder recipe (`create_qwen_trainer`, instructions on the queries) with GradCache mini-batches and the
    packed backbone (the CPU reference kernel): refreshes run, hand full groups to the sampler, never a positive,
    and the training stays finite."""
    from ark_hf import create_qwen_trainer

    records, corpus = faq_data()
    refresh = HardNegativeRefresh(every_n_steps=1, at_start=True, corpus=corpus, **MINING)
    trainer = create_qwen_trainer(
        train_dataset=records, output_dir=str(tmp_path / "qwen"), callbacks=[refresh], model_name_or_path=tiny_qwen3_path,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
        train_group_size=4, query_max_len=16, passage_max_len=32, max_steps=3, logging_steps=1, learning_rate=2e-3,
        seed=5, mini_batch_size=4, padding_free="true", gradient_checkpointing=False, torch_dtype="float32",
    )  # fmt: skip
    assert trainer.model.padding_free and trainer.grad_cache is not None
    trainer.train()
    logs = refresh_logs(trainer)
    assert [h["step"] for h in logs] == [0, 1, 2]
    assert all(h["hard_negatives/full_group_share"] > 0 for h in logs)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for record, negatives in zip(records, negatives_of(trainer)):
        assert content_key(record["pos"][0]) not in {content_key(n) for n in negatives}


class _Kill(Exception):
    pass


@pytest.mark.slow  # three short trainings: about 30 s of CPU
def test_resume_after_a_kill_restores_the_negatives(tiny_xlmr_path, tmp_path):
    from transformers import TrainerCallback

    records, corpus = faq_data()
    corpus_file = write_corpus(tmp_path / "corpus.jsonl", corpus)
    settings = dict(
        max_steps=4, save_strategy="steps", save_steps=3, refresh_negatives="steps", refresh_negatives_steps=2,
        refresh_negatives_corpus=[corpus_file], refresh_negatives_num=3, refresh_negatives_range_max=12,
        refresh_negatives_relative_margin=None,
    )  # fmt: skip

    full = BGETrainer(
        model=make_model(tiny_xlmr_path), config=make_config(tmp_path / "full", **settings), train_dataset=records
    )
    full.train()
    expected = negatives_of(full)
    assert expected != [[] for _ in records]  # the step-2 refresh (the only one: step 4 is the last) mined them

    class KillAfterCheckpoint(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:  # checkpoint-3 is on disk, step 4 never runs
                raise _Kill

    out = tmp_path / "killed"
    killed = BGETrainer(
        model=make_model(tiny_xlmr_path),
        config=make_config(out, **settings),
        train_dataset=[dict(r) for r in records],
        callbacks=[KillAfterCheckpoint()],
    )
    with pytest.raises(_Kill):
        killed.train()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["HardNegativeRefresh"]["attributes"]
    assert saved["last_refresh_step"] == 2

    resumed = BGETrainer(
        model=make_model(tiny_xlmr_path),
        config=make_config(out, overwrite_output_dir=True, **settings),
        train_dataset=[dict(r) for r in records],
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert [h["step"] for h in refresh_logs(resumed)] == [2]  # the checkpoint's history; restored, not re-mined
    assert negatives_of(resumed) == expected


@pytest.mark.slow
def test_bad_input_is_refused_before_weights_load(tiny_xlmr_path, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaForSequenceClassification

    def no_weights(self, args):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(BGETrainer, "build_model", no_weights)
    records, corpus = faq_data()
    common = dict(model_name_or_path=tiny_xlmr_path, refresh_negatives="epoch")

    lacking = write_corpus(tmp_path / "lacking.jsonl", corpus[N_RECORDS - 1 :])  # 15 of 16 positives missing
    config = make_config(tmp_path / "a", refresh_negatives_corpus=[lacking], **common)
    with pytest.raises(ValueError, match=r"lacks 15 training positive\(s\)"):
        BGETrainer(config=config, train_dataset=records)

    with pytest.raises(ValueError, match="refresh_negatives_steps must be >= 1, got 0"):
        make_config(tmp_path / "b", refresh_negatives="steps", refresh_negatives_steps=0)
    with pytest.raises(ValueError, match="every_n_steps .* must be >= 1, got 0"):
        HardNegativeRefresh(every_n_steps=0)

    # a teacher saved with a tokenizer larger than its embedding matrix (another model's tokenizer)
    teacher_config = AutoConfig.from_pretrained(tiny_xlmr_path, num_labels=1, vocab_size=1000)
    folder = tmp_path / "mismatched_teacher"
    XLMRobertaForSequenceClassification(teacher_config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_xlmr_path).save_pretrained(folder)
    config = make_config(tmp_path / "c", refresh_negatives_teacher=str(folder), **common)
    with pytest.raises(ValueError, match="does not belong to these weights"):
        BGETrainer(config=config, train_dataset=records)


# ------------------------------------------------------------------------------------------------ DDP (2 processes)


def _ddp_run(out: Path, model_path: str, batch: int) -> dict:
    """The refresh-every-step run the DDP test launches on 2 processes (`batch` queries each) and repeats in one
    process on the concatenated batch: dropout off and negatives from every process, so both compute the same
    loss; the learning rate moves the model, so later refreshes see a trained model."""
    records, corpus = faq_data()
    refresh = HardNegativeRefresh(every_n_steps=1, at_start=True, corpus=corpus, **MINING)
    config = make_config(out / f"run{batch}", learning_rate=2e-3, per_device_train_batch_size=batch, max_steps=3,
                         negatives_cross_device=True)  # fmt: skip
    model = make_model(model_path)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = BGETrainer(model=model, config=config, train_dataset=records, callbacks=[refresh])
    at_start = negatives_after_first_refresh(refresh, trainer)
    trainer.train()
    logs = [{k: v for k, v in h.items() if k != "hard_negatives/seconds"} for h in refresh_logs(trainer)]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"world": trainer.accelerator.num_processes, "rank": trainer.args.process_index, "at_start": at_start,
            "negatives": negatives_of(trainer), "logs": logs, "losses": losses}  # fmt: skip


@pytest.mark.slow
def test_ddp_processes_hold_the_same_negatives_and_losses(tiny_xlmr_path, tmp_path):
    """2 CPU processes (gloo, the shipped multi_gpu.yaml), a refresh at the start and after every step: each process
    embeds half the corpus; every rank holds the same negatives and refresh logs; one process on the concatenated
    batch mines the same negatives at the start and logs the same losses at every step."""
    from tests.test_engines import _launch, cpu_config

    _launch(cpu_config("multi_gpu", tmp_path), __file__, "ddp", str(tmp_path), tiny_xlmr_path)
    ranks = [json.loads((tmp_path / f"negatives_rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["negatives"] == ranks[1]["negatives"]
    assert ranks[0]["logs"] == ranks[1]["logs"] and [h["step"] for h in ranks[0]["logs"]] == [0, 1, 2]
    assert any(ranks[0]["negatives"]) and ranks[0]["logs"][2]["hard_negatives/changed_share"] > 0  # the model moved

    # one process on the concatenated batch: the same negatives from the same (untrained) model, the same losses.
    # Later refreshes are not compared text for text: the tiny random model scores every text within 1e-5 of the
    # others, so the float rounding of a 2-process all-reduce against a 1-process sum reorders near-ties
    single = _ddp_run(tmp_path / "single", tiny_xlmr_path, batch=4)
    assert single["world"] == 1 and single["at_start"] == ranks[0]["at_start"] and any(single["at_start"])
    assert single["logs"][0] == ranks[0]["logs"][0]
    assert len(single["losses"]) == 3 and ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-4)


def _ddp_worker(out: str, model_path: str) -> None:
    payload = _ddp_run(Path(out), model_path, batch=2)
    (Path(out) / f"negatives_rank{payload['rank']}.json").write_text(json.dumps(payload))
    # both ranks leave the process group together: a rank that exits while the other still tears down gloo aborts
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["ddp"]:
    torch.set_num_threads(1)
    _ddp_worker(sys.argv[2], sys.argv[3])
