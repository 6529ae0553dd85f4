"""`text_hash`: the one content identity of a text, used wherever two texts must be recognised as the same.

The collator hashes passages so the losses can mask a passage that appears twice in a batch (on any rank); mining
and the hard-negative refresh hash passages to build a corpus without duplicates and to keep a query's positives
out of its negatives. Mining compares texts as the data loader does (surrounding whitespace ignored), so it hashes
`text.strip()`; the collator hashes the text exactly as the model sees it.
"""

from __future__ import annotations

import hashlib

__all__ = ["text_hash"]


def text_hash(text: str) -> int:
    """A stable signed 63-bit content hash: equal texts (anywhere in a batch, on any rank) get equal ids.

    It fits a `torch.long` tensor (the collator's `passage_hashes`) and is the same in every process and run
    (unlike Python's `hash`, which is salted per process).
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1
