"""Replay: the base model's own answers to a built-in bank of general prompts (Chinese and English), mixed into
the training data (--replay_ratio), so the adapter learns what the user's data teaches and leaves the rest of the
model where it was.

    ensure()            the answers, generated once per base model (greedy) and cached under TUNESMITH_HOME/replay/
                        (--keep_kl, train/keep.py, holds the model to the base's distribution on the same answers)
    source()            the cached answers as one more source of training records, for the tokenized cache to mix in
    count()             how many replayed answers --replay_ratio asks for
    identity_source()   `tunesmith rlhf --dataset self-cognition-dpo`: the built-in identity set as preference pairs,
                        chosen the new identity (--model_name/--model_author), rejected the base model's own answer,
                        generated once by ensure() as the replayed ones are (TUNESMITH_HOME/identity-pairs/)

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
from .sources import BUILTIN, BUILTIN_DIR, DatasetSpec, Source, parse_spec

BANK = BUILTIN_DIR / "replay_prompts.jsonl"
IDENTITY_SET = "self-cognition-dpo"  # `self-cognition`, paired with what the base model says instead
IDENTITY_BANK = BUILTIN_DIR / BUILTIN["self-cognition"]
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


def answers_file(args, model_path: Path, bank: Path = BANK, folder: str = "replay", system: str | None = None) -> Path:
    """Where the base model's answers live: keyed by its files, the system prompt (`system`, else --system), the
    thinking switch and the bank."""
    system = args.system if system is None else system
    h = hashlib.sha1(json.dumps([VERSION, MAX_NEW_TOKENS, system, args.enable_thinking]).encode())
    for p in sorted(Path(model_path).iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(p.name.encode() + b"\0")
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode() if p.suffix in WEIGHTS else p.read_bytes())
    h.update(bank.read_bytes())
    return cache_root() / folder / f"{h.hexdigest()[:24]}.jsonl"


def ensure(args, load_chat) -> None:
    """Generate and cache the base model's answers that this run needs (the replay bank's for --replay_ratio, the
    identity questions' for --dataset self-cognition-dpo), unless they already are. `load_chat` is the inference
    engine's loader (inference.infer.load_chat), handed in by the command that runs before training."""
    flag = "--replay_ratio" if getattr(args, "replay_ratio", 0) else "--keep_kl" if getattr(args, "keep_kl", 0) else None
    if flag:  # train/keep.py's --keep_kl holds the model to the base on the same answers
        _generate(args, load_chat, BANK, "replay", [{"query": q} for q in prompts()], _replayed,
                  f"{flag}: the base model answers {{n}} general prompts",
                  "the base model finished none of its answers to the {n} general prompts within "
                  f"{MAX_NEW_TOKENS} tokens; train without {flag} ({flag} 0)")
    if wants_identity_pairs(args):
        _generate(args, load_chat, IDENTITY_BANK, "identity-pairs", identity_questions(), _identity_pair,
                  f"--dataset {IDENTITY_SET}: the base model answers the {{n}} identity questions",
                  "the base model gave no usable answer to the {n} identity questions")


def _replayed(row: dict, answer) -> dict | None:
    """A replayed record: only a finished answer ({{ would read as a placeholder)."""
    if answer.finish_reason == "stop" and answer.text and "{{" not in answer.text:
        return {"query": row["query"], "response": answer.text}
    return None


def _identity_pair(row: dict, answer) -> dict | None:
    """chosen: the built-in identity answer (placeholders filled at training); rejected: the base model's own
    answer, kept when cut at MAX_NEW_TOKENS too (it is still what the base says), left out when it is empty."""
    if answer.text.strip() and "{{" not in answer.text:
        return {"query": row["query"], "response": row["response"], "rejected_response": answer.text}
    return None


def _generate(args, load_chat, bank: Path, folder: str, rows: list[dict], to_record, announce: str, none_kept: str):
    """The base model's greedy answers to rows' queries, made records by to_record(row, answer) (None: left out),
    written once under TUNESMITH_HOME/folder/ for every later run on the same base."""
    from filelock import FileLock

    from ..args import InferArguments

    model, system = base_model(args), base_system(args)
    path = answers_file(args, resolve_model(model).path, bank, folder, system)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_suffix(".lock"))):  # two runs at once: one generates, the other waits and reuses
        if path.exists():
            return
        log(f"{announce.format(n=len(rows))} once (greedy); cached for every later run on it at {path}")
        chat = load_chat(InferArguments(model=model, system=system, enable_thinking=args.enable_thinking,
                                        torch_dtype=args.torch_dtype, device=args.device))
        t0 = time.time()
        answers = chat.greedy_many([chat.template.encode_prompt([{"role": "user", "content": r["query"]}])
                                    for r in rows], MAX_NEW_TOKENS)
        records = [rec for rec in (to_record(r, a) for r, a in zip(rows, answers)) if rec is not None]
        if not records:
            raise UserError(f"{announce.split(':')[0]}: {none_kept.format(n=len(rows))}")
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        log(f"{folder}: {len(records)} of {len(rows)} answers kept in {time.time() - t0:.0f} s")
        del chat
        _free_gpu()


def base_model(args) -> str | None:
    """The base the answers are the base model's of: --model, else the one the --adapters run trained
    (rlhf reads it from there later; None: the default model)."""
    if args.model or not getattr(args, "adapters", None):
        return args.model
    return _trained(args).get("model")


def base_system(args) -> str | None:
    """The system prompt the base answers with: --system, else, for rlhf, the --adapters run's (as rlhf trains
    with it later, and the cached answers are looked up by it)."""
    if args.system is not None or not getattr(args, "rlhf_type", None) or not getattr(args, "adapters", None):
        return args.system
    return _trained(args).get("system")


def _trained(args) -> dict:
    from ..args import load_args_json

    trained = Path(args.adapters[0]) / "args.json"
    return load_args_json(trained) if trained.is_file() else {}


def wants_identity_pairs(args) -> bool:
    return bool(getattr(args, "rlhf_type", None)) and any(parse_spec(s).name == IDENTITY_SET for s in args.dataset)


def identity_questions() -> list[dict]:
    """The built-in identity records whose question the base can answer before the name is known (a question
    holding {{NAME}} has no answer of the base model's to cache once for every name)."""
    rows = [json.loads(line) for line in IDENTITY_BANK.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "{{" not in r["query"]]


def identity_source(args, spec: DatasetSpec) -> Source:
    """--dataset self-cognition-dpo[#N]: the cached pairs (query, response, rejected_response) as a source."""
    path = answers_file(args, resolve_model(args.model).path, IDENTITY_BANK, "identity-pairs")
    if not path.exists():  # `tunesmith rlhf` generates them first (ensure); a direct call of train.run does not
        raise UserError(f"--dataset {spec.text}: the base model's answers are not generated yet ({path}); "
                        "run `tunesmith rlhf`, which generates them once")
    return Source(spec, files=[path])


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
