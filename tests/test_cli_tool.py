"""`ark-hf` subcommands on the tiny XLM-R (and a tiny causal LM for score): train, eval, mine, score, merge, card,
help, and user errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ark_hf.cli import main
from ark_hf.data.loading import load_training_records, records_to_ir
from ark_hf.evaluation.ir import IREvaluator
from ark_hf.models.bge_m3 import BGEM3Model

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"query": f"how long does permit {i} take", "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
     "neg": [f"Parking rules changed in district {i}."]}
    for i in range(6)
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return folder


@pytest.fixture(scope="module")
def trained(workdir, tiny_xlmr_path):
    out = workdir / "m3"
    status = main(
        ["train", "bge-m3", "--model_name_or_path", tiny_xlmr_path, "--init_missing_heads", "--train_data",
         str(workdir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size",
         "2", "--train_group_size", "2", "--query_max_len", "12", "--passage_max_len", "16", "--use_cpu",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1"]
    )  # fmt: skip
    assert status == 0
    return out


def test_python_m_ark_hf_help():
    result = subprocess.run([sys.executable, "-m", "ark_hf", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "mine", "score", "merge", "card"):
        assert command in result.stdout


def test_train_writes_model_and_card(trained):
    for name in ("model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "README.md", "training_args.bin"):
        assert (trained / name).is_file(), name
    assert "library_name: sentence-transformers" in (trained / "README.md").read_text()


def test_train_help_lists_ark_hf_options_first(capsys):
    assert main(["train", "bge-m3", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.index("--use_self_distill") < out.index("--per_device_train_batch_size")
    assert out.startswith("usage: ark-hf train bge-m3") and "BGETrainerConfig: ark_hf's options" in out


def test_eval_prints_every_mode_and_writes_json(trained, workdir, capsys):
    output = workdir / "metrics.json"
    assert main(["eval", str(trained), "--data", str(workdir / "train.jsonl"), "--output", str(output),
                 "--query_max_len", "12", "--passage_max_len", "16"]) == 0  # fmt: skip
    metrics = json.loads(output.read_text())
    printed = capsys.readouterr().out
    for mode in ("dense", "sparse", "colbert", "dense+sparse", "all"):
        assert f"{mode}_ndcg@10" in metrics and f"\n{mode} " in printed
    queries, corpus, qrels = records_to_ir(load_training_records(str(workdir / "train.jsonl")))
    model = BGEM3Model.from_pretrained(str(trained)).eval()
    direct = IREvaluator(queries, corpus, qrels, modes=["dense", "all"], query_max_len=12, passage_max_len=16)(model)
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6)
    assert main(["eval", str(trained), "--data", str(workdir / "train.jsonl"), "--output", str(output)]) == 2


def test_mine_writes_trainable_records(trained, workdir, capsys):
    output = workdir / "mined.jsonl"
    assert main(["mine", "--data", str(workdir / "train.jsonl"), "--model", str(trained), "--output", str(output),
                 "--num_negatives", "2", "--mode", "dense+sparse", "--query_max_len", "12",
                 "--passage_max_len", "16"]) == 0  # fmt: skip
    stats = json.loads(capsys.readouterr().out.split("\nmined records")[0])
    mined = load_training_records(str(output))
    assert stats["records"] == len(mined) == len(RECORDS)
    for record in mined:
        assert len(record["neg"]) == 2 and not set(record["neg"]) & set(record["pos"])


def test_merge_linear_of_a_model_with_itself_is_the_model(trained, workdir):
    output = workdir / "merged"
    assert main(["merge", str(trained), str(trained), "--output_dir", str(output), "--method", "linear"]) == 0
    original, merged = load_file(trained / "model.safetensors"), load_file(output / "model.safetensors")
    assert set(original) == set(merged)
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
    assert (output / "merge_info.json").is_file()


def test_card_rewrites_the_card_with_a_model_id(trained, capsys):
    assert main(["card", str(trained), "--model_id", "user/tiny-m3"]) == 0
    text = (trained / "README.md").read_text()
    assert 'BGEM3FlagModel("user/tiny-m3", pooling_method="cls"' in text
    assert "no evaluation table" in capsys.readouterr().out


def test_user_errors_exit_2_without_traceback(workdir, tiny_xlmr_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": "not a list"}\n')
    command = [sys.executable, "-m", "ark_hf", "train", "bge-m3", "--model_name_or_path", tiny_xlmr_path, "--init_missing_heads",
               "--train_data", str(bad), "--output_dir", str(tmp_path / "o"), "--use_cpu", "--report_to", "none"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "bad.jsonl:1: field 'pos'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        main(["eval", tiny_xlmr_path, "--data", str(bad), "--debug"])
    assert main(["train", "bge-m3", "--output_dir", str(tmp_path / "o2"), "--temperature", "-1"]) == 2
    assert main(["train", "bge-m3", "--output_dir", str(tmp_path / "o3")]) == 2  # no train_data
    assert main(["mine", "--data", str(bad), "--model", "x", "--output", str(tmp_path / "m.jsonl")]) == 2
    assert main(["card", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------------------------- ark-hf score
ALIGN_RECORDS = [
    {"query": f"how long does permit {i} take?", "answers": [f"{i + 2} weeks"],
     "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
     "neg": [f"The library opens at {i + 8}.", "Parking is free on Sundays in the whole city centre."]}
    for i in range(3)
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_causal_lm(tiny_qwen3_path, tmp_path_factory):
    """A random Qwen3 causal LM (the tiny Qwen3's config) with the real Qwen3 tokenizer, saved to a folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("causal_lm")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_qwen3_path)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_qwen3_path).save_pretrained(folder)
    return str(folder)


def test_score_help_lists_every_option(capsys):
    import dataclasses

    from ark_hf.alignment.pipeline import ComputeAlignmentConfig

    assert main(["score", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ark-hf score")
    for option in dataclasses.fields(ComputeAlignmentConfig):
        assert f"--{option.name}" in out, option.name
    assert "--config" in out


def test_score_refuses_bad_records_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps(ALIGN_RECORDS[0]) + "\n" + json.dumps({"query": "q", "candidates": []}) + "\n")
    output = tmp_path / "out.jsonl"
    # the LM folder does not exist: loading it would raise OSError, not exit 2
    flags = ["--output_file", str(output), "--lm_name_or_path", str(tmp_path / "no-such-lm")]
    assert main(["score", "--input_file", str(bad), *flags]) == 2
    assert f"{bad}:2: field 'candidates': the candidate list is empty" in capsys.readouterr().err
    assert not output.exists()
    assert main(["score", "--input_file", str(tmp_path / "missing.jsonl"), *flags]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["score", "--output_file", str(output)]) == 2  # no input_file, no lm
    assert "scoring needs --input_file, --lm_name_or_path" in capsys.readouterr().err
    assert main(["score", "--rebuild_only", str(bad)]) == 2
    assert "--rebuild_only needs --rebuild_output" in capsys.readouterr().err
    assert main(["score", "--rebuild_only", str(bad), "--rebuild_output", str(tmp_path / "t.jsonl")]) == 2
    assert f"{bad}:1: field 'alignment': not a line of the scorer's output" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()


def test_score_writes_the_scored_file_and_rebuild_only_the_training_records(tiny_causal_lm, tmp_path):
    from ark_hf.alignment import AlignmentScoringConfig, CausalLMScorer, score_records
    from ark_hf.alignment.records import read_alignment_records

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALIGN_RECORDS))
    scored_path = tmp_path / "scored.jsonl"
    assert main(["score", "--input_file", str(data), "--output_file", str(scored_path), "--lm_name_or_path",
                 tiny_causal_lm, "--device", "cpu", "--records_per_block", "2", "--show_progress", "false"]) == 0  # fmt: skip
    scored = [json.loads(line) for line in scored_path.read_text().splitlines()]
    assert [s["alignment"]["index"] for s in scored] == [0, 1, 2]
    # the same scores as the library called directly on the same LM
    config = AlignmentScoringConfig(lm_name_or_path=tiny_causal_lm, show_progress=False)
    lm = CausalLMScorer.from_pretrained(tiny_causal_lm, device="cpu")
    direct = score_records(read_alignment_records(data), lm, None, config)
    for got, want in zip(scored, direct):
        for name in ("pos", "neg"):
            for g, w in zip(got["alignment"][name], want["alignment"][name]):
                assert g["forward"] == pytest.approx(w["forward"], abs=1e-6)
                assert g["backward"] == pytest.approx(w["backward"], abs=1e-6)
                assert g["parameter"] is None and g["score"] == pytest.approx(w["score"], abs=1e-6)

    rebuilt = tmp_path / "train.jsonl"
    assert main(["score", "--rebuild_only", str(scored_path), "--rebuild_output", str(rebuilt),
                 "--num_negatives", "1", "--false_negative_ratio", "1.0"]) == 0  # fmt: skip
    records = load_training_records(str(rebuilt), require_teacher_scores=True)
    assert len(records) == len(ALIGN_RECORDS)
    for record, line in zip(records, scored):
        best = max(e["score"] for name in ("pos", "neg") for e in line["alignment"][name])
        assert record["pos_scores"] == [pytest.approx(best)] and len(record["neg"]) == 1
        assert record["neg_scores"][0] <= record["pos_scores"][0]
