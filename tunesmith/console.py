"""What tunesmith tells the user: `[tunesmith] ...` lines on stderr, through Python's logging, spoken by the
first process only (rank 0 of a torchrun group; the others stay quiet)."""

from __future__ import annotations

import logging
import os
import sys


def first_process() -> bool:
    """This is the only process, or rank 0 of several (torchrun): the one that speaks for all."""
    return os.environ.get("RANK", "0") == "0"


class _FirstProcess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return first_process()


class _Stderr(logging.Handler):
    """To whatever sys.stderr is when the line is written (pytest and the web UI swap it), flushed at once."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


logger = logging.getLogger("tunesmith")
if not logger.handlers:
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("[tunesmith] %(message)s"))
    _handler.addFilter(_FirstProcess())
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # an application's root handlers would print every line twice


def log(msg: str) -> None:
    logger.info(msg)
