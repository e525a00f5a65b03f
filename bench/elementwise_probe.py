"""Microbenchmark of the element-wise Triton kernels (swiglu, its backward, dropout) on a GPU: time and bandwidth
against torch's own element-wise kernels on the same bytes, a sweep of BLOCK and warps, and, where the file is
there, the kernels of another version of kernels.py (the A/B before a change lands):

    git show REV:tunesmith/engine/kernels.py > bench/_old_kernels.py     (optional; keep it out of commits)
    PYTHONPATH=. python3 bench/elementwise_probe.py

Shapes are the random-weight Qwen2.5-7B's (hidden 3,584, intermediate 18,944) at 2,048 and 8,192 tokens.
"""

import importlib.util
from pathlib import Path

import torch
import triton.testing

from tunesmith.engine import kernels

HIDDEN, INTERMEDIATE = 3584, 18944


def load_old():
    path = Path(__file__).with_name("_old_kernels.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("old_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100) * 1000  # microseconds


def cases(k, T):
    """(name, bytes moved, function) of each kernel call at T tokens, with module k's kernels."""
    seed = (torch.tensor([7], device="cuda"), 0)
    gate, up = (torch.randn(T, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad_c = torch.randn_like(gate)
    x = torch.randn(T, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out = torch.randn_like(x)
    e = 2  # bytes of a bf16 element
    n, h = gate.numel(), x.numel()
    return [
        ("swiglu", 3 * n * e, lambda: k.swiglu(gate, up)),
        ("swiglu+dropout", 4 * n * e, lambda: k.swiglu(gate, up, 0.05, seed)),
        ("swiglu_backward", 5 * n * e, lambda: k.swiglu_backward(gate, up, grad_c)),
        ("dropout(hidden)", 2 * h * e, lambda: k.dropout(x, 0.05, seed)),
        ("dropout(hidden)+add", 3 * h * e, lambda: k.dropout(x, 0.05, seed, add_to=out)),
    ]


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    old = load_old()
    for T in (2048, 8192):
        a, b = (torch.randn(T, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        floor = timed(lambda: torch.mul(a, b, out=c))
        print(f"T={T}: torch.mul on [T, {INTERMEDIATE}] (3 tensors) {floor:.1f} us = "
              f"{3 * a.numel() * 2 / floor / 1e6:.2f} TB/s")
        versions = [("new", kernels)] + ([("old", old)] if old else [])
        for name, moved, _ in cases(kernels, T):
            row = []
            for label, k in versions:
                fn = dict((n, f) for n, _, f in cases(k, T))[name]
                us = timed(fn)
                row.append(f"{label} {us:7.1f} us {moved / us / 1e6:5.2f} TB/s")
            print(f"  {name:22s} " + " | ".join(row))
    print("sweep (new kernels, T=8192): BLOCK, warps -> swiglu, swiglu_backward, dropout+add (us)")
    saved = kernels.BLOCK, kernels.WARPS
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8):
            kernels.BLOCK, kernels.WARPS = block, warps
            fns = dict((n, f) for n, _, f in cases(kernels, 8192))
            times = [timed(fns[n]) for n in ("swiglu", "swiglu_backward", "dropout(hidden)+add")]
            print(f"  {block:5d} {warps}: " + "  ".join(f"{t:7.1f}" for t in times))
    kernels.BLOCK, kernels.WARPS = saved
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return
    a, b = (torch.randn(8192, INTERMEDIATE, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    us = timed(lambda: LigerSiLUMulFunction.apply(a, b))
    print(f"liger swiglu T=8192: {us:.1f} us = {3 * a.numel() * 2 / us / 1e6:.2f} TB/s")


if __name__ == "__main__":
    main()
