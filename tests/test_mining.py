"""Hard-negative mining on the Zaragoza FAQ with the real all-MiniLM-L6-v2 (and the tiny XLM-R for the M3 hybrid).

Every claim is checked against an independent computation: scores re-derived in float64 from
sentence-transformers' own embeddings of the same model (a separate encoder implementation), BGE-M3 hybrid
scores from `BGEM3Model.compute_score`, teacher scores from sentence-transformers' `CrossEncoder`, and the mined
negatives against sentence-transformers' `mine_hard_negatives` on the same model and settings.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

from ark_hf.assets import load_faq
from ark_hf.data.loading import load_training_records
from ark_hf.data.schema import DataValidationError
from ark_hf.mining import load_corpus_file, mine_hard_negatives, text_hash
from ark_hf.models.bge_m3 import BGEM3Model

pytestmark = pytest.mark.slow  # integration runs (real models, subprocesses); the full suite runs them

MAX_LEN = 256  # all-MiniLM-L6-v2's max_seq_length in sentence-transformers
TOL = 1e-5


@pytest.fixture(scope="module")
def records():
    """503 FAQ records; 6 questions occur twice with different answers (one query with two positives)."""
    return [{"query": row["q"], "pos": [row["a"]]} for row in load_faq("en")]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return BGEM3Model(minilm_path, pooling="mean", unified_finetuning=False).eval()


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path, device="cpu")
    assert model.max_seq_length == MAX_LEN
    return model


@pytest.fixture(scope="module")
def st_dataset(records):
    from datasets import Dataset

    return Dataset.from_dict({"query": [r["query"] for r in records], "answer": [r["pos"][0] for r in records]})


@pytest.fixture(scope="module")
def st_cache(st_dataset, st_model, tmp_path_factory):
    """sentence-transformers' miner run once with its embedding cache, so later runs and the reference share it."""
    from sentence_transformers.util import mine_hard_negatives as st_mine

    folder = tmp_path_factory.mktemp("st_cache")
    st_mine(st_dataset, st_model, num_negatives=1, cache_folder=str(folder), batch_size=64, verbose=False)
    return folder


@pytest.fixture(scope="module")
def reference(records, st_cache):
    """float64 cosine scores from sentence-transformers' embeddings: (queries, corpus, scores, positives)."""
    queries = list(dict.fromkeys(r["query"] for r in records))  # sentence-transformers' order of both
    corpus = list(dict.fromkeys(p for r in records for p in r["pos"]))
    (q_file,), (d_file,) = st_cache.glob("query_embeddings_*.npy"), st_cache.glob("corpus_embeddings_*.npy")
    q, d = np.load(q_file).astype(np.float64), np.load(d_file).astype(np.float64)
    assert q.shape[0] == len(queries) and d.shape[0] == len(corpus)
    positives: dict[str, set[str]] = {}
    for r in records:
        positives.setdefault(r["query"], set()).update(r["pos"])
    return queries, corpus, q @ d.T, positives


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mining_cache"))


def mine(records, model, cache_dir, **kwargs):
    kwargs.setdefault("query_max_len", MAX_LEN)
    kwargs.setdefault("passage_max_len", MAX_LEN)
    return mine_hard_negatives(records, model, cache_dir=cache_dir, show_progress_bar=False, **kwargs)


def expected_negatives(reference, query, *, num_negatives, range_min, range_max, keep):
    """The definition, re-derived: rank non-positives, window, filter with `keep(score, min_pos)`, take the top."""
    queries, corpus, scores, positives = reference
    row = scores[queries.index(query)]
    pos_rows = [corpus.index(p) for p in positives[query]]
    min_pos = row[pos_rows].min()
    ranked = [j for j in np.argsort(-row, kind="stable") if j not in pos_rows]
    window = ranked[range_min:range_max]
    return [float(row[j]) for j in window if keep(row[j], min_pos)][:num_negatives], min_pos


