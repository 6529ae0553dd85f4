"""The ARK triple-alignment scorer on a tiny random Qwen3 causal LM with the real Qwen3 tokenizer.

Log-probabilities are checked against a float64 re-computation written here; the combination against
hand-computed values; an interrupted and resumed run against an uninterrupted one, byte for byte.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ark_hf.alignment import (
    UPR_PROMPT,
    AlignmentPrompts,
    AlignmentScoringConfig,
    CausalLMScorer,
    ScoreRequest,
    combine_scores,
    min_max_normalize,
    rebuild_records,
    score_file,
    short_chunk_penalty,
)
from ark_hf.data.loading import load_training_records
from ark_hf.data.schema import DataValidationError
from ark_hf.models.decoder import DecoderEmbedder


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_path):
    return AutoTokenizer.from_pretrained(tiny_qwen3_path)


@pytest.fixture(scope="module")
def causal_lm(tiny_qwen3_path):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_qwen3_path)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def retriever(tiny_qwen3_path):
    return DecoderEmbedder(tiny_qwen3_path).eval()


def reference_lp(model, tokenizer, prompt: str, continuation: str) -> float:
    """float64, unbatched: mean over the continuation tokens of log p(token | everything before it)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont_ids])
    double = model.to(torch.float64)
    try:
        with torch.no_grad():
            logits = double(input_ids=ids).logits[0].to(torch.float64)
    finally:
        model.to(torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return sum(float(logprobs[n + j - 1, t]) for j, t in enumerate(cont_ids)) / len(cont_ids)


REQUESTS = [
    ScoreRequest(
        "Context: ", "Permits take ten weeks in Helsingborg.", "\n\nQuestion: how long?\n\nAnswer:", "ten weeks"
    ),
    ScoreRequest("Context: ", "A shed under 15 square metres needs no permit, but a notice.", "\nAnswer:", "no"),
    ScoreRequest("Passage: ", "Short.", ". Please write a question based on this passage.", "what is it?"),
    ScoreRequest("C: ", "x " * 40, "\nQ:", "a much longer continuation with many more tokens in it than the others"),
]


def test_mean_logprobs_equal_a_float64_computation(causal_lm, tokenizer):
    # a budget of 64 tokens forces several batches of padded rows of different lengths
    scorer = CausalLMScorer(causal_lm, tokenizer, token_budget=128, max_length=128)
    assert len(scorer.batches([len(scorer.build(r)[0]) for r in REQUESTS])) > 1
    got = scorer.mean_logprobs(REQUESTS)
    want = [reference_lp(causal_lm, tokenizer, r.before + r.chunk + r.after, r.continuation) for r in REQUESTS]
    assert got == pytest.approx(want, abs=2e-5)
    # one request alone (no padding) gives the same value as in the batch
    assert scorer.mean_logprobs(REQUESTS[1:2])[0] == pytest.approx(got[1], abs=2e-5)


def test_truncation_cuts_the_chunk_never_the_cue_or_the_continuation(causal_lm, tokenizer):
    scorer = CausalLMScorer(causal_lm, tokenizer, max_length=40, token_budget=40)
    request = ScoreRequest("Context: ", "word " * 100, "\n\nAnswer:", "the answer text")
    ids, n = scorer.build(request)
    cont = tokenizer(" the answer text", add_special_tokens=False)["input_ids"]
    assert len(ids) == 40 and n == len(cont) and ids[-n:] == cont
    prompt = tokenizer.decode(ids[:-n])
    assert prompt.endswith("word \n\nAnswer:") and prompt.count("word") < 100
    assert ids[:2] == tokenizer("Context: word", add_special_tokens=False)["input_ids"][:2]
    with pytest.raises(ValueError, match="max_length=40"):
        scorer.build(ScoreRequest("Context: ", "x", "\n" + "cue " * 50, "y"))


def test_min_max_normalisation_combination_and_short_chunk_penalty():
    assert min_max_normalize([-3.0, -1.0, -2.0]) == [0.0, 1.0, 0.5]
    assert min_max_normalize([0.2, 0.2]) == [0.5, 0.5]
    assert min_max_normalize([None, 1.0, 3.0]) == [None, 0.0, 1.0]
    assert short_chunk_penalty(4) == 0.4 and short_chunk_penalty(10) == 1.0 and short_chunk_penalty(25) == 1.0
    # forward [-1, -3, -2] -> [1, 0, .5]; backward [-4, -4, -5] -> [1, 1, 0]; parameter [.1, .5, .3] -> [0, 1, .5]
    combined = combine_scores([-1.0, -3.0, -2.0], [-4.0, -4.0, -5.0], [0.1, 0.5, 0.3], [12, 5, 10])
    assert combined == pytest.approx([1.0 + 0.3 + 0.0, (0.0 + 0.3 + 1.0) * 0.5, 0.5 + 0.0 + 0.5])
    # no answer: the forward term is dropped
    assert combine_scores([None, None], [-1.0, -2.0], [0.0, 1.0], [10, 10]) == pytest.approx([0.3, 1.0])
    assert combine_scores([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [10, 10], weights=(2.0, 0.0, 0.0)) == [0.0, 2.0]


def write_records(path, n=7):
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            record = {
                "query": f"how long does permit {i} take?",
                "answers": [f"{i + 2} weeks"] if i != 3 else [],
                "pos": [f"Permit {i} takes {i + 2} weeks at the city office."],
                "neg": [f"The library opens at {i + 8}.", "Parking is free on Sundays in the whole city centre."],
            }
            if i == 5:
                record = {
                    "query": record["query"],
                    "answers": record["answers"],
                    "candidates": record["pos"] + record["neg"],
                }
            handle.write(json.dumps(record) + "\n")
            if i == 2:
                handle.write("\n")  # blank lines are skipped, line numbers still count them
    return str(path)


def make_config(tmp_path, name, **overrides):
    base = dict(
        input_file=str(tmp_path / "in.jsonl"), output_file=str(tmp_path / name), lm_name_or_path="unused",
        records_per_block=2, show_progress=False, query_max_len=32, passage_max_len=64,
    )  # fmt: skip
    base.update(overrides)
    return AlignmentScoringConfig(**base)


class FailingAfter:
    """Wraps a scorer; raises after `limit` calls of `mean_logprobs` (a crash mid-run)."""

    def __init__(self, scorer, limit):
        self.scorer, self.limit, self.calls = scorer, limit, 0

    def __getattr__(self, name):
        return getattr(self.scorer, name)

    def mean_logprobs(self, requests):
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt("killed")
        return self.scorer.mean_logprobs(requests)


def test_interrupted_and_resumed_run_writes_exactly_the_uninterrupted_output(
    causal_lm, tokenizer, retriever, tmp_path
):
    write_records(tmp_path / "in.jsonl")
    scorer = CausalLMScorer(causal_lm, tokenizer, token_budget=256, max_length=256)
    full = score_file(make_config(tmp_path, "full.jsonl"), lm=scorer, retriever=retriever)
    lines = [json.loads(t) for t in full.read_text().splitlines()]
    assert [line["alignment"]["index"] for line in lines] == list(range(7))
    first = lines[0]["alignment"]
    assert set(first) == {"index", "lm", "retriever", "backward_kind", "pos", "neg"}
    assert len(first["pos"]) == 1 and len(first["neg"]) == 2
    assert all(math.isfinite(e[k]) for e in first["neg"] for k in ("forward", "backward", "parameter", "score"))
    assert lines[3]["alignment"]["backward_kind"] == "upr" and lines[3]["alignment"]["pos"][0]["forward"] is None
    assert len(lines[5]["alignment"]["candidates"]) == 3

    interrupted = make_config(tmp_path, "resumed.jsonl")
    failing = FailingAfter(scorer, limit=2)
    with pytest.raises(KeyboardInterrupt):
        score_file(interrupted, lm=failing, retriever=retriever)
    partial = (tmp_path / "resumed.jsonl").read_text()
    assert partial.count("\n") == 4  # two blocks of two records
    with open(tmp_path / "resumed.jsonl", "a", encoding="utf-8") as handle:
        handle.write(full.read_text().splitlines()[4][:50])  # a torn write of the next block
    counting = FailingAfter(scorer, limit=100)
    score_file(interrupted, lm=counting, retriever=retriever)
    assert counting.calls == 2  # the two unfinished blocks only
    assert (tmp_path / "resumed.jsonl").read_bytes() == full.read_bytes()
    score_file(interrupted, lm=FailingAfter(scorer, limit=0), retriever=retriever)  # complete: nothing rescored


def test_upr_backward_score_when_a_record_has_no_answer(causal_lm, tokenizer, tmp_path):
    write_records(tmp_path / "in.jsonl")
    scorer = CausalLMScorer(causal_lm, tokenizer, token_budget=256, max_length=256)
    out = score_file(make_config(tmp_path, "out.jsonl", start=3, end=4), lm=scorer, retriever=None)
    [line] = [json.loads(t) for t in out.read_text().splitlines()]
    chunk = line["pos"][0]
    before, after = AlignmentPrompts.split(UPR_PROMPT)
    want = reference_lp(causal_lm, tokenizer, before + chunk + after, line["query"])
    entry = line["alignment"]["pos"][0]
    assert entry["backward"] == pytest.approx(want, abs=2e-5) and entry["parameter"] is None


def test_bad_records_are_refused_with_file_line_field_before_any_lm_loads(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [
        {"query": "ok", "answers": ["a"], "pos": ["fine chunk"]},
        {"answers": [], "pos": ["chunk"]},  # no answer and no query
        {"query": "q", "answers": ["a"], "candidates": []},  # empty candidate list
        {"query": "q", "pos": ["fine"], "neg": ["fine", 7]},  # non-string chunk
        {"query": "q", "answers": "not a list", "pos": ["x"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    config = make_config(tmp_path, "out.jsonl", lm_name_or_path=str(tmp_path / "no-such-lm"))
    with pytest.raises(DataValidationError) as caught:
        score_file(config)  # the LM path does not exist: loading it would raise OSError instead
    message = str(caught.value)
    for expected in (
        f"{path}:2: field 'query'",
        f"{path}:3: field 'candidates'",
        f"{path}:4: field 'neg[1]': expected a string, got int",
        f"{path}:5: field 'answers'",
        f"{path}:6: field '<json>'",
    ):
        assert expected in message, message
    assert not (tmp_path / "out.jsonl").exists()


def test_prompt_too_long_for_the_lm_is_refused_before_scoring(causal_lm, tokenizer, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"query": "q " * 300, "answers": ["a"], "pos": ["c"]}) + "\n")
    scorer = CausalLMScorer(causal_lm, tokenizer, max_length=64, token_budget=64)
    with pytest.raises(DataValidationError, match=rf"{path}:1: field 'query'.*max_length=64"):
        score_file(make_config(tmp_path, "out.jsonl"), lm=scorer)


def test_rebuild_ranks_by_score_and_drops_likely_false_negatives(tmp_path):
    entries = [0.4, 2.0, 1.95, 1.0, 0.2]
    scored = [
        {
            "query": "q",
            "prompt": "Find it",
            "pos": ["c0"],
            "neg": ["c1", "c2", "c3", "c4"],
            "alignment": {"pos": [{"score": entries[0]}], "neg": [{"score": s} for s in entries[1:]]},
        }
    ]
    [record] = rebuild_records(scored, num_positives=1, num_negatives=2, false_negative_ratio=0.95)
    # c1 (2.0) is the positive; c2 (1.95 > 0.95 * 2.0) is a likely false negative; then c3, c0
    assert record == {
        "query": "q", "pos": ["c1"], "neg": ["c3", "c0"], "pos_scores": [2.0], "neg_scores": [1.0, 0.4], "prompt": "Find it",
    }  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [loaded] = load_training_records(str(path), require_teacher_scores=True)
    assert loaded["pos_scores"] == [2.0] and loaded["neg"] == ["c3", "c0"]


@pytest.mark.slow  # loads the LM, its 151k-id tokenizer and the retriever from disk
def test_recipe_scores_a_file_from_saved_models_and_rebuilds(causal_lm, tokenizer, tiny_qwen3_path, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "compute_alignment.py"
    spec = importlib.util.spec_from_file_location("compute_alignment", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["compute_alignment"] = recipe  # dataclasses look their module up while the file runs
    spec.loader.exec_module(recipe)
    main = recipe.main
    lm_dir = tmp_path / "lm"
    causal_lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    write_records(tmp_path / "in.jsonl", n=3)
    argv = [
        "--input_file", str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.jsonl"),
        "--lm_name_or_path", str(lm_dir), "--retriever_name_or_path", tiny_qwen3_path, "--device", "cpu",
        "--rebuild_output", str(tmp_path / "train.jsonl"), "--num_negatives", "1", "--show_progress", "false",
    ]  # fmt: skip
    assert main(argv) == str(tmp_path / "train.jsonl")
    records = load_training_records(str(tmp_path / "train.jsonl"), require_teacher_scores=True)
    assert len(records) == 3 and all(len(r["pos"]) == 1 and len(r["neg"]) <= 1 for r in records)
    scored = [json.loads(t) for t in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert scored[0]["alignment"]["retriever"] == tiny_qwen3_path
