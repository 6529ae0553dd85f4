"""QwenTrainer / create_qwen_trainer / QwenTrainerConfig on a tiny random Qwen3 with the real Qwen3 tokenizer.

The canonical trainer test (TRL style) trains two steps with the seed's exact `create_qwen_trainer` call and
checks that every trainable tensor moved and the loss is finite; the other tests check what users of the
family rely on: ms-swift data trains unchanged, LoRA trains only adapters, the saved folder reproduces the
training-time embeddings in sentence-transformers, Matryoshka weighting, and refusals of impossible configs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ark_hf import QwenTrainer, QwenTrainerConfig, create_qwen_trainer
from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.qwen3 import qwen3_infonce_loss
from ark_hf.models.decoder import DEFAULT_INSTRUCTION
from ark_hf.models.outputs import EmbeddingOutput, RetrieverOutput

QUERIES = ["how long does a building permit take", "do I need a permit for a garden shed"]
DOCUMENTS = ["Permits take about ten weeks in Helsingborg.", "Small sheds under fifteen square metres need none."]
QUICK = dict(use_cpu=True, report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no", seed=7)


def write_ark(path, n=16):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            record = {"query": f"question {i} about building permits", "pos": [f"answer {i}: permits take {i} weeks"],
                      "neg": [f"unrelated text {i} number {k}" for k in range(3)]}  # fmt: skip
            handle.write(json.dumps(record) + "\n")
    return str(path)


def write_swift(path, n=12):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            record = {
                "messages": [
                    {"role": "system", "content": "Find the answer to a construction question"},
                    {"role": "user", "content": f"swift question {i}"},
                ],
                "positive_messages": [[{"role": "user", "content": f"swift answer {i}"}]],
                "negative_messages": [[{"role": "user", "content": f"swift negative {i} {k}"}] for k in range(2)],
            }
            handle.write(json.dumps(record) + "\n")
    return str(path)


def trainable_snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def finite_losses(trainer):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    return losses


@pytest.fixture(scope="module")
def seed_run(tiny_qwen3_path, tmp_path_factory):
    """The seed's exact call (+ the tiny model, CPU, 2 steps), trained once for the tests below."""
    root = tmp_path_factory.mktemp("qwen_seed")
    data = write_ark(root / "train.jsonl")
    torch.manual_seed(0)
    trainer = create_qwen_trainer(
        dataset_paths=[data],
        output_dir=str(root / "out"),
        learning_rate=6e-6,
        num_train_epochs=10,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=16,
        model_name_or_path=tiny_qwen3_path,
        use_cpu=True,
        max_steps=2,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
    )
    before = trainable_snapshot(trainer.model)
    trainer.train()
    return trainer, before, root


def test_seed_call_trains_two_steps_and_moves_every_trainable_tensor(seed_run, tiny_qwen3_path):
    trainer, before, _ = seed_run
    assert isinstance(trainer, QwenTrainer)
    assert trainer.args.model_name_or_path == tiny_qwen3_path and trainer.args.learning_rate == 6e-6
    assert trainer.state.global_step == 2
    finite_losses(trainer)
    after = dict(trainer.model.named_parameters())
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name].detach())]
    assert not unchanged, unchanged
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("masked_negatives" in entry and "negatives" in entry for entry in logged)
    # the collator appends <|endoftext|> (151643) after truncation: the pooled token of every text
    batch = trainer.data_collator([trainer.train_dataset[0]])
    for features in (batch["query"], batch["passages"]):
        last = features["attention_mask"].shape[1] - 1 - features["attention_mask"].flip(1).argmax(1)
        assert features["input_ids"][torch.arange(len(last)), last].tolist() == [151643] * len(last)


