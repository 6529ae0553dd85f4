"""One loader for evaluation sets (`ark_hf.evaluation.data.load_eval_set`): every layout through every entry point
(the trainer's `eval_data`, preflight, `ark-hf eval`), and evaluation errors reported as evaluation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ark_hf import BGETrainer, BGETrainerConfig
from ark_hf.cli import main
from ark_hf.evaluation.data import load_eval_set
from ark_hf.evaluation.ir import EvalDataError
from ark_hf.utils.preflight import check_eval_data, preflight

QUERIES = {"q1": "what is a cat", "q2": "what is a dog"}
CORPUS = {"d1": "a cat is a small feline", "d2": "a dog is a loyal canine", "d3": "the sky is blue"}
QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}}
RECORDS = [
    {"query": "what is a cat", "pos": ["a cat is a small feline"], "neg": ["the sky is blue"]},
    {"query": "what is a dog", "pos": ["a dog is a loyal canine"], "neg": ["the sky is blue"]},
]


def write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in CORPUS.items())
    )
    queries = {**QUERIES, "q3": "a query judged only in dev"}
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    )
    header = "query-id\tcorpus-id\tscore\n"
    (folder / "qrels" / "test.tsv").write_text(header + "q1\td1\t1\nq2\td2\t1\n")
    (folder / "qrels" / "dev.tsv").write_text(header + "q3\td3\t1\n")
    return folder


def write_layout(tmp_path: Path, layout: str) -> Path:
    if layout == "json-object":
        path = tmp_path / "dev.json"
        path.write_text(json.dumps({"queries": QUERIES, "corpus": CORPUS, "qrels": QRELS}))
    elif layout == "json-array":
        path = tmp_path / "dev_records.json"
        path.write_text(json.dumps(RECORDS))
    elif layout == "jsonl":
        path = tmp_path / "dev.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        path = write_beir(tmp_path / "scifact")
    return path


LAYOUTS = ["json-object", "json-array", "jsonl", "beir"]


def signature(eval_set: tuple[dict, dict, dict]) -> tuple:
    """The set as texts (ids differ between layouts): {query text: {relevant document texts}}, corpus texts."""
    queries, corpus, qrels = eval_set
    relevant = {queries[q]: sorted(corpus[d] for d, r in docs.items() if r > 0) for q, docs in qrels.items()}
    return relevant, sorted(corpus.values())


EXPECTED = ({"what is a cat": ["a cat is a small feline"], "what is a dog": ["a dog is a loyal canine"]},
            sorted(CORPUS.values()))  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_set_in_the_loader_and_preflight(tmp_path, layout):
    path = write_layout(tmp_path, layout)
    assert signature(load_eval_set(path)) == EXPECTED
    assert signature(check_eval_data(path)) == EXPECTED


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reaches_the_trainers_evaluator(tmp_path, layout):
    path = write_layout(tmp_path, layout)
    config = BGETrainerConfig(output_dir=str(tmp_path / "out"), eval_data=str(path), use_cpu=True, report_to="none")
    evaluator = BGETrainer.build_evaluator(BGETrainer.__new__(BGETrainer), config)
    relevant = {evaluator.queries[i]: sorted(evaluator.corpus[evaluator.doc_ids.index(d)] for d in evaluator.qrels[q])
                for i, q in enumerate(evaluator.query_ids)}  # fmt: skip
    assert (relevant, sorted(evaluator.corpus)) == EXPECTED


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_runs_in_ark_hf_eval(tmp_path, tiny_xlmr_path, layout, capsys):
    path = write_layout(tmp_path, layout)
    output = tmp_path / "metrics.json"
    assert main(["eval", tiny_xlmr_path, "--data", str(path), "--modes", "dense", "--output", str(output)]) == 0
    assert "2 queries, 3 documents" in capsys.readouterr().out
    assert 0.0 <= json.loads(output.read_text())["dense_ndcg@10"] <= 1.0


def test_beir_split_is_choosable(tmp_path):
    folder = write_beir(tmp_path / "scifact")
    queries, corpus, qrels = load_eval_set(folder, split="dev")
    assert queries == {"q3": "a query judged only in dev"} and qrels == {"q3": {"d3": 1}}
    assert load_eval_set(folder / "qrels" / "dev.tsv")[2] == {"q3": {"d3": 1}}  # the qrels file names the split
    with pytest.raises(EvalDataError, match="lacks .*qrels/train.tsv \\(the folder has the splits: dev, test\\)"):
        load_eval_set(folder, split="train")


def test_beir_errors_name_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "scifact")
    with (folder / "qrels" / "test.tsv").open("a") as handle:
        handle.write("q1\td9\t1\nq2\td1\thigh\n")
    with pytest.raises(EvalDataError) as error:
        load_eval_set(folder)
    message = str(error.value)
    assert message.startswith("evaluation data failed validation (2 errors):")
    assert f"{folder / 'qrels' / 'test.tsv'}:4: field 'corpus-id': 'd9' is not in corpus.jsonl" in message
    assert f"{folder / 'qrels' / 'test.tsv'}:5: field 'score': expected an integer relevance, got 'high'" in message


def test_eval_file_errors_are_evaluation_errors_with_eval_layouts(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"_id": "d1", "text": "a corpus line"}) + "\n")
    config = BGETrainerConfig(output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "no_model"),
                              train_data=[str(write_layout(tmp_path, "jsonl"))], eval_data=str(path), use_cpu=True,
                              report_to="none")  # fmt: skip
    with pytest.raises(EvalDataError) as error:
        preflight(config)
    message = str(error.value)
    assert message.startswith("evaluation data failed validation (1 error):")
    assert "training data failed validation" not in message
    assert f"{path}:1: field '<record>'" in message
    assert (
        "An evaluation set is one of: a JSON file" in message
        and "a BEIR folder (corpus.jsonl, queries.jsonl" in message
    )
    assert "These records look like a BEIR file: pass the folder holding it" in message
    assert not (tmp_path / "out").exists()


def test_missing_eval_path_lists_the_layouts(tmp_path):
    with pytest.raises(EvalDataError, match="dev.jsnl: evaluation data: no such file or folder. An evaluation set is"):
        load_eval_set(tmp_path / "dev.jsnl")
