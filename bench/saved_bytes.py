"""What one decoder layer keeps for backward, tensor by tensor (the memory side of bench_lora.py).

    python bench/saved_bytes.py [--seq 2048] [--engine ts|tsplain] [--layers 2]

Builds the Qwen2.5-7B architecture with a few layers (random weights), prepares it as `tunesmith sft`
does, runs one forward pass of a packed row under torch's saved-tensor hooks and prints every
distinct storage that autograd keeps, grouped by shape, in units of hidden-widths (tokens x hidden x
element size), and the allocator's view: allocated after the forward, and the peak of forward+backward.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import Engine, build_model, chat_samples  # noqa: E402
from tunesmith.train.batches import loss_of, micro_batches  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--engine", default="ts")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build_model(a.layers)
    engine = Engine(base, a.engine, share=0.0)
    hidden = base.config.hidden_size
    width = a.seq * hidden * 2  # one bf16 hidden-width of the row
    samples = chat_samples(a.seq, seed=0)
    batch = next(iter(micro_batches(samples, engine.args, device)))
    for _ in range(2):  # warm-up: kernels compiled, allocator settled
        loss_of(engine.model, batch).backward()
    engine.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()

    seen: dict[int, tuple] = {}
    params = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and ptr not in params:
                seen[ptr] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes(), t.grad_fn is not None)
        except (RuntimeError, NotImplementedError):
            pass
        return t

    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(engine.model, batch)
    torch.cuda.synchronize()
    after_forward = torch.cuda.memory_allocated()
    fwd_peak = torch.cuda.max_memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()

    groups = defaultdict(lambda: [0, 0])
    for shape, dtype, nbytes, _ in seen.values():
        if nbytes < 1 << 20:
            continue
        key = f"{list(shape)} {str(dtype).replace('torch.', '')}"
        groups[key][0] += 1
        groups[key][1] += nbytes
    total = sum(b for _, b in groups.values())
    print(f"engine {a.engine}, {a.layers} layers, {a.seq} tokens; one hidden-width = {width / 2**20:.1f} MiB")
    print("| saved tensor (shape, dtype) | count | per layer, hidden-widths |")
    print("|---|---|---|")
    for key, (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| {key} | {count} | {nbytes / width / a.layers:.2f} |")
    print(f"saved storages of 1 MiB and more: {total / width / a.layers:.2f} hidden-widths per layer")
    print(f"allocated after forward - before: {(after_forward - before) / width / a.layers:.2f} widths per layer "
          f"({(after_forward - before) / 2**30:.2f} GiB); forward peak above the start "
          f"{(fwd_peak - before) / 2**30:.2f} GiB; forward+backward peak above the start {(peak - before) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
