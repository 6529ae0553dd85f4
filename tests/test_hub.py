"""Model card and Hub push for a trained tiny BGE-M3 (mean pooling: the case where loaders used to disagree).

The card's evaluation table must equal the trainer's log, its FlagEmbedding / sentence-transformers / ark_hf
snippets must run against the saved folder and give ark_hf's vectors, and the push path must run up to the
upload (the network calls replaced) with exactly the files `upload_file_list` predicts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from ark_hf.callbacks.alignment import AlignmentCallback
from ark_hf.cli import main
from ark_hf.hub import (
    CARD_DATA_FILE,
    HubPushError,
    check_hub_push,
    eval_table_rows,
    upload_file_list,
    write_model_card,
)
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

RECORDS = [
    {"query": f"how long does permit {i} take", "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
     "neg": [f"Parking rules changed in district {i}.", f"The library opens at {i + 8}."]}
    for i in range(6)
]  # fmt: skip


def _config(tmp_path, **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16, max_steps=3,
        logging_steps=1, learning_rate=1e-3, seed=3, init_missing_heads=True, sentence_pooling_method="mean",
        use_self_distill=True, eval_strategy="steps", eval_steps=2,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


def _evaluator():
    from ark_hf.data.loading import records_to_ir
    from ark_hf.evaluation.ir import IREvaluator

    queries, corpus, qrels = records_to_ir(RECORDS)
    return IREvaluator(queries, corpus, qrels, modes=["dense", "sparse", "all"], query_max_len=12, passage_max_len=16)


@pytest.fixture(scope="module")
def trained(tiny_xlmr_path, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("card")
    config = _config(tmp_path, model_name_or_path=tiny_xlmr_path)
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True, pooling="mean")
    with torch.no_grad():
        model.sparse_linear.bias.fill_(1.0)
    trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS, evaluator=_evaluator())
    trainer.evaluate()  # a "before" row at step 0, as the recipes do
    trainer.train()
    trainer.save_model(config.output_dir)
    card_path = write_model_card(trainer, config.output_dir, model_name="tiny-m3", tags=["test"])
    return trainer, Path(config.output_dir), card_path


def _blocks(text: str) -> dict[str, str]:
    """Python code block under each `### name` heading."""
    return dict(re.findall(r"### ([^\n]+)\n\n```python\n(.*?)```", text, flags=re.S))


def test_card_metadata_and_sections(trained):
    _, folder, path = trained
    card = ModelCard.load(path)
    assert card.data.library_name == "sentence-transformers"
    assert {"ark_hf", "bge-m3", "test"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is not a Hub id
    text = path.read_text()
    for section in ("## Training data", "## Objective", "## Hyperparameters", "## Evaluation", "## Citation"):
        assert section in text
    assert "2402.03216" in text and "2511.16326" not in text  # BGE-M3 cited; ARK only when its alignment ran
    assert 'pooling_method="mean"' in text and "not BGE-M3's CLS" in text
    assert "`use_self_distill` | `True`" in text
    assert "| `learning_rate` | `0.001` |" in text  # differs from the default 1e-5
    hyperparameters = text.split("## Hyperparameters")[1].split("## Evaluation")[0]
    # left at their defaults, or resolved from another setting (use_cpu turns pinning off): not listed
    for key in ("per_device_eval_batch_size", "accelerator_config", "dataloader_pin_memory", "debug",
                "gradient_checkpointing", "activation_checkpointing", "lr_scheduler_type"):  # fmt: skip
        assert f"`{key}`" not in hyperparameters, key
    assert "records" in text and "6 records" in text


def test_eval_table_equals_the_trainer_log(trained):
    trainer, _, path = trained
    logged = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    assert len(logged) >= 2  # steps 2 and 3 (the before-training evaluation is reset by train())
    table = [
        line.strip("|").split("|")
        for line in path.read_text().split("## Evaluation")[1].splitlines()
        if re.match(r"\| \d+ \|", line)
    ]
    expected = []
    for entry in logged:
        for mode in ("dense", "sparse", "all"):
            expected.append([str(entry["step"]), mode] + [f"{entry[f'eval_{mode}_{m}']:.4f}" for m in
                            ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map")])  # fmt: skip
    assert [[cell.strip() for cell in row] for row in table] == expected
    assert len(eval_table_rows(trainer.state.log_history)) == len(expected)


def test_snippets_run_and_give_ark_hf_vectors(trained):
    trainer, folder, path = trained
    blocks = _blocks(path.read_text())
    assert set(blocks) == {"FlagEmbedding", "sentence-transformers", "ark_hf"}
    reference = trainer.model  # the snippets load the saved folder; the trained model in memory is the reference
    vectors = {}
    for name, code in blocks.items():
        namespace: dict = {}
        exec(compile(code, f"<card:{name}>", "exec"), namespace)
        vectors[name] = np.asarray(namespace["dense"])
    sentences = namespace["sentences"]
    ours = reference.encode(sentences)["dense_vecs"]
    for name, dense in vectors.items():
        np.testing.assert_allclose(dense, ours, atol=1e-5, err_msg=name)
    # without the card's pooling_method FlagEmbedding pools with CLS: the vectors really differ
    from FlagEmbedding import BGEM3FlagModel

    cls = BGEM3FlagModel(str(folder), use_fp16=False).encode(sentences)["dense_vecs"]
    assert np.abs(cls - ours).max() > 1e-2


def test_plot_is_written_when_matplotlib_is_installed(trained):
    _, folder, path = trained
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "training_plot.png" not in path.read_text() and not (folder / "training_plot.png").exists()
        pytest.skip("matplotlib not installed: the card says nothing about a plot (checked)")
    png = (folder / "training_plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "![Training loss components and evaluation metrics](training_plot.png)" in path.read_text()


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}")[1].split("\n## ")[0]


def test_card_names_the_local_base_model_by_its_folder_name(trained, tiny_xlmr_path):
    _, folder, path = trained
    text = path.read_text()
    assert tiny_xlmr_path not in text and str(Path(tiny_xlmr_path).parent) not in text
    assert "from `model`." in text  # tiny_xlmr_path is <tmp>/tiny_xlmr0/model
    assert json.loads((folder / CARD_DATA_FILE).read_text())["base_model"] == "model"


def test_card_command_keeps_what_the_folder_records(trained, tmp_path, capsys):
    """`ark-hf card` on a saved folder without trainer_state.json: the data sizes, evaluation sets and the
    evaluation table of the card written at training time stay; the metadata given then stays too."""
    trainer, folder, _ = trained
    copy = tmp_path / "tiny-m3"
    shutil.copytree(folder, copy)
    write_model_card(trainer, copy, model_name="tiny-m3", tags=["test"], language="en", license="mit")
    before = (copy / "README.md").read_text()
    assert not (copy / "trainer_state.json").exists() and "## Evaluation" in before
    assert main(["card", str(copy), "--model_name", "tiny-m3"]) == 0
    assert f"evaluation rows from {CARD_DATA_FILE}" in capsys.readouterr().out
    after = (copy / "README.md").read_text()
    for heading in ("Training data", "Evaluation", "Hyperparameters", "Objective", "Model", "Citation"):
        assert _section(after, heading) == _section(before, heading), heading
    assert "6 records" in after and "(not recorded)" not in after
    card = ModelCard.load(copy / "README.md")
    assert card.data.language == "en" and card.data.license == "mit" and "test" in card.data.tags


def test_card_cites_ark_when_its_alignment_ran(trained, tmp_path):
    trainer, folder, _ = trained
    copy = tmp_path / "aligned"
    shutil.copytree(folder, copy)
    probe = [
        {"query": "how long for permit 1?", "pos": ["Permit 1 takes 3 weeks."], "neg": ["The library opens at 9."],
         "alignment": {"index": 0, "pos": [{"forward": 0.1, "backward": 0.2, "parameter": 0.3, "tokens": 10,
                                            "score": 0.4}],
                       "neg": [{"forward": 0.0, "backward": 0.1, "parameter": 0.0, "tokens": 10, "score": 0.1}]}}
    ]  # fmt: skip
    callback = AlignmentCallback(probe, every_n_steps=1000)
    trainer.add_callback(callback)
    try:
        write_model_card(trainer, copy)
    finally:
        trainer.remove_callback(callback)
    assert "2511.16326" in (copy / "README.md").read_text()
    assert main(["card", str(copy)]) == 0  # the rewrite from the saved files still knows
    assert "2511.16326" in (copy / "README.md").read_text()


def test_check_hub_push_names_the_reason(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    args = _config(tmp_path, push_to_hub=False, hub_model_id="user/tiny")
    check_hub_push(args)  # off: nothing to check
    args.push_to_hub = True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE=1"):
        check_hub_push(args)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        check_hub_push(args)
    args.hub_token = "hf_dummy"
    check_hub_push(args)
    args.hub_model_id = "user/bad name"
    with pytest.raises(HubPushError, match="not a valid Hub repository id"):
        check_hub_push(args)


def test_push_runs_up_to_the_upload_with_the_exact_files(tiny_xlmr_path, tmp_path, monkeypatch):
    """`Trainer.push_to_hub` through huggingface_hub's real `upload_folder`; only the HTTP calls are replaced."""
    from huggingface_hub import HfApi, RepoUrl

    committed: dict = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: RepoUrl("https://huggingface.co/user/tiny-m3"))
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **k: None)
    # the single-commit path: all files of the push reach one `create_commit` call
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)

    def create_commit(self, repo_id, operations, **kwargs):
        committed["repo_id"] = repo_id
        committed["files"] = sorted(op.path_in_repo for op in operations)
        return None

    monkeypatch.setattr(HfApi, "create_commit", create_commit)

    class CardTrainer(BGETrainer):
        def create_model_card(self, *args, **kwargs):  # what the trainer's hook does: ark_hf's card
            write_model_card(self, self.args.output_dir)

    config = _config(
        tmp_path, model_name_or_path=tiny_xlmr_path, push_to_hub=True, hub_model_id="user/tiny-m3", hub_token="x",
        eval_strategy="no", max_steps=1, save_strategy="no",
    )  # fmt: skip
    trainer = CardTrainer(config=config, train_dataset=RECORDS)
    trainer.train()
    (tmp_path / "out" / "_scratch.txt").write_text("ignored by the Trainer's patterns")
    trainer.push_to_hub()
    assert committed["repo_id"] == "user/tiny-m3"
    assert committed["files"] == upload_file_list(config.output_dir)
    expected = {
        "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "colbert_linear.pt", "sparse_linear.pt", "m3_heads.json", "modules.json", "1_Pooling/config.json",
        "sentence_bert_config.json", "config_sentence_transformers.json", "training_args.bin", CARD_DATA_FILE,
    }  # fmt: skip
    assert expected <= set(committed["files"])
    assert "_scratch.txt" not in committed["files"]
    assert set(committed["files"]) - expected <= {"special_tokens_map.json", "training_plot.png"}
    assert ModelCard.load(tmp_path / "out" / "README.md").data.library_name == "sentence-transformers"
