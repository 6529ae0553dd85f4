"""Settings that name something absent are refused, and groups that cannot be filled are refused, in preflight: before
weights load and before the output folder (or its lock) is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ark_hf import BGETrainerConfig
from ark_hf.curriculum.plan import StagePlanError, load_stage_plan
from ark_hf.data.checks import check_group_feasibility, check_name_keyed_settings, data_file_names
from ark_hf.data.loading import load_training_records
from ark_hf.utils.cli import ConfigError, parse_config
from ark_hf.utils.preflight import check_config_values, preflight


def write_records(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def distinct(prefix: str, n: int) -> list[dict]:
    return [{"query": f"{prefix} q{i}", "pos": [f"{prefix} p{i}"], "neg": [f"{prefix} n{i}"]} for i in range(n)]


def config(tmp_path: Path, **kwargs) -> BGETrainerConfig:
    values = {"output_dir": str(tmp_path / "out"), "model_name_or_path": str(tmp_path / "no_model"),
              "use_cpu": True, "report_to": "none"}  # fmt: skip
    values.update(kwargs)
    return BGETrainerConfig(**values)


def output_untouched(tmp_path: Path) -> None:
    """Neither the output folder nor its lock file was created."""
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- name-keyed settings
def test_instruction_key_naming_no_file_is_refused_with_did_you_mean_in_preflight(tmp_path):
    train = [write_records(tmp_path / "data" / "msmarco.jsonl", distinct("m", 4)),
             write_records(tmp_path / "data" / "nq.jsonl", distinct("n", 4))]  # fmt: skip
    cfg = config(tmp_path, train_data=train, dataset_instructions={"ms_marco": "Represent: ", "nq": "Q: "})
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    message = str(error.value)
    assert "key 'dataset_instructions': 'ms_marco' (did you mean 'msmarco'?) match(es) no training file" in message
    assert train[0] in message and train[1] in message
    output_untouched(tmp_path)


def test_instruction_keys_match_the_files_of_a_folder_without_reading_them(tmp_path):
    write_records(tmp_path / "data" / "nq" / "part-0.jsonl", distinct("a", 2))
    files = data_file_names([tmp_path / "data"])
    assert files == [str(tmp_path / "data" / "nq" / "part-0.jsonl")]
    check_name_keyed_settings({"dataset_instructions": {"part-0": "x", "part-0.jsonl": "y"}}, files)
    with pytest.raises(ConfigError, match="'part0' \\(did you mean 'part-0'\\?\\) match\\(es\\) no training file"):
        check_name_keyed_settings({"dataset_instructions": {"part0": "x"}}, files)


def test_instruction_key_naming_no_stage_file_is_refused_for_a_curriculum(tmp_path):
    stage_file = write_records(tmp_path / "data" / "pairs.jsonl", distinct("p", 4))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"stages:\n  - name: warmup\n    datasets: [{stage_file}]\n    steps: 2\n")
    cfg = config(tmp_path, curriculum=str(plan), dataset_instructions={"pair": "Represent: "})
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    assert "key 'dataset_instructions': 'pair' (did you mean 'pairs'?) match(es) no training file of the " \
           "curriculum's stages" in str(error.value)  # fmt: skip
    output_untouched(tmp_path)


def test_stage_plan_names_get_did_you_mean(tmp_path):
    write_records(tmp_path / "data" / "pairs.jsonl", distinct("p", 2))
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"stages:\n  - name: supervised\n    datasets: [{tmp_path / 'data' / 'pair.jsonl'}]\n    steps: 2\n"
        "  - name: merge\n    merge:\n      checkpoints: {last_n: 1}\n      from_stage: supervized\n"
    )
    with pytest.raises(StagePlanError) as error:
        load_stage_plan(plan)
    message = str(error.value)
    assert f"plan.yaml:3: stages[0].datasets[0]: key 'datasets': no such file or folder: {tmp_path / 'data' / 'pair.jsonl'}" \
           f" (did you mean '{tmp_path / 'data' / 'pairs.jsonl'}'?)" in message  # fmt: skip
    plan.write_text(
        f"stages:\n  - name: supervised\n    datasets: [{tmp_path / 'data' / 'pairs.jsonl'}]\n    steps: 2\n"
        "  - name: merge\n    merge:\n      checkpoints: {last_n: 1}\n      from_stage: supervized\n"
    )
    with pytest.raises(StagePlanError) as error:
        load_stage_plan(plan)
    message = str(error.value)
    assert "plan.yaml:8: stages[1].merge.from_stage: key 'from_stage': no data stage named 'supervized' before the " \
           "merge (did you mean 'supervised'?)" in message  # fmt: skip


def test_missing_training_file_gets_did_you_mean(tmp_path):
    write_records(tmp_path / "train.jsonl", distinct("a", 2))
    cfg = config(tmp_path, train_data=[str(tmp_path / "trian.jsonl")])
    with pytest.raises(ValueError) as error:
        preflight(cfg)
    assert f"{tmp_path / 'trian.jsonl'}: no such file or folder (did you mean '{tmp_path / 'train.jsonl'}'?)" in str(
        error.value
    )
    output_untouched(tmp_path)


# ------------------------------------------------------------------------------------------ group feasibility
@pytest.mark.parametrize(
    ("records", "counts"),
    [
        ([{"query": "same q", "pos": ["same p"]}] * 5, "5 of 5 records"),  # identical records
        ([{"query": "only q", "pos": ["only p"]}], "1 of 1 records"),  # a single record
        (
            [{"query": f"q{i}", "pos": ["p", "p2"]} for i in range(3)],
            "3 of 3 records",
        ),  # every record the same passages
    ],
)
def test_groups_that_cannot_be_filled_are_refused_in_preflight_with_counts(tmp_path, records, counts):
    train = write_records(tmp_path / "train.jsonl", records)
    cfg = config(tmp_path, train_data=[train], train_group_size=4, per_device_train_batch_size=1)
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    message = str(error.value)
    assert (
        f"key 'train_group_size': {counts} have no negatives and no other record offers a different passage" in message
    )
    assert f"{train}:1" in message and "group of 4" in message
    output_untouched(tmp_path)


def test_groups_without_negatives_cannot_carry_teacher_scores(tmp_path):
    records = [{"query": f"q{i}", "pos": [f"p{i}"], "pos_scores": [1.0]} for i in range(3)]
    train = write_records(tmp_path / "train.jsonl", records)
    with pytest.raises(ConfigError) as error:
        check_group_feasibility(load_training_records(train), 2, use_teacher_scores=True)
    assert f"key 'train_group_size': 3 of 3 records have no negatives ({train}:1, {train}:2, {train}:3)" in str(
        error.value
    )
    assert "cannot carry teacher scores" in str(error.value)


def test_fillable_groups_pass(tmp_path):
    mixed = [
        {"query": "q0", "pos": ["p0"]},
        {"query": "q1", "pos": ["p1"]},
        {"query": "q2", "pos": ["p2"], "neg": ["n"]},
    ]
    check_group_feasibility(mixed, 8)
    check_group_feasibility([{"query": "q", "pos": ["p"]}] * 3, 1)  # no negatives needed


def test_stage_groups_are_checked_before_the_lock(tmp_path):
    stage_file = write_records(tmp_path / "data" / "same.jsonl", [{"query": "q", "pos": ["p"]}] * 3)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"stages:\n  - name: pairs\n    datasets: [{stage_file}]\n    steps: 2\n    train_group_size: 3\n")
    with pytest.raises(ConfigError, match="key 'train_group_size' \\(stage 'pairs'\\): 3 of 3 records"):
        preflight(config(tmp_path, curriculum=str(plan)))
    output_untouched(tmp_path)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused_before_the_model(tmp_path):
    train = write_records(tmp_path / "train.jsonl", distinct("a", 4))
    saved = tmp_path / "final_model"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    (saved / "checkpoint-4").mkdir()
    cfg = config(tmp_path, train_data=[train], resume_from_checkpoint=str(saved))
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    message = str(error.value)
    assert (
        f"key 'resume_from_checkpoint': {saved} is not a checkpoint of a run (it has no trainer_state.json)" in message
    )
    assert "it holds checkpoint-4: pass one of those" in message
    output_untouched(tmp_path)


# ------------------------------------------------------------------------------------- config words and modes
def test_learning_rate_errors_say_learning_rate(tmp_path):
    with pytest.raises(ConfigError, match="key 'learning_rate' \\(the learning rate\\): must be a finite number >= 0"):
        check_config_values(config(tmp_path, learning_rate=-1e-5))
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="cfg.yaml:1: key 'learning_rate' \\(the learning rate\\): expected float"):
        parse_config(BGETrainerConfig, ["--config", str(yaml_file), "--output_dir", str(tmp_path / "out")])
    output_untouched(tmp_path)


def test_misspelled_eval_mode_gets_did_you_mean(tmp_path):
    with pytest.raises(
        ConfigError, match="key 'eval_modes': unknown evaluation mode 'colbrt' \\(did you mean 'colbert'\\?\\)"
    ):
        check_config_values(config(tmp_path, eval_modes=["dense", "colbrt"]))
    output_untouched(tmp_path)


def test_eval_modes_without_eval_data_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ark_hf.utils.preflight"):
        check_config_values(config(tmp_path, eval_modes=["dense", "colbert"]))
    assert "eval_modes=['dense', 'colbert'] has no effect: there is no eval_data" in caplog.text


def test_max_errors_flag_gets_did_you_mean(tmp_path):
    with pytest.raises((ConfigError, SystemExit, ValueError)) as error:
        parse_config(BGETrainerConfig, ["--output_dir", str(tmp_path / "out"), "--max_errors", "50"])
    assert "--max_errors (did you mean 'max_validation_errors'?)" in str(error.value)
    output_untouched(tmp_path)
