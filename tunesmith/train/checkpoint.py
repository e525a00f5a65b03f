"""Run folders and checkpoints, laid out as ms-swift does:

    output_dir/vN-YYYYMMDD-HHMMSS/{args.json, logging.jsonl, images/, checkpoint-N/}
    checkpoint-N/{adapter_config.json, adapter_model.safetensors, args.json,
                  optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, manifest.json}

A checkpoint is written into a hidden temporary folder and renamed into place, so a killed run
never leaves a half-written checkpoint-N that looks complete. manifest.json (written last) holds
the size and sha256 of every other file, so a checkpoint damaged later is recognised too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from ..errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"


def writable_dir(path, flag: str = "--output_dir") -> Path:
    """`path` created if needed and writable, or one clear error naming the flag."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: not writable")
    return folder


def new_run_dir(output_dir: str) -> Path:
    root = writable_dir(output_dir)
    versions = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"v(\d+)-", p.name))]
    n = max(versions, default=-1) + 1
    while True:  # two runs started in the same second must not share a folder
        run = root / f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1


def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, model, extra_files: dict, save_total_limit: int | None,
                    adapter_state: dict | None = None) -> Path:
    """Write checkpoint-{step} atomically, then drop the oldest beyond save_total_limit.
    `adapter_state`: the adapter's full tensors when the model holds only shards of them (FSDP).
    A failed write (full disk, read-only folder) raises OSError and leaves earlier checkpoints as they were."""
    import torch

    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kw = {"state_dict": adapter_state} if adapter_state is not None else {}
        if len(getattr(model, "peft_config", {})) > 1:  # rlhf's frozen reference adapter beside it: not saved
            kw["selected_adapters"] = [model.active_adapter]
        model.save_pretrained(tmp, **kw)
        for name, obj in extra_files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            else:
                torch.save(obj, tmp / name)
        _write_manifest(tmp)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved before (a resumed run): replace it
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_os_error(e, tmp) from None
    if save_total_limit:
        for old in checkpoints(run_dir)[:-save_total_limit]:
            if old != final:  # the checkpoint just written is the last good one: never rotated away
                _remove(old)
    return final


def _remove(folder: Path) -> None:
    """Hide a checkpoint before deleting it, so a kill mid-delete never leaves a half checkpoint-N."""
    hidden = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_os_error(e: Exception, where: Path) -> OSError:
    if isinstance(e, OSError):
        return e
    import errno

    try:
        full = shutil.disk_usage(where.parent).free < 64 * 2**20
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code) if full else str(e).splitlines()[0][:200], str(where))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")


def checkpoint_problem(folder: Path, only: tuple[str, ...] | None = None) -> str | None:
    """Why a checkpoint cannot be trusted (missing or changed file), or None when its manifest matches.
    `only`: check just these files (infer needs no optimizer state, which people delete to save space).
    Checkpoints from before manifests existed are only checked for their adapter files."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
        return f"{', '.join(missing)} missing" if missing else None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is damaged"
    for name, want in files.items():
        if only is not None and name not in only:
            continue
        f = folder / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != want["size"]:
            return f"{name} is truncated or changed ({f.stat().st_size} bytes, the manifest says {want['size']})"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum in manifest.json"
    return None


def check_adapter_dir(path: str) -> Path:
    """A checkpoint folder that holds a complete adapter, or one clear error."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--adapters {path}: no such folder")
    if not p.is_dir():
        raise UserError(f"--adapters {path}: expected a checkpoint folder (…/checkpoint-N), got a file")
    missing = [f for f in ADAPTER_FILES if not (p / f).is_file()]
    if missing:
        raise UserError(f"--adapters {path}: not a complete adapter checkpoint ({', '.join(missing)} missing)")
    problem = checkpoint_problem(p, only=ADAPTER_FILES + ("args.json",))
    if problem:
        raise UserError(f"--adapters {path}: the checkpoint is damaged ({problem}); use an earlier checkpoint-N")
    try:
        cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        assert isinstance(cfg, dict)
    except Exception:
        raise UserError(f"--adapters {path}: adapter_config.json is damaged") from None
    try:
        from safetensors import safe_open

        with safe_open(p / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
    except Exception:
        raise UserError(f"--adapters {path}: adapter_model.safetensors is damaged or truncated") from None
    if not keys:
        raise UserError(f"--adapters {path}: adapter_model.safetensors holds no weights")
    return p


def check_adapter_fits(adapter_dir: Path, model_path: Path) -> None:
    """Refuse an adapter made for another base model, reading only config and tensor shapes."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(m.weight.shape) for name, m in skeleton.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}
    modules = {name for name, _ in skeleton.named_modules()}
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
            if not m:
                continue
            module, ab = re.sub(r"(\.base_layer)+$", "", m.group(1)), m.group(2)  # (PEFT nests one per target parameter)
            shape = f.get_slice(key).get_shape()
            if module in modules and module not in shapes:
                continue  # LoRA on a module's parameters (an MoE's experts): PEFT checks those shapes when it loads
            if module not in shapes:
                raise UserError(f"--adapters {adapter_dir}: made for another model ({module} does not exist in {model_path.name})")
            out_f, in_f = shapes[module][:2]
            if (ab == "A" and shape[1] != in_f) or (ab == "B" and shape[0] != out_f):
                raise UserError(f"--adapters {adapter_dir}: made for another model ({module} has shape {out_f}x{in_f} "
                                f"in {model_path.name}, the adapter expects {'?x' + str(shape[1]) if ab == 'A' else str(shape[0]) + 'x?'})")