FILTERS = {
    "relative_margin": ({"relative_margin": 0.05}, lambda s, p: s <= p - abs(p) * 0.05),
    "absolute_margin": ({"absolute_margin": 0.1}, lambda s, p: s <= p - 0.1),
    "max_score": ({"max_score": 0.45}, lambda s, p: s <= 0.45),
    "window": ({"range_min": 3, "range_max": 20}, lambda s, p: True),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_negatives_are_never_positives_and_respect_each_filter(records, minilm, reference, cache_dir, name):
    options, keep = FILTERS[name]
    result = mine(records, minilm, cache_dir, num_negatives=4, **options)
    queries, corpus, scores, positives = reference
    assert len(result.records) == len(records)
    range_min = options.get("range_min", 0)
    range_max = result.stats["range_max"]
    assert range_max == options.get("range_max", 40)  # default with a filter: range_min + 10 * num_negatives
    written = 0
    for record, out in zip(records, result.records):
        assert out["query"] == record["query"] and out["pos"] == record["pos"]
        own = {text_hash(p) for p in positives[record["query"]]}
        assert not own & {text_hash(n) for n in out["neg"]}, "a positive of the query was mined as a negative"
        assert len(out["neg"]) <= 4 and len(set(out["neg"])) == len(out["neg"])
        row = scores[queries.index(record["query"])]
        ours = [float(row[corpus.index(n)]) for n in out["neg"]]
        want, min_pos = expected_negatives(
            reference, record["query"], num_negatives=4, range_min=range_min, range_max=range_max, keep=keep
        )
        assert all(keep(score - TOL, min_pos) for score in ours)
        np.testing.assert_allclose(ours, want, atol=TOL)  # the top survivors of the window, in score order
        written += len(ours)
    assert written == result.stats["negatives_written"] > 0
    if name != "window":
        assert result.stats[f"dropped_{name}"] > 0, "the filter removed nothing: the check would be vacuous"


def _st_negatives(dataset, **options) -> dict[str, list[str]]:
    from sentence_transformers.util import mine_hard_negatives as st_mine

    out = st_mine(dataset, output_format="labeled-list", verbose=False, **options)
    negatives: dict[str, list[str]] = {}
    for row in out:
        negatives.setdefault(row["query"], row["answer"][1:])
    return negatives


def test_same_negatives_as_sentence_transformers(
    records, minilm, st_model, st_dataset, st_cache, reference, cache_dir
):
    """Without filters identical; with relative_margin=0.05 identical except where the definitions differ.

    sentence-transformers retrieves `range_max + max_positives` candidates (max_positives = 2 here: the duplicated
    questions), masks the query's positives and filters, so a query with one positive can reach one candidate
    beyond our window `[0, range_max)` of non-positives. Every difference must be exactly that: our list is a
    prefix of theirs, and each extra negative of theirs ranks at or beyond `range_max` among the non-positives.
    """
    dataset = st_dataset
    common = {"model": st_model, "cache_folder": str(st_cache), "batch_size": 64}

    ours = mine(records, minilm, cache_dir, num_negatives=5)
    theirs = _st_negatives(dataset, num_negatives=5, **common)
    for out in ours.records:
        assert out["neg"] == theirs[out["query"]], out["query"]

    ours = mine(records, minilm, cache_dir, num_negatives=3, relative_margin=0.05)
    theirs = _st_negatives(dataset, num_negatives=3, relative_margin=0.05, **common)
    queries, corpus, scores, positives = reference
    range_max = ours.stats["range_max"]
    same = differ = 0
    for out in ours.records:
        st_neg = theirs.get(out["query"], [])  # sentence-transformers drops a query with no negative at all
        if out["neg"] == st_neg:
            same += 1
            continue
        differ += 1
        assert st_neg[: len(out["neg"])] == out["neg"] and len(out["neg"]) < 3
        row = scores[queries.index(out["query"])]
        pos_rows = {corpus.index(p) for p in positives[out["query"]]}
        ranked = [corpus[j] for j in np.argsort(-row, kind="stable") if j not in pos_rows]
        for extra in st_neg[len(out["neg"]) :]:
            assert ranked.index(extra) >= range_max
    assert same > 400 and differ < 0.1 * len(ours.records)  # the explained differences are a few hard queries


def test_mined_file_trains_and_loads_without_drops(records, minilm, cache_dir, tiny_xlmr_path, tmp_path):
    from ark_hf.trainer.bge_config import BGETrainerConfig
    from ark_hf.trainer.bge_trainer import BGETrainer

    path = tmp_path / "mined.jsonl"
    result = mine(records, minilm, cache_dir, num_negatives=3, relative_margin=0.05, output_path=path)
    assert result.output_path == str(path)
    loaded = load_training_records(str(path))
    assert [r["neg"] for r in loaded] == [r["neg"] for r in result.records]  # the validator dropped nothing
    with pytest.raises(FileExistsError, match="overwrite"):
        mine(records, minilm, cache_dir, output_path=path)

    config = BGETrainerConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=2, train_group_size=4, query_max_len=16, passage_max_len=32, max_steps=2,
        logging_steps=1, learning_rate=1e-3, init_missing_heads=True, model_name_or_path=tiny_xlmr_path,
        train_data=[str(path)],
    )  # fmt: skip
    trainer = BGETrainer(config=config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.fixture(scope="module")
def tiny_m3(tiny_xlmr_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr_path)
    torch.manual_seed(0)
    model = BGEM3Model(tiny_xlmr_path, tokenizer=tokenizer, init_missing_heads=True).eval()
    with torch.no_grad():  # a random sparse head may clip every token to 0; start with most weights positive
        model.sparse_linear.bias.fill_(1.0)
    return model


def test_hybrid_dense_sparse_scores_match_compute_score(records, tiny_m3):
    subset = records[:30]
    result = mine_hard_negatives(
        subset, tiny_m3, mode="dense+sparse", num_negatives=3, relative_margin=0.05, range_max=25,
        query_max_len=24, passage_max_len=48, show_progress_bar=False,
    )  # fmt: skip
    corpus = list(dict.fromkeys(p for r in subset for p in r["pos"]))
    checked = 0
    for record, out in zip(subset, result.records):
        pairs = [(record["query"], text) for text in corpus]
        hybrid = tiny_m3.compute_score(pairs, max_query_length=24, max_passage_length=48)["sparse+dense"]
        score = dict(zip(corpus, hybrid))
        min_pos = min(score[p] for p in record["pos"])
        ranked = sorted((t for t in corpus if t not in record["pos"]), key=lambda t: -score[t])[:25]
        want = [t for t in ranked if score[t] <= min_pos - abs(min_pos) * 0.05 + TOL][:3]
        np.testing.assert_allclose([score[n] for n in out["neg"]], [score[t] for t in want], atol=TOL)
        checked += len(out["neg"])
    assert checked > 0 and result.stats["dropped_relative_margin"] > 0


def test_teacher_scores_are_the_cross_encoders(records, tiny_m3, tmp_path):
    from ark_hf.models.teacher import TeacherScorer

    tokenizer = tiny_m3.tokenizer
    torch.manual_seed(1)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip
    cross_encoder = XLMRobertaForSequenceClassification(config).eval()
    cross_encoder.save_pretrained(tmp_path / "ce")
    tokenizer.save_pretrained(tmp_path / "ce")
    teacher = TeacherScorer(str(tmp_path / "ce"), kind="cross-encoder", max_length=64)

    subset = records[:12]
    path = tmp_path / "scored.jsonl"
    result = mine_hard_negatives(
        subset, tiny_m3, num_negatives=2, teacher=teacher, output_path=path, query_max_len=24, passage_max_len=48,
        show_progress_bar=False,
    )  # fmt: skip
    for out in result.records:
        texts = out["pos"] + out["neg"]
        features = tokenizer([out["query"]] * len(texts), texts, padding=True, truncation=True, max_length=64)
        with torch.no_grad():  # the raw logit of each (query, passage) pair, computed here directly
            expected = cross_encoder(**features.convert_to_tensors("pt")).logits[:, 0].numpy()
        np.testing.assert_allclose(out["pos_scores"] + out["neg_scores"], expected, atol=1e-5)
        assert len(out["neg_scores"]) == len(out["neg"]) == 2
    loaded = load_training_records(str(path), require_teacher_scores=True)
    assert loaded[0]["neg_scores"] == result.records[0]["neg_scores"]


def test_corpus_cache_is_keyed_by_the_weights(records, tiny_m3, tmp_path):
    subset = records[:20]
    kwargs = dict(num_negatives=2, query_max_len=24, passage_max_len=48, show_progress_bar=False, cache_dir=tmp_path)
    first = mine_hard_negatives(subset, tiny_m3, **kwargs)
    second = mine_hard_negatives(subset, tiny_m3, **kwargs)
    assert not first.stats["corpus_from_cache"] and second.stats["corpus_from_cache"]
    assert [r["neg"] for r in first.records] == [r["neg"] for r in second.records]
    extra = mine_hard_negatives(subset, tiny_m3, corpus=["an extra passage about permits"], **kwargs)
    assert not extra.stats["corpus_from_cache"] and extra.stats["corpus"] == first.stats["corpus"] + 1
    with torch.no_grad():  # a training step later the model is another model
        tiny_m3.model.embeddings.word_embeddings.weight[5] += 0.01
    try:
        moved = mine_hard_negatives(subset, tiny_m3, **kwargs)
    finally:
        with torch.no_grad():
            tiny_m3.model.embeddings.word_embeddings.weight[5] -= 0.01
    assert not moved.stats["corpus_from_cache"]
    assert len(list(tmp_path.glob("corpus-*.npz"))) == 3
    umask = os.umask(0)
    os.umask(umask)
    assert {path.stat().st_mode & 0o777 for path in tmp_path.glob("corpus-*.npz")} == {0o666 & ~umask}  # not 0600


def test_bad_input_fails_before_the_model_loads(records, tmp_path):
    missing_model = str(tmp_path / "no_such_model")  # never reached: loading it would raise OSError
    with pytest.raises(ValueError, match="holds 3 candidates, fewer than num_negatives=5"):
        mine_hard_negatives(records, missing_model, num_negatives=5, range_min=2, range_max=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["a"]}) + "\n" + json.dumps({"query": "q2", "pos": "a"}) + "\n")
    with pytest.raises(DataValidationError, match=r"bad.jsonl:2: field 'pos'"):
        mine_hard_negatives(str(bad), missing_model)
    with pytest.raises(ValueError, match="is a folder"):
        mine_hard_negatives(records, missing_model, output_path=tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('"first"\n{"text": ""}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: field 'text'"):
        load_corpus_file(corpus)
    with pytest.raises(ValueError, match="relative_margin must be >= 0"):
        mine_hard_negatives(records, missing_model, relative_margin=-0.1)
