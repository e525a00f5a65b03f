"""A run's state for whoever watches it (the web UI): one small JSON file, replaced whole at each change, at the
path TUNESMITH_STATUS_FILE names (settings.status_file; no file when unset). Rank 0 alone writes it.

    {"phase": "starting" | "training" | "finished" | "stopped" | "failed", "run_dir": ..., "step": 12,
     "max_steps": 40, "loss": 1.23, "learning_rate": 9.1e-05, "elapsed_s": 31.0, "remaining_s": 72.3,
     "tokens_per_s": 5123.0, "checkpoint": ".../checkpoint-10", "error": "one line, when failed"}

Per-step changes are written at most twice a second; phase changes and checkpoints at once.
"""

from __future__ import annotations

import json
import time

from .. import settings
from ..files import write_atomic
from ..console import first_process

MIN_INTERVAL = 0.5  # seconds between per-step writes
_state: dict = {}
_written = 0.0


def update(every_step: bool = False, **fields) -> None:
    global _written
    path = settings.status_file()
    if path is None or not first_process():
        return
    _state.update(fields)
    now = time.time()
    if every_step and now - _written < MIN_INTERVAL:
        return
    _written = now
    try:
        write_atomic(path, json.dumps(_state, ensure_ascii=False))  # a reader never sees half a file
    except OSError:  # a watcher's file must never stop the run
        pass


def read(path) -> dict:
    """The last state written at `path` ({} before the first)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
