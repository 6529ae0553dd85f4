"""Quiet by default: third-party messages that tell an ark_hf user nothing they can act on.

- transformers' load report for the pooler that an encoder is loaded without (`pooler.dense.* UNEXPECTED`):
  `quiet_load_report` hides the report, and the caller reports whatever else the load found;
- DeepSpeed's "Setting accelerator to CPU" warning, which accelerate triggers on machines without a GPU each
  time it probes for DeepSpeed (every `save_pretrained`), though nothing runs under DeepSpeed:
  `silence_deepspeed_cpu_notice` drops that one record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"
LOAD_REPORT = "LOAD REPORT"  # in the first line of transformers' report: "<Class> LOAD REPORT from: <name>"


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


_verbose = False


def set_verbose(verbose: bool) -> None:
    """`True` shows both messages again (`--verbose`: everything third-party code prints); `False` hides them."""
    global _verbose
    _verbose = bool(verbose)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for existing in [f for f in deepspeed_logger.filters if isinstance(f, _DropMessage)]:
        deepspeed_logger.removeFilter(existing)
    if not _verbose:
        deepspeed_logger.addFilter(_DropMessage(DEEPSPEED_CPU_NOTICE))


def silence_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's CPU-fallback notice from its logger (idempotent); its other messages are unchanged."""
    if not _verbose:
        set_verbose(False)


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hide transformers' model load report inside the block (`from_pretrained(..., output_loading_info=True)`
    still returns what it found)."""
    if _verbose:
        yield
        return
    # a filter, not a level: transformers runs extra checks (and warns) when this logger's level is WARNING or more
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropMessage(LOAD_REPORT)
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)
