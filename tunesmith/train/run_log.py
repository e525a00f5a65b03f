"""What a run writes beside its checkpoints: logging.jsonl, one JSON object a line, and the loss plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from ..console import log


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), marker="o", ms=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", ms=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def append_jsonl(path: Path | None, entry: dict) -> None:
    if path is None:  # not rank 0
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def report_startup(marks: dict, device: str) -> None:
    """Where the time from the command to the first optimizer step went."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    now = time.time()
    names = ["launch", "start", "data", "tokenized", "loaded", "ready"]
    labels = {"start": "python+imports", "data": "data", "tokenized": "model files+tokenize", "loaded": "load weights",
              "ready": "LoRA+optimizer", "first": "first step"}
    stamps = [marks[n] for n in names if n in marks] + [now]
    keys = [n for n in names if n in marks][1:] + ["first"]
    parts = ", ".join(f"{labels[k]} {b - a:.1f} s" for k, a, b in zip(keys, stamps, stamps[1:]))
    log(f"first optimizer step {now - marks['launch']:.1f} s after launch ({parts})")


def hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m}m {s}s" if h else (f"{m}m {s}s" if m else f"{s}s")
