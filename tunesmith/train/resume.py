"""Continuing a stopped run exactly where it stopped (`sft --resume_from_checkpoint`).

    find_checkpoint()   the folder to resume from (`true`: the newest complete one under --output_dir)
    check_same_run()    refuse settings that would make the resumed run a different run
    restore()           adapter weights, optimizer, schedule and random state from the checkpoint
    continue_in()       the run folder to go on in, with logging.jsonl cut back to the checkpoint
    resume_command()    the exact command that continues this run

A resumed run replays the same data order (the seeded shuffle, advanced by the steps already made)
and the same random numbers (dropout), so on a CPU it ends with the same adapter, bit for bit, as a
run that was never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

from .checkpoint import checkpoint_problem, checkpoints, new_run_dir
from ..errors import UserError
from ..files import write_atomic
from ..console import log

# Flags that may change on resume: where things are written, how often, and how memory is used.
# Everything else changes what the run computes, so a resume with another value is refused.
SAFE_TO_CHANGE = {
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "eval_steps", "per_device_eval_batch_size",
    "dataloader_num_workers", "report_to", "resume_from_checkpoint", "max_nonfinite_steps", "device",
    "gradient_checkpointing", "use_liger", "lean_lora", "cuda_graphs", "fsdp", "dry_run",
}


def find_checkpoint(value: str, output_dir: str) -> Path:
    """--resume_from_checkpoint PATH, or `true`: the newest complete checkpoint of the newest run."""
    if value.strip().lower() in ("true", "1", "yes", "y", "on", "last"):
        root = Path(output_dir)
        runs = sorted((p for p in root.glob("v*-*") if p.is_dir() and re.match(r"v\d+-", p.name)),
                      key=lambda p: int(p.name[1:].split("-")[0]), reverse=True)
        for run in runs:
            for ckpt in reversed(checkpoints(run)):
                problem = checkpoint_problem(ckpt)
                if problem is None:
                    return ckpt
                log(f"skipping {ckpt}: {problem}")
        raise UserError(f"--resume_from_checkpoint true: no complete checkpoint under --output_dir {output_dir}")
    ckpt = Path(value)
    if not (ckpt / "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {value}: not a checkpoint folder (no trainer_state.json); "
                        "expected OUTPUT_DIR/vN-.../checkpoint-N, or true for the newest")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"--resume_from_checkpoint {value}: the checkpoint is damaged ({problem}); "
                        "resume from an earlier checkpoint-N")
    return ckpt


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path} is missing or damaged; resume from an earlier checkpoint-N") from None


def data_fingerprint(train_set) -> str:
    """A hash of the exact training samples (tokens, loss mask, order): a changed file is caught
    even when its name is the same."""
    import numpy as np

    h = hashlib.sha1()
    store = getattr(train_set, "store", None)
    if store is not None:
        for key in ("ids", "trained", "offsets"):
            h.update(np.ascontiguousarray(store[key]).tobytes())
        h.update(np.ascontiguousarray(train_set.rows).tobytes())
    else:
        for s in train_set:
            h.update(json.dumps([s.input_ids, s.labels] if hasattr(s, "labels") else dataclasses.asdict(s)).encode())
    return h.hexdigest()


def check_same_run(ckpt: Path, args, fingerprint: str, world: int = 1) -> dict:
    """The checkpoint's trainer state, after checking this command continues the same run."""
    saved = load_json(ckpt / "args.json")
    state = load_json(ckpt / "trainer_state.json")
    if state.get("world_size", 1) != world:  # the windows (batch x accumulation x processes) would differ
        raise UserError(f"{ckpt} was trained with {state.get('world_size', 1)} process(es), this run has {world}: "
                        "resume with the same NPROC_PER_NODE (and nodes), or start a new run")
    for name, now in vars(args).items():
        if name in SAFE_TO_CHANGE or name not in saved:
            continue
        before = saved[name]
        if name == "gradient_accumulation_steps":  # compare what is used, not how it was spelled
            before = type(args)(**{**vars(args), name: before}).effective_accumulation(world)
            now = args.effective_accumulation(world)
        if before != now:
            raise UserError(
                f"--{name} {_show(now)} differs from the checkpoint's {_show(before)} ({ckpt / 'args.json'}): "
                "the resumed run would not continue the same training; pass the same value, or start a new run")
    if state.get("data_fingerprint") not in (None, fingerprint):
        raise UserError(f"the training data differs from the data checkpoint {ckpt} was trained on (same --dataset "
                        "names, different contents): restore the files, or start a new run")
    return state


def _show(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def restore(ckpt: Path, model, optimizer, scheduler) -> None:
    """Adapter weights, optimizer moments, schedule position and every random generator."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{ckpt}: the adapter does not fit this model ({result.unexpected_keys[0]})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    rng = torch.load(ckpt / "rng_state.pth", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        import numpy as np

        np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def continue_in(ckpt: Path, output_dir: str, step: int) -> Path:
    """The checkpoint's own run folder, or a new one when --output_dir now points elsewhere (e.g. a
    bigger disk); logging.jsonl keeps only what happened up to the checkpoint, then a marker, and the
    TensorBoard curves (runs/) come along."""
    old_run = ckpt.resolve().parent
    same = old_run.parent == Path(output_dir).resolve()
    run_dir = old_run if same else new_run_dir(output_dir)
    kept = []
    old_log = old_run / "logging.jsonl"
    if old_log.exists():
        for line in old_log.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            at = str(entry.get("global_step/max_steps", "")).split("/")[0]
            if at.isdigit() and int(at) <= step:
                kept.append(line)
    kept.append(json.dumps({"resumed_from": str(ckpt), "global_step": step}))
    if not same and (old_run / "runs").is_dir():  # the curves go on in the new folder (run_log drops later points)
        shutil.copytree(old_run / "runs", run_dir / "runs", dirs_exist_ok=True)
    write_atomic(run_dir / "logging.jsonl", "".join(line + "\n" for line in kept))
    later = [p.name for p in checkpoints(run_dir) if int(p.name.split("-")[1]) > step]
    if later:
        log(f"note: {', '.join(later)} in {run_dir} come from after {ckpt.name} and will be replaced as the run reaches them")
    for stale in run_dir.glob(".checkpoint-*"):  # leftovers of a write the kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    return run_dir


def resume_command(ckpt: Path) -> str:
    """This process's own command line with --resume_from_checkpoint CKPT."""
    argv = sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("sft", "rlhf") else ["sft", "..."]
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok == "--resume_from_checkpoint":
            skip = True
            continue
        if tok.startswith("--resume_from_checkpoint="):
            continue
        out.append(tok)
    return shlex.join(["tunesmith", *out, "--resume_from_checkpoint", str(ckpt)])


def write_failed(e: OSError, run_dir: Path) -> UserError:
    """One line for a full disk or an unwritable folder: what failed, what is intact, how to go on."""
    import errno

    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    good = [c for c in checkpoints(run_dir) if checkpoint_problem(c) is None]
    where = e.filename or run_dir
    if not good:
        return UserError(f"cannot write {where} ({why}); no checkpoint was saved yet: free space or choose another "
                         "--output_dir and start again")
    return UserError(f"cannot write {where} ({why}); the last checkpoint {good[-1]} is intact: free space or choose "
                     f"another --output_dir, then continue with: {resume_command(good[-1])}")
