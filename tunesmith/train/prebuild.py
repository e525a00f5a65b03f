"""A worker of engine/kernel_cache.start(): builds one share of a run's Triton kernels into Triton's cache.

    python -m tunesmith.train.prebuild K   (the job as JSON on stdin; says nothing, writes only the caches)

It builds the run's model with one decoder layer (random weights, the run's config, LoRA and fast path via
recipe.prepare_model), runs one forward and backward on a short packed row, and compiles only the kernel
variants that fall to worker K (the other launches are skipped, so their outputs are left unwritten: nothing
reads them but the rest of this throwaway pass).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
import traceback
from pathlib import Path

from ..engine.kernel_cache import watch


def _variant(fn, args, kwargs) -> str:
    """What makes Triton compile a launch anew: the kernel, its constexprs (our launches pass them by name),
    the tensors' dtypes and alignment, which integers are 1 or multiples of 16 (the same name in every worker)."""
    parts = [getattr(fn, "__name__", str(fn))] + [f"{k}={kwargs[k]!r}" for k in sorted(kwargs)]  # constexprs
    for a in args:
        if hasattr(a, "dtype") and hasattr(a, "data_ptr"):
            parts.append(f"{a.dtype}/{a.data_ptr() % 16 == 0}")
        elif isinstance(a, bool) or not isinstance(a, int):
            parts.append(repr(a) if isinstance(a, (bool, str)) else type(a).__name__)
        else:
            parts.append("1" if a == 1 else ("16n" if a % 16 == 0 else "i"))
    return "|".join(parts)


def _build(k: int, job: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from triton.runtime.jit import JITFunction

    from ..args import SftArguments
    from ..data.template import Encoded
    from .batches import loss_of, micro_batches
    from .recipe import prepare_model

    fields = {f for f in SftArguments.__dataclass_fields__}
    args = SftArguments(**{key: v for key, v in job["args"].items() if key in fields})
    config = AutoConfig.from_pretrained(job["model"])
    config.num_hidden_layers = 1
    config.vocab_size = 1024  # the vocabulary meets no Triton kernel of ours
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:1]
    dtype = getattr(torch, args.torch_dtype) if args.torch_dtype in ("bfloat16", "float16") else torch.bfloat16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = prepare_model(model, args, "cuda", longest_row=64)
    workers, run = job["workers"], JITFunction.run

    def share(self, *a, **kw):  # compile (and launch) only this worker's share of the variants
        name = _variant(self.fn, a, {key: v for key, v in kw.items() if key not in ("grid", "warmup")})
        if int(hashlib.sha256(name.encode()).hexdigest(), 16) % workers != k:
            return None
        return run(self, *a, **kw)

    JITFunction.run = share
    samples = [Encoded([5 + i for i in range(n)], [-100] * 4 + [7 + i for i in range(n - 4)]) for n in (24, 40)]
    for batch in micro_batches(samples, args, "cuda"):
        loss_of(model, batch).backward()
    torch.cuda.synchronize()


def main() -> int:
    k = int(sys.argv[1])
    job = json.loads(sys.stdin.read())
    threading.Thread(target=watch, args=(job["parent"], time.time()), daemon=True).start()
    try:
        _build(k, job)
    except Exception:
        traceback.print_exc()  # (to nowhere in a run: start() gives workers no terminal; bench/prebuild_probe.py shows it)
        return 1
    folder = Path(job["marker"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ok-{k}-of-{job['workers']}").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
