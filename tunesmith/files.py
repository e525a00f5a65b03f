"""Writing a file so that no reader ever sees half of it: args.json, the web UI's state, the status file, a run's
log after a resume, the Modelfile, eval reports and the replay cache all go through here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` beside `path` under a name no other writer uses, then rename it into place: a reader sees the
    old file or the new one, and a crash or a full disk leaves the old one intact (and no stray temporary file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are the user's to read and share
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
