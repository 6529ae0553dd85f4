"""Messages that name the real problem once: a file that is one JSON document, a file in another encoding, a layout
mistake repeated on every line, absurd teacher scores, the option that raises the error cap, a model that does not
exist, a run whose every batch was skipped. Each is refused before the output folder is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ark_hf import BGETrainerConfig, DataValidationError
from ark_hf.cli import main
from ark_hf.utils.preflight import ModelNotFoundError, check_model_exists, preflight

RECORDS = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"]} for i in range(6)]


def data_error(tmp_path: Path, path: Path, **kwargs) -> str:
    """Preflight on `path`: the error message, after checking nothing was written."""
    config = BGETrainerConfig(output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "no_model"),
                              train_data=[str(path)], use_cpu=True, report_to="none", **kwargs)  # fmt: skip
    with pytest.raises(DataValidationError) as error:
        preflight(config)
    assert not (tmp_path / "out").exists()
    return str(error.value)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.jsonl", json.dumps(RECORDS, indent=2), "the file is one JSON array of 6 elements over 56 lines, not JSON "
         "Lines (one record per line); name the file .json"),
        ("w.json", json.dumps({"data": RECORDS}, indent=2), "the file is one JSON object wrapping 6 records under the "
         "key 'data', not JSON Lines"),
        ("e.jsonl", json.dumps({"queries": {"q": "a"}, "corpus": {"d": "b"}, "qrels": {"q": {"d": 1}}}, indent=1),
         "the file is an evaluation set {queries, corpus, qrels}, not JSON Lines (one record per line); pass it as "
         "eval_data"),
        ("one.jsonl", json.dumps(RECORDS), "field '<format>': line 1 holds a JSON array of 6 objects, not one record"),
        ("p.jsonl", "\n".join(json.dumps(r, indent=2) for r in RECORDS), "field '<format>': the JSON value that starts "
         "on line 1 spans several lines"),
    ],
)  # fmt: skip
def test_one_json_document_in_a_records_slot_is_one_message(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    message = data_error(tmp_path, path)
    assert "(1 error)" in message and f"{path}" in message and expected in message


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("utf-16", "field '<encoding>': the file is UTF-16 (little-endian, with a byte-order mark FF FE), not UTF-8"),
        ("utf-16-be", "the file is UTF-16 (no byte-order mark: every other byte is 0), not UTF-8"),
        ("latin-1", "field '<encoding>': invalid UTF-8 at byte 15 of the line (invalid continuation byte) (byte 0xE9, "
         "'é' in Latin-1); the file looks Latin-1 (ISO-8859-1 / Windows-1252) encoded: save it as UTF-8"),
    ],
)  # fmt: skip
def test_undecodable_file_names_its_encoding_once(tmp_path, encoding, expected):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"query": f"café {i}", "pos": ["résumé"]}, ensure_ascii=False) for i in range(5)]
    path.write_bytes("\n".join(lines).encode(encoding))
    message = data_error(tmp_path, path)
    assert "(1 error)" in message and f"{path}:1: " in message and expected in message
    if encoding == "latin-1":
        assert "5 lines are not UTF-8 (lines 1-5)" in message


def test_positive_list_gets_one_line_suggesting_pos(tmp_path):
    path = tmp_path / "st.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": [f"p{i}"], "negative": ["n"]}) + "\n"
                            for i in range(30)))  # fmt: skip
    message = data_error(tmp_path, path)
    lines = [line for line in message.splitlines() if str(path) in line]
    assert len(lines) == 1
    assert f"{path}:1: field 'positive': expected one passage (a string: the sentence-transformers layout has one " \
           "positive per row), got a list; for lists of passages use the ark layout: rename 'positive' to 'pos', " \
           "'negative' to 'neg' (and 29 more records, lines 2-30)" in lines[0]  # fmt: skip


def test_the_error_cap_names_max_validation_errors(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"query": "q", "pos": ["p"], "neg_scores": [0.5] * (i + 1)}) + "\n"
                            for i in range(8)))  # fmt: skip
    message = data_error(tmp_path, path, max_validation_errors=3)
    assert "more than 3 errors" in message
    assert "Raise max_validation_errors (--max_validation_errors) to see more" in message
    assert "max_errors cap" not in message


@pytest.mark.parametrize("score", ["1e39", "-2e5", "NaN", "Infinity"])
def test_absurd_teacher_scores_are_refused_in_data_validation(tmp_path, score):
    path = tmp_path / "train.jsonl"
    path.write_text(f'{{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0], "neg_scores": [{score}]}}\n')
    message = data_error(tmp_path, path)
    assert f"{path}:1: field 'neg_scores[0]': " in message
    if score in ("1e39", "-2e5"):
        assert f"teacher score {float(score):g} is out of range (|score| <= 10000)" in message


# ------------------------------------------------------------------------------------------ model not found
@pytest.mark.parametrize("name", ["./nosuchdir", "nosuchdir", "nosuchorg/nosuchmodel", "models/a/b"])
def test_model_not_found_is_one_message(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match=f"model_name_or_path '{name}': (no such model folder|neither a "
                       "local folder)"):  # fmt: skip
        check_model_exists(name)


def test_misspelled_model_folder_gets_did_you_mean(tmp_path):
    (tmp_path / "my_model").mkdir()
    with pytest.raises(ModelNotFoundError, match=f"no such model folder \\(did you mean '{tmp_path / 'my_model'}'"):
        check_model_exists(str(tmp_path / "my_modle"))


def test_cli_misspelled_model_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "nosuchdi").mkdir()  # a near miss, suggested
    train_command = ["train", "bge-m3", "--model_name_or_path", "./nosuchdir", "--train_data", str(train),
                     "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    assert main(train_command) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "ark-hf train: error: model_name_or_path './nosuchdir': no such model folder (did you mean 'nosuchdi'?)"
    )
    assert main(["eval", "nosuchdir", "--data", str(train)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ark-hf eval: error: model 'nosuchdir': neither a local folder (did you mean 'nosuchdi'?) nor a "
                          "model in the Hugging Face cache")  # fmt: skip
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_misspelled_eval_mode_gets_did_you_mean(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["eval", "nosuchdir", "--data", str(train), "--modes", "dense", "colbrt"]) == 2
    assert "unknown evaluation mode 'colbrt' (did you mean 'colbert'?)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- every batch skipped
def test_every_batch_skipped_names_the_data_files(tiny_xlmr_path, tmp_path):
    from ark_hf import BGETrainer
    from ark_hf.losses.base import LossOutput
    from ark_hf.models.bge_m3 import BGEM3Model
    from ark_hf.utils.preflight import NonFiniteLossError

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = BGETrainerConfig(output_dir=str(tmp_path / "out"), train_data=[str(train)], max_steps=2,
                              per_device_train_batch_size=2, train_group_size=2, nan_policy="skip", use_cpu=True,
                              report_to="none", save_strategy="no", disable_tqdm=True,
                              unified_finetuning=False)  # fmt: skip
    trainer = BGETrainer(model=BGEM3Model(tiny_xlmr_path, unified_finetuning=False), config=config)
    original = trainer.loss.forward
    trainer.loss.forward = lambda *a, **k: (lambda out: LossOutput(out.loss * float("nan"), out.components))(
        original(*a, **k)
    )
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    assert "every one of the 2 batches of this run" in str(error.value)
    assert f"The data read: {train}." in str(error.value)