def test_default_config_is_qwen3_embedding():
    config = QwenTrainerConfig(output_dir="unused", use_cpu=True)
    assert config.model_name_or_path == "Qwen/Qwen3-Embedding-0.6B"
    assert config.learning_rate == 6e-6 and config.temperature == 0.1 and config.false_negative_margin == 0.1
    assert config.use_qq and config.use_dd and config.use_inbatch_qd and config.mask_false_negatives
    assert (config.lora_r, config.lora_alpha, config.lora_target_modules) == (8, 32, ["all-linear"])
    assert config.query_instruction == DEFAULT_INSTRUCTION
    assert config.query_instruction_format.format("task", "q") == "Instruct: task\nQuery:q"
    assert config.activation_checkpointing is True
    assert (
        QwenTrainerConfig(output_dir="unused", use_cpu=True, gradient_checkpointing=False).activation_checkpointing
        is False
    )


def test_ms_swift_file_trains_unchanged(tiny_qwen3_path, tmp_path):
    data = write_swift(tmp_path / "swift.jsonl")
    trainer = create_qwen_trainer(
        dataset_paths=[data], output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        model_name_or_path=tiny_qwen3_path, max_steps=2, train_group_size=3, **QUICK,
    )  # fmt: skip
    item = trainer.train_dataset[0]
    # the system message is the record's instruction, in Qwen3-Embedding's query format
    assert item["query"] == "Instruct: Find the answer to a construction question\nQuery:swift question 0"
    assert item["passages"][0] == "swift answer 0"
    assert sorted(item["passages"][1:]) == ["swift negative 0 0", "swift negative 0 1"]
    trainer.train()
    assert trainer.state.global_step == 2
    finite_losses(trainer)


def test_lora_trains_only_the_adapters(tiny_qwen3_path, tmp_path):
    data = write_ark(tmp_path / "train.jsonl", n=8)
    torch.manual_seed(0)
    trainer = create_qwen_trainer(
        dataset_paths=data, output_dir=str(tmp_path / "out"), learning_rate=1e-3, per_device_train_batch_size=4,
        model_name_or_path=tiny_qwen3_path, lora=True, max_steps=2, train_group_size=2, **QUICK,
    )  # fmt: skip
    before = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    finite_losses(trainer)
    after = trainer.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora_keys = {name for name in before if "lora_" in name}
    assert lora_keys and changed
    assert changed <= lora_keys, sorted(changed - lora_keys)
    assert {name for name in lora_keys if "lora_B" in name} <= changed  # B starts at zero: all of it moved
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in lora_keys if name in trainable} and trainable


def test_fresh_lora_weights_follow_the_seed(tiny_qwen3_path, tmp_path):
    """The model a config builds is seeded: the same `seed` gives the same LoRA init whatever ran before (every
    launch and every rank; FSDP and ZeRO-3 shard each rank's own copy), another seed another init."""
    data = write_ark(tmp_path / "train.jsonl", n=8)

    def lora_init(seed, before):
        torch.manual_seed(before)  # the global RNG state before the trainer is built must not matter
        trainer = create_qwen_trainer(
            dataset_paths=data, output_dir=str(tmp_path / f"out{seed}"), per_device_train_batch_size=4,
            model_name_or_path=tiny_qwen3_path, lora=True, max_steps=1, train_group_size=2, **{**QUICK, "seed": seed},
        )  # fmt: skip
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k}

    first, again, other = lora_init(7, before=1), lora_init(7, before=2), lora_init(8, before=1)
    assert first and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def training_time_embeddings(trainer, texts, instruction):
    """Embeddings as a training step computes them: the dataset's query format, the collator, the forward pass."""
    config = trainer.args
    items = [
        {
            "query": config.query_instruction_format.format(instruction, text) if instruction else text,
            "passages": [text],
        }
        for text in texts
    ]
    batch = trainer.data_collator(items)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        output = model(query=batch["query"], passages=batch["passages"])
    model.train()
    return output.query.dense.numpy(), output.passages.dense.numpy()


