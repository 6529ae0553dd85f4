"""Valid training data in every accepted shape loads into the one internal record form."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import datasets
import pytest

from ark_hf import assets
from ark_hf.data.loading import load_training_records, records_to_ir


def _write_jsonl(path: Path, rows: list[dict], *, blank_after: int | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _expected(query: str, pos: list[str], neg: list[str] = (), *, source: str, line: int, **fields) -> dict:
    """The full internal record; `fields` overrides the optional keys (`source_index`, scores, `prompt`, `type`)."""
    record = {
        "query": query,
        "pos": list(pos),
        "neg": list(neg),
        "pos_scores": None,
        "neg_scores": None,
        "prompt": None,
        "type": None,
        "source": source,
        "source_index": 0,
        "line": line,
        "id": f"{source}:{line}",
    }
    assert set(fields) <= set(record), fields
    record.update(fields)
    return record


def test_single_file_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some Windows editors write
        + b'{"query": "q1", "pos": ["p1"], "neg": ["n1", "n2"], "note": "unknown fields are ignored"}\r\n'
        + b"\r\n"
        + b"   \n"
        + '{"query": "caf\u00e9?", "pos": ["p2", "p3"]}\n'.encode()
    )
    records = load_training_records(path)
    assert records == [
        _expected("q1", ["p1"], ["n1", "n2"], source=str(path), line=1),
        _expected("caf\u00e9?", ["p2", "p3"], source=str(path), line=4),
    ]
    assert load_training_records(str(path)) == records


def test_list_of_files_keeps_order_and_source_index(tmp_path):
    first = _write_jsonl(tmp_path / "b.jsonl", [{"query": "q1", "pos": ["p1"]}, {"query": "q2", "pos": ["p2"]}])
    second = _write_jsonl(tmp_path / "a.jsonl", [{"query": "q3", "pos": ["p3"]}], blank_after=0)
    records = load_training_records([first, str(second)])
    assert [(r["query"], r["source"], r["source_index"], r["line"], r["id"]) for r in records] == [
        ("q1", str(first), 0, 1, f"{first}:1"),
        ("q2", str(first), 0, 2, f"{first}:2"),
        ("q3", str(second), 1, 2, f"{second}:2"),
    ]


def test_folder_is_sorted_and_each_file_is_a_source(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "b.jsonl", [{"query": "b", "pos": ["pb"]}])
    _write_jsonl(folder / "a.jsonl", [{"query": "a1", "pos": ["pa"]}, {"query": "a2", "pos": ["pa"]}])
    (folder / "c.json").write_text(json.dumps([{"query": "c", "pos": ["pc"]}]))
    (folder / "README.md").write_text("# not data")
    (folder / "nested").mkdir()
    _write_jsonl(folder / "nested" / "z.jsonl", [{"query": "sub-folders are read too", "pos": ["x"]}])
    extra = _write_jsonl(tmp_path / "extra.jsonl", [{"query": "e", "pos": ["pe"]}])

    records = load_training_records([folder, extra])
    assert [(r["query"], r["source"], r["source_index"]) for r in records] == [
        ("a1", os.path.join(str(folder), "a.jsonl"), 0),
        ("a2", os.path.join(str(folder), "a.jsonl"), 0),
        ("b", os.path.join(str(folder), "b.jsonl"), 1),
        ("c", os.path.join(str(folder), "c.json"), 2),
        ("sub-folders are read too", os.path.join(str(folder), "nested", "z.jsonl"), 3),
        ("e", str(extra), 4),
    ]

    named = load_training_records([folder, extra], source_names=["msmarco", "nq"])
    assert [r["id"] for r in named] == [
        "msmarco/a.jsonl:1",
        "msmarco/a.jsonl:2",
        "msmarco/b.jsonl:1",
        "msmarco/c.json:1",
        "msmarco/nested/z.jsonl:1",
        "nq:1",
    ]


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"query": "q1", "pos": ["p1"]}, {"query": "q2", "pos": ["p2"]}], indent=2))
    records = load_training_records(array)
    assert [(r["query"], r["line"]) for r in records] == [("q1", 1), ("q2", 2)]

    lines = _write_jsonl(
        tmp_path / "lines.json", [{"query": "q1", "pos": ["p1"]}, {"query": "q2", "pos": ["p2"]}], blank_after=1
    )
    assert [(r["query"], r["line"]) for r in load_training_records(lines)] == [("q1", 1), ("q2", 3)]


def test_dataset_rows(tmp_path):
    dataset = datasets.Dataset.from_list(
        [
            {"query": "q1", "pos": ["p1"], "neg": ["n1"], "prompt": "Find the answer", "type": "retrieval"},
            # Arrow stores absent values as null; null optional fields mean "not given".
            {"query": "q2", "pos": ["p2"], "neg": None, "prompt": None, "type": None},
        ]
    )
    records = load_training_records(dataset)
    assert records == [
        _expected("q1", ["p1"], ["n1"], source="dataset", line=1, prompt="Find the answer", type="retrieval"),
        _expected("q2", ["p2"], source="dataset", line=2),
    ]

    path = _write_jsonl(tmp_path / "train.jsonl", [{"query": "q3", "pos": ["p3"]}])
    mixed = load_training_records([dataset, path, dataset], source_names=["faq", "file", "faq-again"])
    assert [r["id"] for r in mixed] == ["faq:1", "faq:2", "file:1", "faq-again:1", "faq-again:2"]
    assert [r["source_index"] for r in mixed] == [0, 0, 1, 2, 2]
    assert [r["id"] for r in load_training_records([dataset, dataset])][::2] == ["dataset[0]:1", "dataset[1]:1"]


def test_ms_swift_layout(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Given a question, retrieve the answer"},
                {"role": "user", "content": "first turn"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "what is rebar?"},
            ],
            "positive_messages": [[{"role": "user", "content": "Steel bars in concrete."}]],
            "negative_messages": [
                [{"role": "user", "content": "A bird."}],
                [{"role": "system", "content": "ignored"}, {"role": "user", "content": "A tool."}],
            ],
            "label": 1.0,
        },
        {
            "messages": [{"role": "user", "content": "q2"}],
            "positive_messages": [[{"role": "user", "content": "d2a"}], [{"role": "user", "content": "d2b"}]],
            "pos_scores": [2, 1.5],
        },
    ]
    path = _write_jsonl(tmp_path / "swift.jsonl", rows)
    records = load_training_records(path)
    assert records == [
        _expected(
            "what is rebar?",
            ["Steel bars in concrete."],
            ["A bird.", "A tool."],
            source=str(path),
            line=1,
            prompt="Given a question, retrieve the answer",
        ),
        _expected("q2", ["d2a", "d2b"], source=str(path), line=2, pos_scores=[2.0, 1.5]),
    ]


def test_sentence_transformers_layouts(tmp_path):
    triplets = _write_jsonl(
        tmp_path / "st.jsonl",
        [
            {"anchor": "a1", "positive": "p1", "negative_2": "n2", "negative_10": "n10", "negative_1": "n1"},
            {"anchor": "a2", "positive": "p2", "negative_1": "n1", "negative_2": "p2", "negative_10": "n10"},
        ],
    )
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": "q", "positive": "p", "negative": "n"}])
    records = load_training_records([triplets, pairs])
    assert records == [
        _expected("a1", ["p1"], ["n1", "n2", "n10"], source=str(triplets), line=1),
        _expected("a2", ["p2"], ["n1", "n10"], source=str(triplets), line=2),
        _expected("q", ["p"], ["n"], source=str(pairs), line=1, source_index=1),
    ]

    columns = datasets.Dataset.from_dict(
        {"anchor": ["a", "b"], "positive": ["pa", "pb"], "negative_1": ["n1", "m1"], "negative_2": ["n2", None]}
    )
    assert [(r["query"], r["pos"], r["neg"]) for r in load_training_records(columns)] == [
        ("a", ["pa"], ["n1", "n2"]),
        ("b", ["pb"], ["m1"]),
    ]


def test_teacher_scores_and_prompts(tmp_path):
    path = _write_jsonl(
        tmp_path / "kd.jsonl",
        [
            {
                "query": "q1",
                "pos": ["p"],
                "pos_scores": [5],
                "neg": ["a", "b"],
                "neg_scores": [1.5, -2],
                "prompt": "Represent this",
            },
            {"query": "q2", "pos": ["p"], "pos_scores": [0.9], "type": "sts", "prompt": ""},
        ],
    )
    records = load_training_records(path, require_teacher_scores=True)
    assert records == [
        _expected(
            "q1",
            ["p"],
            ["a", "b"],
            source=str(path),
            line=1,
            pos_scores=[5.0],
            neg_scores=[1.5, -2.0],
            prompt="Represent this",
        ),
        _expected("q2", ["p"], source=str(path), line=2, pos_scores=[0.9], type="sts", prompt=""),
    ]
    assert all(
        isinstance(score, float) for record in records for score in record["pos_scores"] + (record["neg_scores"] or [])
    )


def test_records_to_ir_merges_identical_queries():
    records = [
        {"query": "q1", "pos": ["a", "b"], "neg": ["c"]},
        {"query": "q2", "pos": ["c"], "neg": ["a", "d"]},
        {"query": "q1", "pos": ["e"], "neg": []},
    ]
    queries, corpus, qrels = records_to_ir(records)

    def pid(text):
        return "d" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]

    def qid(text):
        return "q" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]

    assert queries == {qid("q1"): "q1", qid("q2"): "q2"}
    assert corpus == {pid(text): text for text in "abcde"}
    assert qrels == {qid("q1"): {pid("a"): 1, pid("b"): 1, pid("e"): 1}, qid("q2"): {pid("c"): 1}}
    assert records_to_ir(list(reversed(records)))[1] == corpus


def test_real_faq_data(tmp_path):
    faq = assets.load_faq("en")
    rows = [{"query": row["q"], "pos": [row["a"]], "type": row["category"]} for row in faq[:120]]
    path = _write_jsonl(tmp_path / "faq.jsonl", rows)
    records = load_training_records([path, datasets.Dataset.from_list(rows)], source_names=["faq-file", "faq-dataset"])
    assert len(records) == 240
    assert [r["query"] for r in records[:120]] == [row["q"] for row in faq[:120]]
    assert records[119]["id"] == "faq-file:120" and records[120]["id"] == "faq-dataset:1"

    queries, corpus, qrels = records_to_ir(records[:120])
    distinct_questions = {row["q"] for row in faq[:120]}
    assert len(queries) == len(distinct_questions)
    assert set(corpus.values()) == {row["a"] for row in faq[:120]}
    for record in records[:5]:
        [(query_id, text)] = [(q, t) for q, t in queries.items() if t == record["query"]]
        assert {corpus[p] for p in qrels[query_id]} >= set(record["pos"])


def test_files_are_streamed(tmp_path):
    # ~12 MB of data of which only a tiny part survives into records: reading the file whole would show up in
    # the traced peak, reading it line by line costs about one line at a time.
    padding = "x" * 6000
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(2000):
            handle.write(json.dumps({"query": f"q{index}", "pos": ["p"], "metadata": padding}) + "\n")
    assert path.stat().st_size > 12_000_000
    tracemalloc.start()
    try:
        records = load_training_records(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == 2000
    assert peak < 4_000_000, f"peak {peak} bytes: the file seems to be read whole"


@pytest.mark.parametrize("layout", ["ark", "ms-swift", "sentence-transformers"])
def test_layouts_agree(tmp_path, layout):
    row = {
        "ark": {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]},
        "ms-swift": {
            "messages": [{"role": "user", "content": "q"}],
            "positive_messages": [[{"role": "user", "content": "p"}]],
            "negative_messages": [[{"role": "user", "content": "n1"}], [{"role": "user", "content": "n2"}]],
        },
        "sentence-transformers": {"anchor": "q", "positive": "p", "negative_1": "n1", "negative_2": "n2"},
    }[layout]
    path = _write_jsonl(tmp_path / "one.jsonl", [row])
    assert load_training_records(path) == [_expected("q", ["p"], ["n1", "n2"], source=str(path), line=1)]
