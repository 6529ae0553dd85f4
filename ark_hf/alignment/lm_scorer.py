"""Mean per-token log-probability of a continuation under any Hugging Face causal LM, batched by tokens.

LP(y | x) = (1/|y|) sum_j log p_LM(y_j | x, y_<j), with x a prompt whose `{chunk}` part is truncated (never the
text around it nor y) when x + y would exceed the LM's length limit.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["CausalLMScorer", "ScoreRequest", "PromptTooLongError"]


class PromptTooLongError(ValueError):
    """The prompt without its chunk plus the continuation do not fit the LM's length limit."""


@dataclass(frozen=True)
class ScoreRequest:
    """One LP(continuation | before + chunk + after) to compute."""

    before: str
    chunk: str
    after: str
    continuation: str


class CausalLMScorer:
    """Scores continuations with a causal LM (`AutoModelForCausalLM`), prefill only.

    Sequences are sorted by length and packed into batches of at most `token_budget` tokens (rows x longest
    row), left-padded with explicit position ids, so padding never changes a score; only the logits of the
    continuation positions are computed (`logits_to_keep`), never a `[batch, length, vocab]` tensor.

    Args:
        model: a causal LM (`...ForCausalLM`), in eval mode on its device.
        tokenizer: its tokenizer (a fast tokenizer: the chunk's tokens are located with offsets).
        max_length: the longest sequence (prompt + continuation) fed to the LM; default: the model's
            `max_position_embeddings` capped at 4096.
        token_budget: tokens per forward pass (rows x padded length).
        continuation_separator: text prepended to each continuation before tokenising it.

    Example:
        ```python
        scorer = CausalLMScorer.from_pretrained("Qwen/Qwen2.5-1.5B-Instruct")
        [lp] = scorer.mean_logprobs([ScoreRequest("Context: ", "Permits take 10 weeks.", "\\nAnswer:", "10 weeks")])
        ```
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        token_budget: int = 16384,
        continuation_separator: str = " ",
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("CausalLMScorer needs a fast tokenizer (offsets locate the chunk's tokens)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_length = int(max_length if max_length is not None else min(limit, 4096))
        if token_budget < self.max_length:
            raise ValueError(f"token_budget ({token_budget}) must hold one sequence of max_length ({self.max_length})")
        self.token_budget = token_budget
        self.continuation_separator = continuation_separator
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        # LMs trained with a BOS (Llama, Mistral) expect it; Qwen's tokenizer adds none
        self.prefix_ids = [bos] if bos is not None and probe and probe[0] == bos else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0  # masked out: any id works
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, device: str | None = None, torch_dtype: Any = None, **kwargs: Any
    ) -> CausalLMScorer:
        """Load an LM and its tokenizer; bfloat16 on a GPU, float32 on the CPU unless `torch_dtype` says otherwise."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype).to(device)
        return cls(model, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------ tokenising
    def continuation_ids(self, continuation: str) -> list[int]:
        return self.tokenizer(self.continuation_separator + continuation, add_special_tokens=False)["input_ids"]

    def fixed_length(self, before: str, after: str, continuation: str) -> int:
        """Tokens of a request that truncation cannot remove (everything but the chunk)."""
        prompt = self.tokenizer(before + after, add_special_tokens=False)["input_ids"]
        return len(self.prefix_ids) + len(prompt) + len(self.continuation_ids(continuation))

    def build(self, request: ScoreRequest) -> tuple[list[int], int]:
        """`(input_ids, continuation_length)`; the chunk's tokens are cut from its end if the whole is too long."""
        text = request.before + request.chunk + request.after
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start, end = len(request.before), len(request.before) + len(request.chunk)
        # a token reaching past the chunk's end holds text of the cue: it stays with the cue
        in_chunk = [s < end and start < e <= end for s, e in offsets]
        first = next((i for i, inside in enumerate(in_chunk) if inside), None)
        last = max((i for i, inside in enumerate(in_chunk) if inside), default=-1)
        continuation = self.continuation_ids(request.continuation)
        if not continuation:
            raise ValueError(f"empty continuation: {request.continuation!r}")
        excess = len(self.prefix_ids) + len(ids) + len(continuation) - self.max_length
        if excess > 0:
            chunk_tokens = 0 if first is None else last - first + 1
            if excess > chunk_tokens:
                raise PromptTooLongError(
                    f"the prompt without its chunk and the continuation take {len(ids) - chunk_tokens} + "
                    f"{len(continuation)} tokens, more than max_length={self.max_length}"
                )
            ids = ids[: last + 1 - excess] + ids[last + 1 :]
        return self.prefix_ids + ids + continuation, len(continuation)

    # ------------------------------------------------------------------------------------------- scoring
    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped longest first, each group within `token_budget` (rows x longest row)."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        groups: list[list[int]] = []
        for index in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.token_budget:
                groups[-1].append(index)
            else:
                groups.append([index])
        return groups

    @torch.no_grad()
    def mean_logprobs(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """LP(continuation | prompt) for each request, in request order."""
        built = [self.build(r) for r in requests]
        scores = [0.0] * len(built)
        device = next(self.model.parameters()).device
        for group in self.batches([len(ids) for ids, _ in built]):
            width = max(len(built[i][0]) for i in group)
            keep = max(built[i][1] for i in group) + 1
            input_ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids = built[i][0]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention[row, width - len(ids) :] = 1
            positions = (attention.cumsum(-1) - 1).clamp_min(0)
            kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
            logits = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                use_cache=False,
                **kwargs,
            ).logits[:, -keep:]
            # the logit at position t predicts token t + 1: the last `keep - 1` tokens are scored
            logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = input_ids[:, width - keep + 1 :].to(device)
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(group):
                n = built[i][1]
                scores[i] = float(token_lp[row, keep - 1 - n :].double().mean())
        return scores