def test_saved_model_reproduces_training_embeddings_in_sentence_transformers(seed_run):
    from sentence_transformers import SentenceTransformer

    trainer, _, root = seed_run
    final = root / "final"
    trainer.save_model(str(final))
    expected_queries, _ = training_time_embeddings(trainer, QUERIES, DEFAULT_INSTRUCTION)
    _, expected_documents = training_time_embeddings(trainer, DOCUMENTS, None)
    st_model = SentenceTransformer(str(final), device="cpu")
    np.testing.assert_allclose(st_model.encode(QUERIES, prompt_name="query"), expected_queries, atol=1e-5)
    np.testing.assert_allclose(st_model.encode(DOCUMENTS), expected_documents, atol=1e-5)
    # and the query prompt matters: without it the embeddings differ
    assert np.abs(st_model.encode(QUERIES) - expected_queries).max() > 1e-3


def test_matryoshka_loss_is_the_weighted_sum_over_sizes(tiny_qwen3_path, tmp_path):
    data = write_ark(tmp_path / "train.jsonl", n=8)
    trainer = create_qwen_trainer(
        dataset_paths=data, output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        model_name_or_path=tiny_qwen3_path, matryoshka_dims=[8, 32], matryoshka_weights=[0.5, 2.0],
        max_steps=1, train_group_size=2, **QUICK,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    query, docs = torch.randn(3, 32, generator=generator), torch.randn(6, 32, generator=generator)
    outputs = RetrieverOutput(
        query=EmbeddingOutput(dense=F.normalize(query, dim=-1)),
        passages=EmbeddingOutput(dense=F.normalize(docs, dim=-1)),
    )
    hashes = torch.arange(6)
    loss, components = trainer.loss(outputs.query, outputs.passages, RetrievalBatch(2, passage_hashes=hashes))
    expected = 0.0
    for dim, weight in ((8, 0.5), (32, 2.0)):
        # slice the raw vectors and normalise: the Matryoshka view
        part, _ = qwen3_infonce_loss(
            F.normalize(query[:, :dim], dim=-1),
            F.normalize(docs[:, :dim], dim=-1),
            2,
            temperature=0.1,
            doc_hashes=hashes,
        )
        assert float(components[f"loss_dim_{dim}"]) == pytest.approx(float(part), rel=1e-5)
        expected += weight * float(part)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert {"loss_dim_8", "loss_dim_32", "masked_negatives"} <= set(logged[0])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"false_negative_margin": -0.1}, "false_negative_margin"),
        ({"in_batch_negatives": False, "train_group_size": 1}, "no negatives"),
        ({"use_qq": False, "use_dd": False, "use_inbatch_qd": False, "train_group_size": 1}, "no negatives"),
        ({"negatives_cross_device": True, "in_batch_negatives": False}, "negatives_cross_device"),
        ({"matryoshka_dims": [8, 16], "matryoshka_weights": [1.0]}, "matryoshka_weights"),
        ({"matryoshka_weights": [1.0]}, "matryoshka_dims"),
        ({"matryoshka_dims": [8, 8]}, "duplicates"),
        ({"query_instruction_format": "Instruct: {}"}, "query_instruction_format"),
        ({"lora": True, "lora_r": 0}, "lora_r"),
        ({"torch_dtype": "float64"}, "torch_dtype"),
        ({"curriculum": "plan.yaml", "train_data": ["x.jsonl"]}, "curriculum and train_data"),
    ],
)
def test_impossible_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        QwenTrainerConfig(output_dir="unused", use_cpu=True, **fields)


