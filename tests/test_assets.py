"""`ark_hf.assets.write_faq_jsonl`: the shipped FAQ as training data that the loaders accept as it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ark_hf.assets import load_faq, write_faq_jsonl
from ark_hf.data.loading import load_training_records


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_question_becomes_a_record_with_its_answer(tmp_path):
    path = write_faq_jsonl(tmp_path / "sub" / "faq.jsonl")
    rows, faq = read(path), load_faq("en")
    assert path == tmp_path / "sub" / "faq.jsonl"
    assert len(rows) == len(faq) == 503
    assert rows[7] == {"query": faq[7]["q"], "pos": [faq[7]["a"]]}
    assert len(load_training_records(str(path))) == 503  # validated by the training loader as written


def test_cross_lingual_negatives_limit_and_held_out_ids(tmp_path):
    english, swedish = load_faq("en")[:40], load_faq("sv")[:40]
    held_out = [english[0]["id"], english[5]["id"]]
    path = write_faq_jsonl(
        tmp_path / "sv_en.jsonl", "sv", answer_language="en", negatives=3, limit=40, exclude_ids=held_out, seed=1
    )
    rows = read(path)
    kept = [index for index, row in enumerate(english) if row["id"] not in held_out]
    assert [row["query"] for row in rows] == [swedish[index]["q"] for index in kept]
    assert [row["pos"] for row in rows] == [[english[index]["a"]] for index in kept]
    category_of_answer = {row["a"]: row["category"] for row in english}
    for index, row in zip(kept, rows):
        assert 1 <= len(row["neg"]) <= 3 and row["pos"][0] not in row["neg"]
        assert {category_of_answer[negative] for negative in row["neg"]} == {english[index]["category"]}
        assert not {english[0]["a"], english[5]["a"]} & set(row["neg"])  # held-out answers stay out of training
    again = read(write_faq_jsonl(tmp_path / "again.jsonl", "sv", answer_language="en", negatives=3, limit=40,
                                 exclude_ids=held_out, seed=1))  # fmt: skip
    assert again == rows  # the seed fixes the negatives
    assert len(load_training_records(str(path))) == 38


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"language": "de"}, "language='de': the FAQ ships in en, sv"),
        ({"answer_language": "fr"}, "language='fr': the FAQ ships in en, sv"),
        ({"negatives": -1}, "negatives=-1: expected 0 or more"),
        ({"exclude_ids": ["no-such-id"], "limit": 10}, "exclude_ids: no-such-id not among the FAQ ids used"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_faq_jsonl(tmp_path / "faq.jsonl", **kwargs)
    assert not (tmp_path / "faq.jsonl").exists()


def test_the_demo_extra_and_the_makefile_install_the_same_assets():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    makefile = re.search(r"^ASSETS := (.+)$", (root / "Makefile").read_text(), re.MULTILINE)
    assert makefile is not None, "Makefile: no `ASSETS := ...` line"
    assert makefile.group(1).split() == extra
