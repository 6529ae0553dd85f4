"""Prompts of the forward and backward alignment scores.

The defaults are ARK's (Zhou et al., "ARK: Answer-Centric Retriever Tuning via KG-augmented Curriculum
Learning", arXiv 2511.16326), word for word: a LongBench-style QA prompt for the forward score and a
question-reconstruction prompt for the backward score. Without an answer the backward score is UPR's
(Sachan et al., "Improving Passage Retrieval with Zero-Shot Question Generation", arXiv 2204.07496).

A template is a `str.format` string with the fields `{chunk}`, `{question}` and `{answer}` (the ones it
uses). `{chunk}` must appear exactly once: it is the part that is truncated when a prompt is too long, so the
cue at the end of the prompt ("Answer:", "Question:") and the scored continuation are never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ARK_BACKWARD_PROMPT", "ARK_FORWARD_PROMPT", "UPR_PROMPT", "AlignmentPrompts"]

ARK_FORWARD_PROMPT = (
    "You are given a context and a question. Answer the question as concisely as you can, using a single "
    "phrase or sentence if possible. If the question cannot be answered based on the information in the "
    'context, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
    '"unanswerable". Do not provide any explanation.\n\n'
    "Context: {chunk}\n\n"
    "Question: {question}\n\n"
    "Answer:"
)
ARK_BACKWARD_PROMPT = (
    "You are given a context and an answer. Infer the original question that proposed for the given answer, "
    "ensuring the question is clear, specific, and self-contained. If the answer could address multiple "
    "plausible questions, choose the one most directly supported by the context. Do not provide any "
    "explanation.\n\n"
    "Context: {chunk}\n\n"
    "Answer: {answer}\n\n"
    "Question:"
)
UPR_PROMPT = "Passage: {chunk}. Please write a question based on this passage."


@dataclass(frozen=True)
class AlignmentPrompts:
    """The three templates and the text put between a prompt and its scored continuation.

    Args:
        forward: prompt of S_f = LP(answer | forward(chunk, question)).
        backward: prompt of S_b = LP(question | backward(chunk, answer)).
        backward_no_answer: prompt of S_b for records without an answer (UPR).
        continuation_separator: prepended to the continuation before it is tokenised (`" "`: the answer
            after "Answer:" is tokenised as it would be generated). ARK's script instead joins the two texts
            and re-tokenises the whole, which can merge the cue's last token with the answer's first.
    """

    forward: str = ARK_FORWARD_PROMPT
    backward: str = ARK_BACKWARD_PROMPT
    backward_no_answer: str = UPR_PROMPT
    continuation_separator: str = " "

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "backward_no_answer"):
            template = getattr(self, name)
            if template.count("{chunk}") != 1:
                raise ValueError(f"prompt '{name}' must contain '{{chunk}}' exactly once: {template!r}")

    @staticmethod
    def split(template: str, **fields: str) -> tuple[str, str]:
        """The text before and after `{chunk}`, with the other fields filled in."""
        before, after = template.split("{chunk}")
        return before.format(**fields), after.format(**fields)
