"""Users' tools: pooling is one setting, BGE-M3 head selection and sparse health, quiet console and --verbose,
grouped --help, the Hub push refused before training, the card rewritten with the final evaluation.

(The mean-pooled folder loaded in FlagEmbedding as the card says, to 1e-5, is `tests/test_hub.py`'s
`test_snippets_run_and_give_ark_hf_vectors`.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ark_hf.cli import main
from ark_hf.losses.base import RetrievalBatch
from ark_hf.losses.m3 import M3Loss, sparse_health
from ark_hf.models.bge_m3 import BGEM3Model
from ark_hf.models.outputs import EmbeddingOutput
from ark_hf.trainer.bge_config import BGETrainerConfig
from ark_hf.trainer.bge_trainer import BGETrainer, build_bge_model
from ark_hf.utils.cli import parse_config

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"query": f"how long does permit {i} take", "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
     "neg": [f"Parking rules changed in district {i}."]}
    for i in range(6)
]  # fmt: skip
NOISE = ("Loading weights", "Writing model shards", "Setting accelerator to CPU", "LOAD REPORT")


def _config(tmp_path, **overrides) -> BGETrainerConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=2, query_max_len=12, passage_max_len=16, max_steps=2,
        logging_steps=1, learning_rate=1e-3, seed=3, init_missing_heads=True,
    )  # fmt: skip
    base.update(overrides)
    return BGETrainerConfig(**base)


# ------------------------------------------------------------------------------------------------ pooling
def test_pooling_conflict_is_refused_naming_both(tiny_xlmr_path, tmp_path):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True, pooling="mean")
    config = _config(tmp_path, sentence_pooling_method="last_token")
    with pytest.raises(ValueError, match=r"'mean'.*sentence_pooling_method='last_token'"):
        BGETrainer(model=model, config=config, train_dataset=RECORDS)


def test_default_pooling_follows_the_model(tiny_xlmr_path, tmp_path, caplog):
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True, pooling="mean")
    config = _config(tmp_path)
    assert config.sentence_pooling_method == "cls"  # the default
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="ark_hf.trainer.bge_trainer"):
            trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS)
    finally:
        hf_logging.set_verbosity_warning()
    assert trainer.args.sentence_pooling_method == "mean" and trainer.model.pooling == "mean"


@pytest.mark.slow
def test_saved_mean_folder_stays_mean_when_built_from_the_config(tiny_xlmr_path, tmp_path):
    folder = tmp_path / "mean_m3"
    BGEM3Model(tiny_xlmr_path, init_missing_heads=True, pooling="mean").save_pretrained(folder)
    config = _config(tmp_path, model_name_or_path=str(folder))
    trainer = BGETrainer(model=None, config=config, train_dataset=RECORDS)
    assert trainer.model.pooling == "mean" and config.sentence_pooling_method == "mean"
    # an explicit setting still decides for a model built from the config
    explicit = _config(tmp_path, model_name_or_path=str(folder), sentence_pooling_method="last_token")
    assert build_bge_model(explicit).pooling == "last_token"


# ------------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"heads": ["dense", "lexical"]}, "must be distinct names"),
        ({"heads": ["dense", "dense"]}, "must be distinct names"),
        ({"heads": ["sparse"], "unified_finetuning": False}, "needs unified_finetuning"),
        ({"heads": ["colbert"], "use_self_distill": True}, "at least two heads"),
        ({"heads": ["dense"], "fix_encoder": True}, "fix_encoder"),
    ],
)
def test_heads_are_validated(tmp_path, overrides, phrase):
    with pytest.raises(ValueError, match=phrase):
        _config(tmp_path, **overrides)


def test_heads_are_put_in_canonical_order(tmp_path):
    assert _config(tmp_path, heads=["sparse", "dense"]).trained_heads == ("dense", "sparse")
    assert _config(tmp_path).trained_heads == ("dense", "sparse", "colbert")
    assert _config(tmp_path, unified_finetuning=False).trained_heads == ("dense",)


def _outputs(seed: int, n: int, length: int, dim: int = 6) -> EmbeddingOutput:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 12, (n, length), generator=generator)  # a small vocabulary: many shared tokens
    weights = torch.rand(n, length, generator=generator, dtype=torch.float64)
    weights[:, -2:] = 0.0  # padding
    weights[0, :3] = 0.0
    mask = torch.ones(n, length - 1, dtype=torch.long)
    mask[:, -2:] = 0
    return EmbeddingOutput(
        dense=torch.nn.functional.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1),
        sparse_weights=weights,
        input_ids=ids,
        colbert=torch.randn(n, length - 1, dim, generator=generator, dtype=torch.float64),
        colbert_mask=mask,
    )


def _reference(query, passages, heads, group, temperature, self_distill):
    """float64, written out: per-head InfoNCE, ensemble over the chosen heads, self-distillation."""
    weights = {"dense": (1.0, 1.0, 1.0), "sparse": (0.3, 0.1, 0.1), "colbert": (1.0, 1.0, 1.0)}  # ens, L, L'
    n_q, n_p = query.dense.shape[0], passages.dense.shape[0]
    vocab = 12

    def lexical(out):
        vectors = torch.zeros(out.input_ids.shape[0], vocab, dtype=torch.float64)
        for row in range(out.input_ids.shape[0]):
            for token, weight in zip(out.input_ids[row].tolist(), out.sparse_weights[row].tolist()):
                vectors[row, token] = max(vectors[row, token].item(), weight)
        return vectors

    scores = {}
    scores["dense"] = query.dense @ passages.dense.T
    scores["sparse"] = lexical(query) @ lexical(passages).T
    colbert = torch.zeros(n_q, n_p, dtype=torch.float64)
    for i in range(n_q):
        for j in range(n_p):
            q = query.colbert[i][query.colbert_mask[i].bool()]
            p = passages.colbert[j][passages.colbert_mask[j].bool()]
            colbert[i, j] = (q @ p.T).max(dim=1).values.mean()
    scores["colbert"] = colbert
    scores = {h: s / temperature for h, s in scores.items()}
    targets = torch.arange(n_q) * group

    def ce(s):
        return -torch.log_softmax(s, dim=-1)[torch.arange(n_q), targets].mean()

    terms = [weights[h][1] * ce(scores[h]) for h in heads]
    inter = sum(weights[h][0] * scores[h] for h in heads)
    if len(heads) > 1:
        terms.append(ce(inter))
    loss = sum(terms) / len(terms)
    if self_distill:
        p = torch.softmax(inter, dim=-1)
        distill = sum(weights[h][2] * -(p * torch.log_softmax(scores[h], dim=-1)).sum(-1).mean() for h in heads) / len(
            heads
        )
        loss = (loss + distill) / 2
    return loss


@pytest.mark.parametrize(
    "heads", [("dense", "sparse"), ("dense", "colbert"), ("sparse", "colbert"), ("sparse",), ("colbert",)]
)
@pytest.mark.parametrize("self_distill", [False, True])
def test_m3_loss_over_chosen_heads_matches_a_float64_derivation(heads, self_distill):
    if self_distill and len(heads) < 2:
        pytest.skip("self-distillation needs an ensemble of two heads")
    query, passages = _outputs(0, 3, 7), _outputs(1, 6, 9)
    loss_fn = M3Loss(temperature=0.05, use_self_distill=self_distill, train_heads=heads)
    output = loss_fn(query, passages, RetrievalBatch(group_size=2), step=1)
    expected = _reference(query, passages, heads, 2, 0.05, self_distill)
    torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-10)
    names = {"sparse": "loss_lex", "colbert": "loss_mul"}
    assert {names[h] for h in heads if h in names} == {"loss_lex", "loss_mul"} & set(output.components)
    assert ("loss_inter" in output.components) == (len(heads) > 1)
    assert ("sparse/nonzero_tokens" in output.components) == ("sparse" in heads)
    expected_fields = {"dense"} | ({"sparse_weights", "input_ids"} if "sparse" in heads else set())
    expected_fields |= {"colbert", "colbert_mask"} if "colbert" in heads else set()
    assert set(loss_fn.heads) == expected_fields  # what a gradient cache keeps


def test_all_heads_is_the_unified_loss():
    query, passages = _outputs(2, 3, 7), _outputs(3, 6, 9)
    for self_distill in (False, True):
        chosen = M3Loss(temperature=0.05, use_self_distill=self_distill, train_heads=("dense", "sparse", "colbert"))
        default = M3Loss(temperature=0.05, use_self_distill=self_distill)
        batch = RetrievalBatch(group_size=2)
        assert chosen(query, passages, batch, 1).loss.item() == default(query, passages, batch, 1).loss.item()
        expected = _reference(query, passages, ("dense", "sparse", "colbert"), 2, 0.05, self_distill)
        torch.testing.assert_close(default(query, passages, batch, 1).loss, expected, rtol=1e-10, atol=1e-10)


def test_sparse_health_is_the_mean_per_text():
    q = torch.tensor([[0.0, 0.5, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 4.0], [0.0, 3.0, 0.0]])
    health = sparse_health(q, p)
    counts = [2, 0, 1, 3, 1]
    means = [1.0, 0.0, 2.0, 2.0, 3.0]
    assert health["sparse/nonzero_tokens"].item() == pytest.approx(np.mean(counts))
    assert health["sparse/mean_weight"].item() == pytest.approx(np.mean(means))


def test_training_some_heads_leaves_the_others_untouched(tiny_xlmr_path, tmp_path):
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, init_missing_heads=True)
    colbert_before = model.colbert_linear.weight.detach().clone()
    sparse_before = model.sparse_linear.weight.detach().clone()
    config = _config(tmp_path, heads=["dense", "sparse"], use_self_distill=True)
    trainer = BGETrainer(model=model, config=config, train_dataset=RECORDS)
    assert isinstance(trainer.loss, M3Loss) and trainer.loss.train_heads == ("dense", "sparse")
    trainer.train()
    assert torch.equal(model.colbert_linear.weight, colbert_before)
    assert not torch.equal(model.sparse_linear.weight, sparse_before)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("sparse/nonzero_tokens" in e and "sparse/mean_weight" in e for e in logged)
    assert all("loss_mul" not in e and "loss_inter" in e and "loss_self_distill" in e for e in logged)
    assert all(e["sparse/nonzero_tokens"] > 0 for e in logged)


# ------------------------------------------------------------------------------------------------ help
def test_recipe_help_lists_ark_hf_options_first_and_grouped(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(BGETrainerConfig, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    first_line = out.splitlines()[0]
    assert "--per_device_train_batch_size" not in first_line  # a short usage line, not every flag
    retriever, bge = out.index("RetrieverConfig (ark_hf options):"), out.index("BGETrainerConfig (ark_hf options):")
    training = out.index("TrainingArguments (transformers")
    assert out.index("--verbose") < retriever < out.index("--train_data") < bge < out.index("--heads") < training
    assert training < out.index("--per_device_train_batch_size") and training < out.index("--gradient_accumulation")


# ------------------------------------------------------------------------------------------------ push check
def test_push_to_hub_offline_fails_before_anything_runs(tiny_xlmr_path, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "pushed"
    status = main(
        ["train", "bge-m3", "--model_name_or_path", tiny_xlmr_path, "--train_data", str(tmp_path / "train.jsonl"),
         "--output_dir", str(out), "--use_cpu", "--push_to_hub", "--hub_model_id", "user/tiny"]
    )  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HF_HUB_OFFLINE" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # nothing written, no lock taken, no model loaded


# ------------------------------------------------------------------------------------------------ console
@pytest.fixture(scope="module")
def pooler_model(tmp_path_factory, tiny_xlmr_path):
    """The tiny XLM-R saved with a pooler: BGE-M3 drops it, so transformers' load report lists UNEXPECTED keys."""
    from transformers import AutoConfig, AutoTokenizer, XLMRobertaModel

    folder = tmp_path_factory.mktemp("pooler") / "model"
    torch.manual_seed(0)
    XLMRobertaModel(AutoConfig.from_pretrained(tiny_xlmr_path), add_pooling_layer=True).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_xlmr_path).save_pretrained(folder)
    return str(folder)


