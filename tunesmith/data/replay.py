"""Replay: the base model's own answers to a built-in bank of general prompts (Chinese and English), mixed into
the training data (--replay_ratio), so the adapter learns what the user's data teaches and leaves the rest of the
model where it was.

    ensure()   the answers, generated once per base model (greedy) and cached under TUNESMITH_HOME/replay/
    source()   the cached answers as one more source of training records, for the tokenized cache to mix in
    count()    how many replayed answers --replay_ratio asks for

The bank (replay_prompts.jsonl) is not the question bank `tunesmith eval` scores retention with, so that score
measures what replay held in place, not what it rehearsed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from ..console import log
from ..model.resolve import cache_root, resolve_model
from .sources import BUILTIN_DIR, DatasetSpec, Source

BANK = BUILTIN_DIR / "replay_prompts.jsonl"
VERSION = 3  # bump when the generation or the stored records change
MAX_NEW_TOKENS = 128  # a longer answer is left out, not cut: a cut one would teach the model to stop mid-sentence
# Greedy answers, what the base says today. Sampled ones (temperature 1) would hold the distribution in expectation,
# but one sample per prompt from a small model is often wrong ("the Mona Lisa was painted by Oliver"), and the
# adapter learns it. The bank leaves out prompts whose answer names a near rival of a common fact ("the Red
# Planet" -> Mars, which turned "the largest planet" into Mars).
WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")  # known by name, size and time: hashing GBs costs too much


def prompts() -> list[str]:
    return [json.loads(line)["query"] for line in BANK.read_text(encoding="utf-8").splitlines() if line.strip()]


def count(ratio: float, n_train: int) -> int:
    """Replayed answers for n_train training samples: ratio per sample, at least one when replay is on."""
    return max(1, round(ratio * n_train)) if ratio > 0 and n_train else 0


def answers_file(args, model_path: Path) -> Path:
    """Where the base model's answers live: keyed by its files, the system prompt, the thinking switch and the bank."""
    h = hashlib.sha1(json.dumps([VERSION, MAX_NEW_TOKENS, args.system, args.enable_thinking]).encode())
    for p in sorted(Path(model_path).iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(p.name.encode() + b"\0")
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode() if p.suffix in WEIGHTS else p.read_bytes())
    h.update(BANK.read_bytes())
    return cache_root() / "replay" / f"{h.hexdigest()[:24]}.jsonl"


def ensure(args, load_chat) -> None:
    """Generate and cache the base model's answers to the bank, unless they already are. `load_chat` is the
    inference engine's loader (inference.infer.load_chat), handed in by the command that runs before training."""
    if not getattr(args, "replay_ratio", 0):
        return
    from filelock import FileLock

    from ..args import InferArguments

    path = answers_file(args, resolve_model(args.model).path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # two runs at once: one generates, the other waits and reuses
        if path.exists():
            return
        bank = prompts()
        log(f"--replay_ratio: the base model answers {len(bank)} general prompts once (greedy); "
            f"cached for every later run on it at {path}")
        chat = load_chat(InferArguments(model=args.model, system=args.system, enable_thinking=args.enable_thinking,
                                        torch_dtype=args.torch_dtype, device=args.device))
        t0 = time.time()
        answers = chat.greedy_many([chat.template.encode_prompt([{"role": "user", "content": q}]) for q in bank],
                                   MAX_NEW_TOKENS)
        records = [{"query": q, "response": a.text} for q, a in zip(bank, answers)
                   if a.finish_reason == "stop" and a.text and "{{" not in a.text]  # {{ would read as a placeholder
        if not records:
            raise UserError(f"--replay_ratio: the base model finished none of its answers to the {len(bank)} general "
                            f"prompts within {MAX_NEW_TOKENS} tokens; train without replay (--replay_ratio 0)")
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        log(f"replay: {len(records)} of {len(bank)} answers kept (finished within {MAX_NEW_TOKENS} tokens) "
            f"in {time.time() - t0:.0f} s")
        del chat
        _free_gpu()


def source(args, model_path: Path) -> Source | None:
    """The cached answers as a source of query/response records; None when replay is off."""
    ratio = getattr(args, "replay_ratio", 0)
    if not ratio:
        return None
    path = answers_file(args, model_path)
    if not path.exists():  # `tunesmith sft` generates them first (ensure); a direct call of train.run does not
        raise UserError(f"--replay_ratio {ratio:g}: the base model's answers are not generated yet ({path}); "
                        "run `tunesmith sft`, which generates them once")
    return Source(DatasetSpec(f"replay of the base model's own answers (--replay_ratio {ratio:g})", str(path)), files=[path])


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
