"""`BGETrainer` end to end on the tiny XLM-R (BGE-M3's architecture at test size, the real XLM-R tokenizer).

Every option of the objective trains without error and with a finite loss; online teachers (cross-encoder
and bi-encoder) score the groups; `fix_encoder` moves only the heads; both the seed's and `Trainer`'s
keyword spellings work; a non-empty output directory is refused untouched; saving writes the files that
FlagEmbedding and sentence-transformers read, and resuming restores the weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

from ark_hf.models.bge_m3 import COLBERT_FILE, SPARSE_FILE, BGEM3Model
from ark_hf.models.teacher import TeacherScorer, detect_teacher_kind
from ark_hf.trainer.base import OutputDirError
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer

HEADS = ("colbert_linear.", "sparse_linear.")


def make_records(with_scores: bool = True, n: int = 4) -> list[dict]:
    records = []
    for i in range(n):
        record = {
            "query": f"how long does permit {i} take",
            "pos": [f"Permit {i} takes {i + 2} weeks to process at the city office.", f"About {i + 2} weeks for {i}."],
            "neg": [f"Parking rules changed in district {i}.", f"The library opens at {i + 8}.", f"Noise rule {i}."],
        }
        if with_scores:
            record["pos_scores"] = [5.0 - i, 4.0]
            record["neg_scores"] = [1.0, -1.0 + i, 0.5]
        records.append(record)
    return records


@pytest.fixture(scope="module")
def tokenizer(tiny_xlmr_path):
    """Loaded once: the 250k-id tokenizer takes seconds to load."""
    return AutoTokenizer.from_pretrained(tiny_xlmr_path)


def make_model(path, tokenizer, **kwargs) -> BGEM3Model:
    torch.manual_seed(0)
    kwargs.setdefault("init_missing_heads", True)
    return BGEM3Model(path, tokenizer=tokenizer, **kwargs)


def make_config(tmp_path, name="out", **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(tmp_path / name), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16,
        max_steps=2, logging_steps=1, learning_rate=1e-3, seed=11, init_missing_heads=True,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def train_losses(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------------------------------ (a) canonical
def test_trains_backbone_and_heads_and_logs_components(tiny_xlmr_path, tokenizer, tmp_path):
    model = make_model(tiny_xlmr_path, tokenizer)
    before = snapshot(model)
    config = make_config(tmp_path, max_steps=3, use_self_distill=True)
    trainer = BGETrainer(model=model, config=config, train_dataset=make_records())
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert math.isfinite(result.training_loss)
    moved = changed(model, before)
    for name in ("colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"):
        assert name in moved, name
    assert "model.encoder.layer.0.attention.self.query.weight" in moved
    assert "model.encoder.layer.1.output.dense.weight" in moved
    assert "model.embeddings.word_embeddings.weight" in moved
    logs = train_losses(trainer)
    assert [h["step"] for h in logs] == [1, 2, 3]
    for entry in logs:
        for key in ("loss", "loss_dense", "loss_lex", "loss_mul", "loss_inter", "loss_self_distill"):
            assert math.isfinite(entry[key]), (key, entry)
        assert entry["loss_dense"] > 0 and entry["loss_inter"] > 0


# ------------------------------------------------------------------------------------------ (b) combinations
def _combinations():
    heads = [(False, False), (True, False), (True, True)]  # (unified, self_distill): self-distill needs unified
    for (unified, self_distill), kd, in_batch, checkpointing in itertools.product(
        heads, [None, "kl_div", "m3_kd_loss"], [True, False], [False, True]
    ):
        name = "-".join(
            [
                "unified" if unified else "dense",
                *(["self_distill"] if self_distill else []),
                kd or "no_kd",
                "in_batch" if in_batch else "own_group",
                *(["checkpointing"] if checkpointing else []),
            ]
        )
        yield pytest.param(unified, self_distill, kd, in_batch, checkpointing, id=name)


@pytest.mark.parametrize(("unified", "self_distill", "kd", "in_batch", "checkpointing"), list(_combinations()))
def test_every_option_combination_trains(
    tiny_xlmr_path, tokenizer, tmp_path, unified, self_distill, kd, in_batch, checkpointing
):
    model = make_model(tiny_xlmr_path, tokenizer, unified_finetuning=unified)
    before = snapshot(model)
    config = make_config(
        tmp_path,
        unified_finetuning=unified,
        use_self_distill=self_distill,
        knowledge_distillation=kd is not None,
        kd_loss_type=kd or "m3_kd_loss",
        in_batch_negatives=in_batch,
        gradient_checkpointing=checkpointing,  # no kwargs: BGEM3Model's default must be non-reentrant
    )
    trainer = BGETrainer(model=model, config=config, train_dataset=make_records(with_scores=kd is not None))
    if kd is not None:
        assert trainer.train_dataset.use_teacher_scores
    trainer.train()
    assert model.model.is_gradient_checkpointing == checkpointing
    if checkpointing:
        for layer in model.model.encoder.layer:
            assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {
                "use_reentrant": False
            }
    logs = train_losses(trainer)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(("loss_lex" in h) == unified and ("loss_self_distill" in h) == self_distill for h in logs)
    moved = changed(model, before)
    assert "model.encoder.layer.0.attention.self.query.weight" in moved
    assert ({n for n in moved if n.startswith(HEADS)} != set()) == unified  # dense-only leaves the heads alone


def test_gradient_checkpointing_gives_the_same_gradients(tiny_xlmr_path, tokenizer, tmp_path):
    """Non-reentrant checkpointing recomputes the forward pass; the gradients must not change."""
    records = make_records()
    grads = []
    for checkpointing in (False, True):
        model = make_model(tiny_xlmr_path, tokenizer).train()
        for module in model.modules():  # no dropout: both runs see the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        config = make_config(tmp_path, name=f"gc{checkpointing}", use_self_distill=True)
        trainer = BGETrainer(model=model, config=config, train_dataset=records)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.is_gradient_checkpointing
        batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
        trainer.compute_loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_unified", [False, True])
def test_config_decides_unified_finetuning_over_the_model_flag(
    xlmr_with_heads_path, tokenizer, tmp_path, model_unified
):
    """A model built with the other `unified_finetuning` (heads loaded from its folder) follows the config."""
    model = BGEM3Model(xlmr_with_heads_path, unified_finetuning=model_unified, tokenizer=tokenizer)
    assert model.has_heads
    before = snapshot(model)
    config = make_config(tmp_path, unified_finetuning=not model_unified)
    trainer = BGETrainer(model=model, config=config, train_dataset=make_records())
    assert model.unified_finetuning == config.unified_finetuning
    trainer.train()
    logs = train_losses(trainer)
    assert all(("loss_lex" in h) == config.unified_finetuning and math.isfinite(h["loss"]) for h in logs)
    assert bool({n for n in changed(model, before) if n.startswith(HEADS)}) == config.unified_finetuning


# ---------------------------------------------------------------------------------------- (c) online teachers
@pytest.fixture(scope="module")
def cross_encoder_path(tiny_xlmr_path, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "cross_encoder"
    torch.manual_seed(5)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, num_labels=1,
        initializer_range=0.5,  # logits that differ by several units between pairs: a teacher with an opinion
    )  # fmt: skip
    XLMRobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bi_encoder_path(minilm_path, tmp_path_factory):
    """An ark_hf-saved BGE-M3 folder (loadable as a sentence-transformers bi-encoder) on the real MiniLM: the
    random tiny XLM-R gives every text nearly the same CLS vector (cosines ~1.0), which would test nothing."""
    folder = tmp_path_factory.mktemp("teacher") / "bi_encoder"
    BGEM3Model(minilm_path, init_missing_heads=True).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def xlmr_with_heads_path(tiny_xlmr_path, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny_m3"
    make_model(tiny_xlmr_path, tokenizer).save_pretrained(folder)
    return str(folder)


def test_cross_encoder_teacher_scores_are_its_logits(cross_encoder_path, tokenizer):
    scorer = TeacherScorer(cross_encoder_path, max_length=32, batch_size=3)
    assert scorer.kind == "cross-encoder"
    queries = ["how long does a permit take", "parking rules"]
    passages = ["Permits take two weeks.", "The library opens at nine.", "Parking is free on Sundays.", "Hello."]
    scores = scorer.score(queries, passages)
    model = XLMRobertaForSequenceClassification.from_pretrained(cross_encoder_path).eval()
    pairs = tokenizer(
        [queries[i // 2] for i in range(4)],
        passages,
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**pairs).logits.squeeze(-1).view(2, 2)
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, logits, rtol=1e-5, atol=1e-5)  # raw logits: no sigmoid
    assert not torch.allclose(scores, torch.sigmoid(logits))


@pytest.mark.slow
def test_cross_encoder_saved_by_sentence_transformers_is_still_a_cross_encoder(cross_encoder_path, tmp_path):
    """sentence-transformers >= 5 writes modules.json for cross-encoders too; that must not make a bi-encoder."""
    from sentence_transformers import CrossEncoder

    CrossEncoder(cross_encoder_path).save_pretrained(str(tmp_path / "st_cross"))
    assert (tmp_path / "st_cross" / "modules.json").is_file()
    assert detect_teacher_kind(str(tmp_path / "st_cross")) == "cross-encoder"
    queries, passages = ["how long does a permit take"], ["Permits take two weeks.", "The library opens at nine."]
    expected = TeacherScorer(cross_encoder_path).score(queries, passages)
    scorer = TeacherScorer(str(tmp_path / "st_cross"))
    assert scorer.kind == "cross-encoder"
    torch.testing.assert_close(scorer.score(queries, passages), expected, rtol=1e-5, atol=1e-5)


def test_bi_encoder_teacher_scores_are_cosines(bi_encoder_path):
    scorer = TeacherScorer(bi_encoder_path)
    assert scorer.kind == "bi-encoder"
    queries = ["how long does a permit take", "parking rules"]
    passages = ["Permits take two weeks.", "The library opens at nine.", "Parking is free on Sundays.", "Hello."]
    scores = scorer.score(queries, passages)
    model = BGEM3Model(bi_encoder_path)
    q, p = model.encode(queries)["dense_vecs"], model.encode(passages)["dense_vecs"]
    expected = torch.tensor([[q[b] @ p[b * 2 + k] for k in range(2)] for b in range(2)])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert (scores.max() - scores.min()) > 0.1  # pairs are told apart: a wrong pairing would not pass


@pytest.mark.parametrize("teacher", ["cross_encoder_path", "bi_encoder_path"])
def test_online_teacher_trains_on_data_without_scores(tiny_xlmr_path, tokenizer, tmp_path, teacher, request):
    teacher_path = request.getfixturevalue(teacher)
    model = make_model(tiny_xlmr_path, tokenizer)
    config = make_config(
        tmp_path, knowledge_distillation=True, teacher_model=teacher_path, kd_loss_type="kl_div", use_self_distill=True
    )
    trainer = BGETrainer(model=model, config=config, train_dataset=make_records(with_scores=False))
    assert trainer.teacher is not None
    assert not trainer.train_dataset.use_teacher_scores
    calls = []
    score = trainer.teacher.score

    def spy(queries, passages):
        out = score(queries, passages)
        calls.append((list(queries), list(passages), out))
        return out

    trainer.teacher.score = spy
    trainer.train()
    assert len(calls) == 2  # one teacher pass per step
    queries, passages, scores = calls[0]
    assert len(queries) == 2 and len(passages) == 4 and scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert all(math.isfinite(h["loss"]) for h in train_losses(trainer))


def test_online_teacher_scores_reach_the_loss(tiny_xlmr_path, tokenizer, tmp_path, cross_encoder_path):
    """The loss with the online teacher equals the loss with those scores given as precomputed data."""
    model = make_model(tiny_xlmr_path, tokenizer).eval()
    online = BGETrainer(
        model=model,
        config=make_config(tmp_path, name="a", knowledge_distillation=True, teacher_model=cross_encoder_path),
        train_dataset=make_records(with_scores=False),
    )
    precomputed = BGETrainer(
        model=model, config=make_config(tmp_path, name="b", knowledge_distillation=True), train_dataset=make_records()
    )
    items = [online.train_dataset[0], online.train_dataset[1]]
    batch = online.data_collator(items)
    scores = online.teacher.score(batch["query_texts"], batch["passage_texts"])
    with torch.no_grad():
        loss_online = online.compute_loss(model, batch)
        plain = {k: v for k, v in batch.items() if k not in ("query_texts", "passage_texts")}
        loss_given = precomputed.compute_loss(model, {**plain, "teacher_scores": scores})
        loss_flat = precomputed.compute_loss(model, {**plain, "teacher_scores": torch.zeros_like(scores)})
    torch.testing.assert_close(loss_online, loss_given)
    assert not torch.allclose(loss_online, loss_flat)  # the teacher's scores matter


# ------------------------------------------------------------------------------------------- (d) fix_encoder
def test_fix_encoder_trains_only_the_heads(tiny_xlmr_path, tokenizer, tmp_path):
    model = make_model(tiny_xlmr_path, tokenizer)
    before = snapshot(model)
    trainer = BGETrainer(
        model=model,
        config=make_config(tmp_path, fix_encoder=True, use_self_distill=True),
        train_dataset=make_records(),
    )
    trainer.train()
    moved = changed(model, before)
    assert moved == {n for n in before if n.startswith(HEADS)}
    assert len(moved) == 4
    assert all(math.isfinite(h["loss"]) for h in train_losses(trainer))


# ---------------------------------------------------------------------------------------- (e) keyword spellings
def test_seed_and_trainer_keyword_spellings(tiny_xlmr_path, tokenizer, tmp_path):
    records = make_records()
    config = make_config(tmp_path)
    model = make_model(tiny_xlmr_path, tokenizer)
    seed_style = BGETrainer(model=model, config=config, tokenizer=tokenizer, train_dataset=records)
    hf_style = BGETrainer(model=model, args=config, processing_class=tokenizer, train_dataset=records)
    positional = BGETrainer(model, config, records)
    for trainer in (seed_style, hf_style, positional):
        assert trainer.args is config
        assert trainer.processing_class is tokenizer
        assert trainer.data_collator.tokenizer is tokenizer
        assert len(trainer.train_dataset) == len(records)
    other = make_config(tmp_path, name="other")
    with pytest.raises(ValueError, match="once"):
        BGETrainer(model=model, args=config, config=other, train_dataset=records)
    with pytest.raises(ValueError, match="once"):
        BGETrainer(model=model, args=config, tokenizer=tokenizer, processing_class=object(), train_dataset=records)
    with pytest.raises(ValueError, match="BGETrainerConfig"):
        BGETrainer(model=model, train_dataset=records)
    with pytest.raises(TypeError, match="BGETrainerConfig"):
        from transformers import TrainingArguments

        BGETrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True))


def test_model_none_is_built_from_the_config(tiny_xlmr_path, tmp_path):
    config = make_config(tmp_path, model_name_or_path=tiny_xlmr_path, colbert_dim=8, max_steps=1)
    trainer = BGETrainer(model=None, config=config, train_dataset=make_records())
    model = trainer.model
    assert isinstance(model, BGEM3Model) and model.has_heads and model.colbert_linear.out_features == 8
    assert trainer.processing_class is model.tokenizer
    trainer.train()
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="model_name_or_path"):
        BGETrainer(model=None, config=make_config(tmp_path, name="y"), train_dataset=make_records())


# -------------------------------------------------------------------------------------- (f) output dir refusal
def test_non_empty_output_dir_is_refused_and_untouched(tiny_xlmr_path, tokenizer, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    files = {out / "model.safetensors": b"weights of another run", out / "checkpoint-7" / "trainer_state.json": b"{}"}
    for path, content in files.items():
        path.write_bytes(content)
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    model = make_model(tiny_xlmr_path, tokenizer)
    before = snapshot(model)
    trainer = BGETrainer(
        model=model, config=make_config(tmp_path, save_strategy="steps", save_steps=1), train_dataset=make_records()
    )
    with pytest.raises(OutputDirError, match="not empty"):
        trainer.train()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing
    for path, content in files.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtimes[path]
    assert trainer.state.global_step == 0 and not changed(model, before)

    allowed = BGETrainer(
        model=model,
        config=make_config(tmp_path, overwrite_output_dir=True, save_strategy="steps", save_steps=2),
        train_dataset=make_records(),
    )
    allowed.train()
    assert (out / "checkpoint-2" / COLBERT_FILE).is_file()


# ---------------------------------------------------------------------------------------- (g) save and resume
def test_save_model_writes_flagembedding_and_sentence_transformers_files(tiny_xlmr_path, tokenizer, tmp_path):
    model = make_model(tiny_xlmr_path, tokenizer)
    trainer = BGETrainer(model=model, config=make_config(tmp_path), train_dataset=make_records())
    trainer.train()
    target = tmp_path / "final"
    trainer.save_model(str(target))
    for name in (COLBERT_FILE, SPARSE_FILE, "modules.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (target / name).is_file(), name
    head = torch.load(target / SPARSE_FILE, weights_only=True)
    torch.testing.assert_close(head["weight"], model.sparse_linear.weight.detach(), rtol=0, atol=0)
    reloaded = BGEM3Model.from_pretrained(str(target), tokenizer=tokenizer)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name


def test_checkpoint_resume_restores_weights_via_load_weights_from(tiny_xlmr_path, tokenizer, tmp_path, monkeypatch):
    records = make_records()
    config = make_config(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    first = make_model(tiny_xlmr_path, tokenizer)
    BGETrainer(model=first, config=config, train_dataset=records).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    for name in (COLBERT_FILE, SPARSE_FILE, "modules.json", "model.safetensors", "trainer_state.json", "optimizer.pt"):
        assert (checkpoint / name).is_file(), name
    assert (tmp_path / "out" / "checkpoint-1").is_dir()

    calls = []
    original = BGEM3Model.load_weights_from

    def spy(self, path):
        calls.append(str(path))
        return original(self, path)

    monkeypatch.setattr(BGEM3Model, "load_weights_from", spy)
    second = make_model(tiny_xlmr_path, tokenizer)
    second_before = snapshot(second)
    # max_steps reached: resuming trains no further step, so the weights are exactly the checkpoint's
    BGETrainer(model=second, config=config, train_dataset=records).train(resume_from_checkpoint=str(checkpoint))
    assert calls == [str(checkpoint)]
    assert changed(second, second_before)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


@pytest.mark.slow
def test_evaluation_during_training_drives_best_model_selection(tiny_xlmr_path, tmp_path):
    """`eval_*` metrics from the IR evaluator feed metric_for_best_model and load_best_model_at_end."""
    import json as _json

    from ark_hf import BGEM3Model as _Model
    from ark_hf import BGETrainer as _Trainer
    from ark_hf import BGETrainerConfig as _Config

    rows = [{"query": f"question {i} about roofs", "pos": [f"answer {i}: roofs need permits after {i} years"],
             "neg": [f"unrelated {i} {k}" for k in range(2)]} for i in range(12)]  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(_json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n" for r in rows[:6]))
    config = _Config(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True, max_steps=4,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16,
        init_missing_heads=True, train_data=[str(train)], eval_data=str(dev),
        eval_modes=["dense", "sparse", "all"], eval_strategy="steps", eval_steps=2, save_strategy="steps",
        save_steps=2, metric_for_best_model="all_ndcg@10", load_best_model_at_end=True, learning_rate=1e-3,
        greater_is_better=False,  # "best" = the lower score, so the best checkpoint is not simply the last one
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = _Trainer(model=_Model(tiny_xlmr_path, init_missing_heads=True), config=config)
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_all_ndcg@10" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert {"eval_dense_ndcg@10", "eval_sparse_mrr@10", "eval_all_recall@100", "eval_dense_map"} <= set(h)
    best = min(evals, key=lambda h: h["eval_all_ndcg@10"])
    assert best["step"] == 2  # training raised the score between the two evaluations
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert trainer.state.best_metric == pytest.approx(best["eval_all_ndcg@10"])
    reloaded = _Model.from_pretrained(trainer.state.best_model_checkpoint)
    live = trainer.accelerator.unwrap_model(trainer.model)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, live.state_dict()[name].detach().cpu()), name
    last = _Model.from_pretrained(str(tmp_path / "out" / "checkpoint-4"))
    assert not torch.equal(last.colbert_linear.weight, live.colbert_linear.weight.detach().cpu())
