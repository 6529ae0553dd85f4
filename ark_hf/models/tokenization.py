"""How an embedder turns texts into token ids: one rule per model, used for training (by the collator) and for
evaluation, mining and alignment (by `model.tokenize`).

`model.text_tokenizer()` returns a `TextTokenizer`: a small picklable object (the tokenizer and the model's rule,
no weights), so the collator can run it in DataLoader worker processes. Encoders tokenize with their special
tokens; decoders tokenize without them, truncate to `max_length - 1` and append the EOS their pooling reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import BatchEncoding, PreTrainedTokenizerBase

__all__ = ["TextTokenizer", "tokenize_with_eos"]


def tokenize_with_eos(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    eos_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> BatchEncoding:
    """Tokenize without special tokens, truncate to `max_length - 1`, then append EOS (so it survives truncation).

    Last-token pooling (Qwen3-Embedding) reads the hidden state at this EOS.
    """
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)
    features = [{"input_ids": ids + [eos_token_id]} for ids in encoded["input_ids"]]
    return tokenizer.pad(features, padding=True, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


@dataclass
class TextTokenizer:
    """A model's tokenization rule: `tokenizer(texts, max_length, pad_to_multiple_of)` -> padded tensors.

    Args:
        tokenizer: the model's tokenizer.
        append_eos_token_id: decoders: tokenize without special tokens and append this EOS id after truncation.
    """

    tokenizer: PreTrainedTokenizerBase
    append_eos_token_id: int | None = None

    def __call__(self, texts: list[str], max_length: int, pad_to_multiple_of: int | None = None) -> BatchEncoding:
        if self.append_eos_token_id is not None:
            if max_length < 2:
                raise ValueError(f"max_length must leave room for one token and the EOS, got {max_length}")
            return tokenize_with_eos(
                self.tokenizer, list(texts), max_length, self.append_eos_token_id, pad_to_multiple_of
            )
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )
