"""Configuration is never silently ignored (issue classes 2 and 8): every bad value is named, by key, early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ark_hf import BGETrainerConfig
from ark_hf.utils.cli import ConfigError, parse_config
from ark_hf.utils.preflight import check_config_values, check_metric_for_best_model, metric_keys, preflight


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def nothing_written(tmp_path: Path, *allowed: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in allowed) == []


# ----------------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    ("text", "key", "first", "second"),
    [
        ("learning_rate: 1e-5\ntemperature: 0.02\nlearning_rate: 3e-5\n", "learning_rate", 1, 3),
        ("temperature: 0.02\n\n\ntemperature: 0.05\n", "temperature", 1, 4),
        ("use_self_distill: true\nuse_self_distill: false\n", "use_self_distill", 1, 2),
    ],
)
def test_duplicate_yaml_key_names_both_lines(tmp_path, text, key, first, second):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", str(tmp_path / "o")])
    assert f"{path}:{second}: key '{key}': given twice (first at line {first})" in str(error.value)
    nothing_written(tmp_path, "config.yaml")


def test_duplicate_key_inside_a_nested_mapping(tmp_path):
    path = write(tmp_path, "dataset_instructions:\n  a: x\n  a: y\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: key 'a': given twice \(first at line 2\)"):
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"])


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("learning_rate: 1e-5\n", "learning_rate", 1e-5),
        ("learning_rate: 5E-6\n", "learning_rate", 5e-6),
        ("temperature: 2e-2\n", "temperature", 0.02),
        ("learning_rate: '3e-5'\n", "learning_rate", 3e-5),  # quoted, for a float field: a number too
        ("weight_decay: 1e0\n", "weight_decay", 1.0),
    ],
)
def test_yaml_exponent_floats_are_numbers(tmp_path, text, field, value):
    config = parse_config(BGETrainerConfig, ["--config", write(tmp_path, text), "--output_dir", str(tmp_path / "o")])
    assert getattr(config, field) == pytest.approx(value, rel=0, abs=0)


def test_yaml_float_is_said_in_help():
    from ark_hf.utils.cli import CONFIG_HELP

    assert "1e-5" in CONFIG_HELP and "--config=PATH" in CONFIG_HELP


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("learnin_rate", "learning_rate"), ("temprature", "temperature"), ("train_grup_size", "train_group_size")],
)
def test_unknown_yaml_key_gets_did_you_mean(tmp_path, key, suggestion):
    path = write(tmp_path, f"{key}: 1\n")
    with pytest.raises(ConfigError) as error:
        parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"])
    assert f"{path}:1: key '{key}': unknown option" in str(error.value)
    assert f"did you mean '{suggestion}'?" in str(error.value)


def test_unknown_cli_flag_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"--learnig_rate \(did you mean 'learning_rate'\?\)"):
        parse_config(BGETrainerConfig, ["--output_dir", "o", "--learnig_rate", "1e-5"])


# -------------------------------------------------------------------------------------------- --config
def test_config_with_equals_sign_is_read(tmp_path):
    path = write(tmp_path, "temperature: 0.05\n")
    config = parse_config(BGETrainerConfig, [f"--config={path}", "--output_dir", str(tmp_path / "o")])
    assert config.temperature == 0.05


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{a}", "--config", "{b}"],
        ["--config={a}", "--config", "{b}"],
        ["--config={a}", "--config={b}"],
    ],
)
def test_repeated_config_is_refused(tmp_path, argv):
    a = write(tmp_path, "temperature: 0.05\n", "a.yaml")
    b = write(tmp_path, "temperature: 0.07\n", "b.yaml")
    argv = [arg.format(a=a, b=b) for arg in argv] + ["--output_dir", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=r"--config given 2 times .*a\.yaml, .*b\.yaml"):
        parse_config(BGETrainerConfig, argv)
    nothing_written(tmp_path, "a.yaml", "b.yaml")


def test_config_without_a_path_is_refused():
    with pytest.raises(ConfigError, match="--config needs a file path"):
        parse_config(BGETrainerConfig, ["--config", "--output_dir", "o"])


# ---------------------------------------------------------------------------------- resume_from_checkpoint
def test_resume_true_means_the_latest_checkpoint(tmp_path):
    out = tmp_path / "out"
    for step in (3, 12, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
    config = parse_config(BGETrainerConfig, ["--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert config.resume_from_checkpoint == str(out / "checkpoint-12")
    path = write(tmp_path, "resume_from_checkpoint: true\n")
    config = parse_config(BGETrainerConfig, ["--config", path, "--output_dir", str(out)])
    assert config.resume_from_checkpoint == str(out / "checkpoint-12")


@pytest.mark.parametrize("value", ["false", "False", "no"])
def test_resume_false_means_a_fresh_run(tmp_path, value):
    config = parse_config(BGETrainerConfig, ["--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", value])
    assert config.resume_from_checkpoint is None
    path = write(tmp_path, "resume_from_checkpoint: false\n")
    assert parse_config(BGETrainerConfig, ["--config", path, "--output_dir", "o"]).resume_from_checkpoint is None


@pytest.mark.parametrize("value", ["true", "True", "yes"])
def test_resume_true_without_checkpoints_is_refused(tmp_path, value):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"key 'resume_from_checkpoint': .* holds none"):
        parse_config(BGETrainerConfig, ["--output_dir", str(out), "--resume_from_checkpoint", value])
    assert not out.exists()


# ---------------------------------------------------------------------------------- values, before the model
@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"learning_rate": -1e-5}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"num_train_epochs": 0}, "num_train_epochs"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_values_are_refused_by_key(tmp_path, kwargs, key):
    config = BGETrainerConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none", **kwargs)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        check_config_values(config)
    assert not (tmp_path / "o").exists()


def test_zero_epochs_with_max_steps_is_fine(tmp_path):
    check_config_values(BGETrainerConfig(output_dir=str(tmp_path / "o"), num_train_epochs=0, max_steps=5))


def records_file(tmp_path: Path, n: int = 4) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) + "\n" for i in range(n)))
    return str(path)


def test_preflight_names_the_bad_value_before_the_model(tmp_path):
    """`model_name_or_path` does not exist: the value error must come first, nothing loaded or written."""
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "no_model"), learning_rate=-1.0,
        train_data=[records_file(tmp_path)], use_cpu=True, report_to="none",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="key 'learning_rate'"):
        preflight(config)
    nothing_written(tmp_path, "train.jsonl")


# -------------------------------------------------------------------------------- metric_for_best_model
@pytest.mark.parametrize(
    ("metric", "modes", "ok"),
    [
        ("dense_ndcg@10", ["dense"], True),
        ("eval_sparse_recall@100", ["dense", "sparse"], True),
        ("colbert_ndcg@10", ["dense"], False),
        ("dense_ndcg@5", ["dense"], False),
        ("loss", ["dense"], False),
    ],
)
def test_metric_for_best_model_is_checked_against_eval_modes(tmp_path, metric, modes, ok):
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "o"), metric_for_best_model=metric, eval_modes=modes, use_cpu=True, report_to="none"
    )
    if ok:
        check_metric_for_best_model(config, metric_keys(modes))
        return
    with pytest.raises(ConfigError) as error:
        check_metric_for_best_model(config, metric_keys(modes))
    assert f"key 'metric_for_best_model': '{metric}' is not computed" in str(error.value)
    assert "dense_ndcg@10" in str(error.value)  # lists what is computed


def test_metric_for_best_model_fails_in_preflight_before_training(tmp_path):
    eval_file = tmp_path / "dev.json"
    eval_file.write_text(json.dumps({"queries": {"q": "a"}, "corpus": {"d": "b"}, "qrels": {"q": {"d": 1}}}))
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "no_model"),
        train_data=[records_file(tmp_path)], eval_data=str(eval_file), eval_modes=["dense"],
        metric_for_best_model="colbert_ndcg@10", use_cpu=True, report_to="none",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="key 'metric_for_best_model'"):
        preflight(config)
    nothing_written(tmp_path, "train.jsonl", "dev.json")


def test_load_best_model_without_eval_data_is_refused(tmp_path):
    config = BGETrainerConfig(
        output_dir=str(tmp_path / "o"), load_best_model_at_end=True, metric_for_best_model="dense_ndcg@10",
        eval_strategy="steps", save_strategy="steps", use_cpu=True, report_to="none",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="no evaluation data"):
        check_metric_for_best_model(config, set())
