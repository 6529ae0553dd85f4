"""Do ARK's alignment scores flag corrupted positives? Planted noise on the Zaragoza construction FAQ.

    python bench/alignment_validation.py --output bench/results/alignment_validation_cpu.json

No pretrained causal LM ships in an installed package, so the LM is trained here, on the CPU, in a few
minutes: a 2-layer Qwen3-architecture decoder (hidden 128) with the all-MiniLM-L6-v2 WordPiece vocabulary
(30,522 ids: a small output layer), on the forward and backward prompts of 250 FAQ rows (answer =
the first sentence of the FAQ answer), loss on the continuations only. The other 253 rows are the test set:
the first 120 with two sentences or more are used; the LM never saw them. The base retriever of S_v is the real all-MiniLM-L6-v2.

For each test question: 3 random other answers as negatives, and its positive in four versions:
clean, (i) swapped with a random other answer, (ii) swapped with its hardest negative (the most similar other
answer by MiniLM), (iii) the answer-bearing (first) sentence deleted. Every version is scored with
`score_records` (short prompts, not ARK's 70-token instruction, to keep the CPU run short); a version's flag
score is its positive's per-question min-max normalised S_f, S_b, S_v and combined S. AUROC = P(clean
positive scores above a corrupted one), per noise type, ties counting half.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from ark_hf.alignment import AlignmentScoringConfig, CausalLMScorer, min_max_normalize
from ark_hf.alignment.pipeline import score_records
from ark_hf.alignment.records import AlignmentRecord
from ark_hf.assets import load_faq, minilm_path
from ark_hf.models.bge_m3 import BGEM3Model

FORWARD = "Context: {chunk}\nQuestion: {question}\nAnswer:"
BACKWARD = "Context: {chunk}\nAnswer: {answer}\nQuestion:"
UPR = "Passage: {chunk}\nQuestion:"
NOISE = ("random_swap", "hard_swap", "answer_deleted")


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def auroc(clean: list[float], corrupt: list[float]) -> float:
    c, k = np.asarray(clean)[:, None], np.asarray(corrupt)[None, :]
    return float((c > k).mean() + 0.5 * (c == k).mean())


def small_lm(tokenizer, max_positions: int = 512) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3-architecture causal LM over `tokenizer`'s vocabulary (random weights)."""
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=max_positions,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return Qwen3ForCausalLM(config)


def train_lm(tokenizer, rows, steps: int, seed: int) -> tuple[Qwen3ForCausalLM, list[float]]:
    torch.manual_seed(seed)
    model = small_lm(tokenizer)
    examples = []
    for row in rows:
        answer = sentences(row["a"])[0]
        for template, target in ((FORWARD, answer), (BACKWARD, row["q"]), (UPR, row["q"])):
            prompt = template.format(chunk=row["a"], question=row["q"], answer=answer)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-400:]
            t = tokenizer(" " + target, add_special_tokens=False)["input_ids"][:64]
            examples.append((p + t, len(p)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    model.train()
    for _step in range(steps):
        batch = rng.sample(examples, 16)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((16, width), tokenizer.pad_token_id)
        labels = torch.full((16, width), -100)
        mask = torch.zeros((16, width), dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            mask[row, : len(ids)] = 1
        # the output layer only at the continuation positions: the CPU run stays within minutes
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="bench/results/alignment_validation_cpu.json")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--test_questions", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    rows = load_faq("en")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    train_rows = [rows[i] for i in order[:250]]
    test_rows = [rows[i] for i in order[250:] if len(sentences(rows[i]["a"])) >= 2][: args.test_questions]

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    lm, losses = train_lm(tokenizer, train_rows, args.steps, args.seed)
    train_seconds = time.time() - started

    retriever = BGEM3Model(str(minilm_path()), pooling="mean", unified_finetuning=False).eval()
    answers = [r["a"] for r in rows]
    with torch.no_grad():
        vectors = torch.from_numpy(retriever.encode(answers, max_length=256)["dense_vecs"])
    similarity = vectors @ vectors.T
    index_of = {r["id"]: i for i, r in enumerate(rows)}

    rng = random.Random(args.seed + 1)
    records, meta = [], []
    for row in test_rows:
        i = index_of[row["id"]]
        others = [j for j in range(len(rows)) if j != i]
        negatives = [answers[j] for j in rng.sample(others, 3)]
        hard = answers[max(others, key=lambda j: float(similarity[i, j]))]
        rand = answers[rng.choice([j for j in others if answers[j] not in negatives])]
        parts = sentences(row["a"])
        versions = {"clean": row["a"], "random_swap": rand, "hard_swap": hard, "answer_deleted": " ".join(parts[1:])}
        for kind, positive in versions.items():
            raw = {"query": row["q"], "answers": [parts[0]], "pos": [positive], "neg": negatives}
            records.append(
                AlignmentRecord(
                    len(records), 0, raw, row["q"], parts[0], [positive, *negatives], ["pos"] * 1 + ["neg"] * 3
                )
            )
            meta.append(kind)

    config = AlignmentScoringConfig(
        input_file="", output_file="", lm_name_or_path="trained-here", forward_prompt=FORWARD,
        backward_prompt=BACKWARD, backward_no_answer_prompt=UPR, query_max_len=64, passage_max_len=256,
    )  # fmt: skip
    scorer = CausalLMScorer(lm, tokenizer, max_length=512, token_budget=8192)
    lines = []
    score_started = time.time()
    for start in range(0, len(records), 32):
        lines += score_records(records[start : start + 32], scorer, retriever, config)
    score_seconds = time.time() - score_started

    flags: dict[str, dict[str, list[float]]] = {}
    for line, kind in zip(lines, meta):
        entries = line["alignment"]["pos"] + line["alignment"]["neg"]
        values = {
            "S_f": min_max_normalize([e["forward"] for e in entries])[0],
            "S_b": min_max_normalize([e["backward"] for e in entries])[0],
            "S_v": min_max_normalize([e["parameter"] for e in entries])[0],
            "S": entries[0]["score"],
            "raw_S_f": entries[0]["forward"],
            "raw_S_b": entries[0]["backward"],
            "raw_S_v": entries[0]["parameter"],
        }
        for name, value in values.items():
            flags.setdefault(name, {}).setdefault(kind, []).append(value)
    results = {
        noise: {name: round(auroc(by_kind["clean"], by_kind[noise]), 4) for name, by_kind in flags.items()}
        for noise in NOISE
    }
    report = {
        "command": "python bench/alignment_validation.py --output " + args.output,
        "lm": "2-layer Qwen3-architecture causal LM (hidden 128, MiniLM WordPiece vocab 30,522), trained here "
        f"on the CPU for {args.steps} steps (batch 16) on the prompts of 250 FAQ rows; the test rows are unseen",
        "lm_train_loss_first_last": [round(losses[0], 3), round(float(np.mean(losses[-20:])), 3)],
        "retriever": "sentence-transformers/all-MiniLM-L6-v2 (mean pooling)",
        "prompts": {"forward": FORWARD, "backward": BACKWARD},
        "test_questions": len(test_rows),
        "candidates_per_question": 4,
        "auroc_clean_vs_corrupted": results,
        "seconds": {"lm_training": round(train_seconds, 1), "scoring": round(score_seconds, 1)},
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {args.threads} threads",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