def _run_recipe(pooler_model, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    command = [
        sys.executable, str(ROOT / "recipes" / "bge_m3.py"), "--model_name_or_path", pooler_model,
        "--init_missing_heads", "--train_data", str(data), "--eval_data", str(data), "--output_dir",
        str(folder / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2", "--train_group_size", "2",
        "--query_max_len", "12", "--passage_max_len", "16", "--use_cpu", "--report_to", "none",
        "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DS_ACCELERATOR", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_configure_console_quiets_and_verbose_restores(pooler_model, tmp_path, capfd, caplog):
    from ark_hf.utils.cli import configure_console

    def run(verbose: bool, name: str) -> str:
        caplog.clear()
        configure_console(verbose)
        BGEM3Model(pooler_model, init_missing_heads=True).save_pretrained(tmp_path / name)
        captured = capfd.readouterr()
        return captured.out + captured.err + caplog.text  # bars on stderr, log records (pytest takes them)

    try:
        quiet, verbose = run(False, "quiet"), run(True, "verbose")
    finally:
        configure_console(True)
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT"):
        assert noise not in quiet and noise in verbose, noise
    assert "initialising the sparse and ColBERT heads randomly" in quiet  # ark_hf's own warnings stay


@pytest.mark.slow
def test_default_console_is_quiet_and_shows_the_table_and_eval_bars(pooler_model, tmp_path):
    result = _run_recipe(pooler_model, tmp_path)
    console = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in console, noise
    assert "Encoding queries" in result.stderr and "Encoding documents" in result.stderr
    assert "Retrieval metrics" in result.stdout and "dense_ndcg@10" in result.stdout
    # the card rewritten after the final evaluation has the row of the last step, equal to the "after" metrics
    metrics = json.loads((tmp_path / "out" / "retrieval_metrics.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| 2 | dense |"))
    assert f"{metrics['after']['eval_dense_ndcg@10']:.4f}" == row.split("|")[3].strip()


@pytest.mark.slow
def test_verbose_shows_the_third_party_output(pooler_model, tmp_path):
    result = _run_recipe(pooler_model, tmp_path, "--verbose", "--disable_tqdm", "true")
    console = result.stdout + result.stderr
    import importlib.util

    deepspeed_warns = importlib.util.find_spec("deepspeed") is not None and not torch.cuda.is_available()
    for noise in NOISE:
        assert (noise in console) or (noise == "Setting accelerator to CPU" and not deepspeed_warns), noise
    assert "Encoding queries" not in result.stderr  # disable_tqdm turns the evaluation bars off too
