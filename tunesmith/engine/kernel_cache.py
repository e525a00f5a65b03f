"""Build the Triton kernels of a GPU run while it starts, so that its first step does not wait for them
(the launcher; the workers are train/prebuild.py).

On a machine whose Triton cache is empty the first optimizer step of a 7B run spent 10-15 s compiling our
kernels, one after another (session 6/7 measurements, bench/RESULTS.md). `start()` is called by
model/preload while the weights are being staged onto the GPU: it launches train/prebuild.py in a few
worker processes. Each builds the run's model with one decoder layer (random weights, the same config, LoRA and
fast path as the run), runs one forward and backward on a short packed row, and compiles only its share of
the distinct kernel variants it meets (the other launches are skipped); Triton writes them to its on-disk
cache, where the run's own first step then finds them. Workers never write anything else and exit within
WORKER_TIMEOUT; whatever they do not finish the run compiles itself, as before. A marker per kernel set
(TUNESMITH_HOME/kernels/) skips all of it once the kernels are built.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER_TIMEOUT = 120  # seconds a worker may take before it is given up on
WORKER_GPU_BYTES = 3 << 30  # GPU memory a worker may hold while it builds (context, one layer, its row)
_running: list[subprocess.Popen] = []


def workers_for(cpus: int | None, free_gpu_bytes: int, model_bytes: int) -> int:
    """How many worker processes this machine can spare: a few cores each beside the run's own, and GPU
    memory the run will not need (its weights, twice over, stay free)."""
    by_cpu = max(0, ((cpus or 1) - 4) // 2)
    by_gpu = max(0, (free_gpu_bytes - 2 * model_bytes) // WORKER_GPU_BYTES)
    return int(min(6, by_cpu, by_gpu))


def marker(config: dict, args: dict) -> Path:
    """The folder whose ok-* files say this kernel set is built, named for our kernels' source, Triton's version
    and cache folder, and what of the model and the adapter decides the kernels' variants."""
    import triton

    from ..model.resolve import cache_root

    engine = Path(__file__).resolve().parent.parent / "engine"
    h = hashlib.sha256()
    for f in sorted(engine.glob("*.py")):
        h.update(f.read_bytes())
    # the module's own version: under another distribution name (pytorch-triton) all runs shared one marker
    h.update(triton.__version__.encode())
    h.update(_triton_cache_dir().encode())
    keys = ["model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "torch_dtype", "dtype"]
    h.update(json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str).encode())
    flags = ["lora_rank", "lora_alpha", "lora_dropout", "target_modules", "torch_dtype", "lean_lora", "lean_layers",
             "use_liger", "packing_window", "gradient_checkpointing"]
    h.update(json.dumps({k: args.get(k) for k in flags}, sort_keys=True, default=str).encode())
    return cache_root() / "kernels" / h.hexdigest()[:16]


def _triton_cache_dir() -> str:
    """Where Triton keeps its compiled kernels (TRITON_CACHE_DIR, else under TRITON_HOME or ~)."""
    try:
        from triton import knobs  # Triton 3.4 and later
    except ImportError:
        from triton.runtime.cache import default_cache_dir

        return os.environ.get("TRITON_CACHE_DIR", "").strip() or default_cache_dir()
    return str(knobs.cache.dir)


def built(folder: Path) -> bool:
    """Every worker of some earlier start finished its share."""
    names = {p.name for p in folder.glob("ok-*")} if folder.is_dir() else set()
    return any(all(f"ok-{k}-of-{n}" in names for k in range(n)) for n in range(1, 7))


def usable() -> bool:
    """The workers' kernels run here: a CUDA GPU, and Triton to build for it."""
    import torch

    from . import kernels

    return torch.cuda.is_available() and kernels.available()


def start(model_dir: Path, args: dict, workers: int) -> list[subprocess.Popen]:
    """Launch the workers (detached from the terminal: they say nothing) unless the kernels are built;
    they are stopped when this process exits. A machine without CUDA or Triton has none to build, and starts none."""
    if workers < 1 or not usable():
        return []
    try:
        config = json.loads((model_dir / "config.json").read_text())
        done = marker(config, args)
    except (OSError, ValueError):
        return []
    if built(done):
        return []
    job = json.dumps({"model": str(model_dir), "args": args, "workers": workers, "marker": str(done),
                      "parent": os.getpid()})
    env = {**os.environ, "TUNESMITH_NO_STAGE": "1", "TUNESMITH_NO_PREFETCH": "1", "CUDA_MODULE_LOADING": "LAZY"}
    procs = []
    for k in range(workers):
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "tunesmith.train.prebuild", str(k)], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            procs[-1].stdin.write(job.encode())
            procs[-1].stdin.close()
        except OSError:
            break
    _running.extend(procs)
    return procs


@atexit.register
def _stop() -> None:  # a run that ends first takes its workers with it
    for p in _running:
        if p.poll() is None:
            p.kill()


def watch(parent: int, started: float) -> None:
    """In a worker: leave when the run is gone or the time is up (the run then compiles what is left itself)."""
    while os.getppid() == parent and time.time() - started < WORKER_TIMEOUT:
        time.sleep(0.5)
    os._exit(1)