def test_create_qwen_trainer_names_unknown_fields(tmp_path):
    with pytest.raises(TypeError, match="temprature.*did you mean temperature"):
        create_qwen_trainer(dataset_paths=["x.jsonl"], output_dir=str(tmp_path / "out"), temprature=0.05)
    with pytest.raises(ValueError, match="no training data"):
        create_qwen_trainer(output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_training_data_fails_before_the_model_loads(tmp_path):
    from ark_hf.data.schema import DataValidationError

    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": ["p"]}\n{"query": "", "pos": ["p"]}\n', encoding="utf-8")
    out = tmp_path / "out"
    # the model folder does not exist: the data check must come first
    with pytest.raises(DataValidationError, match=rf"{data}:2: field 'query'"):
        create_qwen_trainer(dataset_paths=[data], output_dir=str(out), model_name_or_path="/nonexistent", use_cpu=True)
    with pytest.raises(DataValidationError, match="field 'pos'"):
        create_qwen_trainer(
            output_dir=str(out),
            train_dataset=[{"query": "q", "pos": "p"}],
            model_name_or_path="/nonexistent",
            use_cpu=True,
        )
    assert not out.exists()


def test_shipped_qwen3_configs_parse(tmp_path, monkeypatch):
    from pathlib import Path

    from ark_hf.curriculum.plan import load_stage_plan
    from ark_hf.utils.cli import parse_config

    configs = Path(__file__).resolve().parents[1] / "recipes" / "configs"
    common = ["--output_dir", str(tmp_path / "o"), "--bf16", "false", "--use_cpu"]
    full = parse_config(QwenTrainerConfig, ["--config", str(configs / "qwen3_full.yaml"), *common])
    assert full.model_name_or_path == "Qwen/Qwen3-Embedding-0.6B" and full.learning_rate == 6e-6 and not full.lora
    lora = parse_config(QwenTrainerConfig, ["--config", str(configs / "qwen3_lora.yaml"), *common])
    assert lora.lora and (lora.lora_r, lora.lora_alpha, lora.learning_rate) == (8, 32, 5e-5)
    # the stage plan names example files (relative to the working directory): create them, then it parses
    monkeypatch.chdir(tmp_path)
    for name in ("stage1_pairs.jsonl", "stage2_supervised.jsonl", "stage2_synthetic_filtered.jsonl"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text("", encoding="utf-8")
    stages_file = str(configs / "qwen3_stages.yaml")
    curriculum = parse_config(
        QwenTrainerConfig, ["--config", str(configs / "qwen3_curriculum.yaml"), "--curriculum", stages_file, *common]
    )
    assert curriculum.curriculum == stages_file and curriculum.max_steps == -1
    stages = load_stage_plan(stages_file)
    assert [stage.name for stage in stages] == ["weak_pairs", "supervised", "merge"]
    assert stages[-1].merge.method == "slerp" and stages[-1].merge.last_n == 3


def test_per_dataset_and_per_record_instructions(tiny_qwen3_path, tmp_path):
    from ark_hf import QwenTrainer, QwenTrainerConfig
    from ark_hf.utils.cli import parse_config

    (tmp_path / "faq.jsonl").write_text(
        json.dumps({"query": "q1", "pos": ["a1"]}) + "\n"
        + json.dumps({"query": "q2", "pos": ["a2"], "prompt": "Own task"}) + "\n"
    )  # fmt: skip
    (tmp_path / "code.jsonl").write_text(json.dumps({"query": "q3", "pos": ["a3"]}) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"query": "q4", "pos": ["a4"]}) + "\n")
    yaml_file = tmp_path / "config.yaml"
    yaml_file.write_text("dataset_instructions:\n  faq: Answer the FAQ question\n  code.jsonl: Find the code\n")
    config = parse_config(
        QwenTrainerConfig,
        ["--config", str(yaml_file), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
         "--model_name_or_path", tiny_qwen3_path, "--train_group_size", "1",
         "--train_data", str(tmp_path / "faq.jsonl"), str(tmp_path / "code.jsonl"), str(tmp_path / "other.jsonl")],
    )  # fmt: skip
    trainer = QwenTrainer(config=config)
    queries = sorted(trainer.train_dataset[i]["query"] for i in range(4))
    default = config.query_instruction
    assert queries == sorted(
        [
            "Instruct: Answer the FAQ question\nQuery:q1",
            "Instruct: Own task\nQuery:q2",
            "Instruct: Find the code\nQuery:q3",
            f"Instruct: {default}\nQuery:q4",
        ]
    )
    on_cli = parse_config(
        QwenTrainerConfig,
        ["--output_dir", "o", "--use_cpu", "true", "--dataset_instructions", '{"faq": "From the command line"}'],
    )
    assert on_cli.dataset_instructions == {"faq": "From the command line"}
