"""What a run writes beside its checkpoints: logging.jsonl, one JSON object a line, the loss plot, and (--report_to)
the same numbers as curves for TensorBoard (the default, RUN/runs/, as ms-swift) and Weights & Biases (RUN/wandb/;
offline unless you are logged in or WANDB_MODE says otherwise).

fit opens the writers with start() on rank 0; every logging.jsonl line it appends passes through record(). A
resumed run appends to the same runs/ folder: TensorBoard drops the earlier file's points from the resumed step on
(purge_step), so a step killed halfway is not drawn twice.
"""

from __future__ import annotations

import atexit
import json
import netrc
import os
import time
import uuid
from pathlib import Path

from ..args import args_dict, reporters
from ..console import log
from ..errors import UserError


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
    record(path, entry)  # the same numbers as curves (--report_to)


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


# logging.jsonl key -> curve name (the Hugging Face Trainer's names, so dashboards line up with ms-swift's)
CURVES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
          "tokens/s": "train/tokens_per_second", "memory(GiB)": "train/memory_gib", "eval_loss": "eval/loss"}
_writers: dict[Path, list] = {}  # logging.jsonl path -> its open writers


def start(run_dir: Path, args, step: int) -> Path:
    """Open the writers --report_to asks for; returns the logging.jsonl path that record() is called with."""
    path = run_dir / "logging.jsonl"
    writers = []
    for name in reporters(args.report_to):
        writers.append(_TensorBoard(run_dir, step) if name == "tensorboard" else _wandb(run_dir, args))
    close(path)
    _writers[path] = writers
    return path


def record(path: Path, entry: dict) -> None:
    """One logging.jsonl entry to every writer of that run; the run's last line (train_runtime) closes them."""
    writers = _writers.get(path, [])
    step = int(str(entry.get("global_step/max_steps", "0")).split("/")[0] or 0)
    values = {CURVES[k]: float(v) for k, v in entry.items() if k in CURVES}
    for w in writers:
        if values:
            w.write(step, values)
    if "train_runtime" in entry:
        close(path)


def close(path: Path) -> None:
    for w in _writers.pop(path, []):
        w.close()


@atexit.register
def _close_all() -> None:  # a stopped run (Ctrl-C, error) still leaves complete files
    for path in list(_writers):
        close(path)


class _TensorBoard:
    def __init__(self, run_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "runs"), purge_step=step + 1 if step else None)

    def write(self, step: int, values: dict) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # curves appear while the run goes on, and survive a kill

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run):
        self.run = run

    def write(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb(run_dir: Path, args) -> _Wandb:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_login() else "offline")
    id_file = run_dir / "wandb" / "tunesmith-run-id"  # a resumed run continues the same wandb run
    id_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id + "\n")
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunesmith"), name=run_dir.name, id=run_id,
                         resume="allow", dir=str(run_dir), config=args_dict(args), mode=mode)
    except Exception as e:  # wandb's own errors (no login, no network) as one line
        raise UserError(f"--report_to wandb: {str(e).strip().splitlines()[0]} (set WANDB_MODE=offline to log "
                        "without an account, or pass --report_to tensorboard)") from None
    if mode == "offline":
        log(f"wandb: offline run in {run_dir / 'wandb'}; upload it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`")
    return _Wandb(run)


def _wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
