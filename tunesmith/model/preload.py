"""Start on the model's weights before the imports finish: at start-up the disk is the slowest part.

prefetch(): right after the command line is parsed, a thread reads the local model's safetensors
    files into the page cache (it needs nothing heavy, so it starts at once).
stage(): for `sft` on one GPU, a second thread imports torch and copies the files' tensors straight
    into GPU memory, through two pinned buffers, while the main thread imports transformers,
    tokenizes and plans (and a third imports Triton and our kernels). load.load_model() then
    builds the model around those tensors with transformers' own from_pretrained(state_dict=...):
    no second read, no second copy.
Anything the stager cannot do (another dtype in the files, an MoE's experts stored one by one, no room on the
GPU, an error) leaves load_model() on its usual path: staging only ever saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import threading
from pathlib import Path

from .. import settings

CHUNK = 64 << 20  # bytes per pinned staging buffer
PIECE = 32 << 20  # bytes per read of a prefetch thread
SPARE = 2 << 30  # GPU memory the staged weights must leave free
PER_EXPERT = re.compile(r"\.experts\.\d+\.")  # transformers stacks such tensors into one 3-D weight as it loads: a
# copy, so staged ones would sit beside it (two copies of the experts: Qwen3-30B-A3B's shape at 12 layers, 29.4 GiB)
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # torch's name -> the safetensors header's
_stager: Stager | None = None


def model_files(name: str | None) -> list[Path]:
    """The safetensors files of a local folder or an already converted default model (else none)."""
    from .resolve import ALIASES, DEFAULT_MODEL, DEFAULT_MODELS, _is_complete, cache_root

    name = name or DEFAULT_MODEL
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        alias = ALIASES.get(name.lower(), name.lower())
        folder = cache_root() / "models" / alias
        if alias not in DEFAULT_MODELS or not _is_complete(folder):
            return []
    return sorted(folder.glob("*.safetensors"))


def prefetch(name: str | None, readers: int | None = None) -> None:
    """Read the weight files into the page cache in the background, so the disk works while Python imports.
    Several threads read interleaved PIECE-sized pieces in file order: the disk serves several requests at
    once, and whoever reads the files next (the stager, or transformers) finds them cached in order."""
    readers = readers or settings.prefetch_readers()
    files = model_files(name)
    pieces = [(f, at) for f in files for at in range(0, f.stat().st_size, PIECE)]

    def read(k: int):
        buf = bytearray(PIECE)
        fds = {}
        try:
            for f, at in pieces[k::readers]:
                if f not in fds:
                    fds[f] = os.open(f, os.O_RDONLY)
                os.preadv(fds[f], [buf], at)  # the GIL is released while the disk works
        except OSError:
            return
        finally:
            for fd in fds.values():
                os.close(fd)

    for k in range(readers if pieces else 0):
        threading.Thread(target=read, args=(k,), name=f"tunesmith-prefetch-{k}", daemon=True).start()


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table and where its data starts."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def stage(args) -> None:
    """Start copying the model's weights onto the GPU, where `sft` will certainly load them there unchanged:
    one process, no quantization or FSDP, a GPU device, half-precision or default dtype (checked against
    the files once torch is imported)."""
    global _stager
    if settings.no_stage() or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        return  # no NVIDIA driver here: not worth a thread importing torch
    if args.quant_bits is not None or args.fsdp or not (args.device in ("auto", "cuda") or args.device.startswith("cuda:")):
        return
    from ..args import normalize_dtype

    dtype = normalize_dtype(args.torch_dtype)
    files = model_files(args.model)
    if files and dtype in ("auto", "bfloat16", "float16"):
        from ..args import args_dict

        _stager = Stager(files, args.device, dtype, args_dict(args))
        _stager.thread.start()
        threading.Thread(target=_warm_triton, name="tunesmith-warm-triton", daemon=True).start()


def _warm_triton() -> None:
    """Import Triton and our kernels, and let Triton hash its own library (its cache key; ~0.5 s, mostly
    outside the GIL), so the first training step does not wait for them."""
    try:
        from ..engine import kernels

        kernels._lora_kernels()
        try:
            from triton.runtime.cache import triton_key
        except ImportError:  # older Triton
            from triton.compiler.compiler import triton_key
        triton_key()
    except Exception:  # no Triton, or another layout: the first step does this itself
        pass


class Stager:
    def __init__(self, files: list[Path], device: str, dtype: str, args: dict | None = None):
        self.files, self.device, self.dtype, self.args = files, device, dtype, args
        self.folder = files[0].parent.resolve()
        self.tensors: dict | None = None
        self.bytes = 0  # GPU memory it holds
        self.allocated = threading.Event()  # set once self.bytes is final (allocated, or nothing will be)
        self.thread = threading.Thread(target=self._run, name="tunesmith-stage", daemon=True)

    def _run(self):
        try:
            import torch

            if self.device in ("auto", "cuda") and not torch.cuda.is_available():
                return
            self.device = str(_device(self.device))
            if self.dtype == "auto":
                self.dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            dtype = getattr(torch, self.dtype)
            tables, nbytes = table(self.files, dtype)
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            if tables is None or nbytes + SPARE > free:
                return
            tensors = allocate(tables, dtype, self.device)
            self.bytes = nbytes
            if self.args is not None and settings.kernel_prebuild():  # the kernels the first step needs, built beside the copy
                from ..engine import kernel_cache

                kernel_cache.start(self.folder, self.args, kernel_cache.workers_for(os.cpu_count(), free, nbytes))
            self.allocated.set()  # the planner may read the free memory now
            fill(self.files, tables, tensors)
            self.tensors = tensors
        except Exception:  # the usual loading path meets (and reports) whatever went wrong
            self.tensors = None
            self.bytes = 0
        finally:
            self.allocated.set()


def _device(name: str):
    import torch

    d = torch.device("cuda" if name == "auto" else name)
    return torch.device(d.type, torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d


def table(files: list[Path], dtype) -> tuple[list | None, int]:
    """The files' tensor tables and their bytes; None if some tensor is not of `dtype`, or an MoE's experts are
    stored one by one (load_model converts those)."""
    tables = [read_header(f) for f in files]
    want = DTYPES.get(str(dtype).replace("torch.", ""))
    if any(t["dtype"] != want for h, _ in tables for t in h.values()):
        return None, 0
    if any(PER_EXPERT.search(name) for h, _ in tables for name in h):
        return None, 0
    return tables, sum(t["data_offsets"][1] - t["data_offsets"][0] for h, _ in tables for t in h.values())


def allocate(tables: list, dtype, device) -> dict:
    import torch

    return {name: torch.empty(t["shape"], dtype=dtype, device=device) for h, _ in tables for name, t in h.items()}


def read_into(files: list[Path], device, dtype) -> dict | None:
    """Every tensor of `files` on `device`, or None where some tensor is not of `dtype`."""
    tables, _ = table(files, dtype)
    if tables is None:
        return None
    tensors = allocate(tables, dtype, device)
    fill(files, tables, tensors)
    return tensors


def fill(files: list[Path], tables: list, tensors: dict) -> None:
    """Read the files' data in CHUNK-sized pieces and copy each piece into the tensors it covers; on a GPU
    through two pinned buffers, so reading the next piece overlaps copying this one."""
    import torch

    first = next(iter(tensors.values()), None)
    gpu = first is not None and first.is_cuda
    buffers = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=gpu) for _ in range(2 if gpu else 1)]
    stream = torch.cuda.Stream(first.device) if gpu else None
    done = [None] * len(buffers)  # the event after which each buffer may be refilled
    k = 0
    with torch.cuda.stream(stream) if gpu else contextlib.nullcontext():
        for f, (header, start) in zip(files, tables):
            pieces = sorted((t["data_offsets"][0], t["data_offsets"][1], name) for name, t in header.items())
            end = pieces[-1][1] if pieces else 0
            with open(f, "rb", buffering=0) as fh:
                fh.seek(start)
                at, i = 0, 0  # the data offset of the buffer's first byte; the first piece not yet complete
                while at < end:
                    b = k % len(buffers)
                    if done[b] is not None:
                        done[b].synchronize()
                    n = min(CHUNK, end - at)
                    _read_exactly(fh, memoryview(buffers[b].numpy())[:n], f)
                    while i < len(pieces) and pieces[i][0] < at + n:
                        lo, hi, name = pieces[i]
                        a, z = max(lo, at), min(hi, at + n)
                        flat = tensors[name].view(-1).view(torch.uint8)
                        flat[a - lo: z - lo].copy_(buffers[b][a - at: z - at], non_blocking=gpu)
                        if hi > at + n:
                            break  # the rest of this tensor comes with the next piece
                        i += 1
                    if gpu:
                        done[b] = torch.cuda.Event()
                        done[b].record(stream)
                    at += n
                    k += 1
    if gpu:
        stream.synchronize()


def _read_exactly(fh, view: memoryview, path: Path) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise OSError(f"{path}: ends early")
        got += n


def staged_bytes() -> int:
    """GPU memory the stager holds (waits until it has allocated, or decided not to)."""
    if _stager is None:
        return 0
    _stager.allocated.wait()
    return _stager.bytes


def take(path: Path, dtype, device: str) -> dict | None:
    """The staged tensors, if they are this model's, in this dtype, on this device; the stager lets go of them."""
    global _stager
    stager, _stager = _stager, None
    if stager is None:
        return None
    stager.thread.join()
    import torch

    tensors, stager.tensors = stager.tensors, None
    if tensors is None:
        return None
    if stager.folder != Path(path).resolve() or getattr(torch, stager.dtype) != dtype or \
            torch.device(stager.device) != _device(device):
        del tensors
        torch.cuda.empty_cache()
        return None
    return tensors
