"""Where the GPU time of one profiled step goes, by kind of kernel, from a chrome trace that
`bench_lora.py --profile ENGINE` writes under $OUT (trace_ENGINE.json.gz):

    python bench/kernel_time.py trace_tsgraph_fit.json.gz [--grid]

Prints the kernels' total busy time, the span from the first kernel's start to the last one's end (their
difference is time the GPU sat idle), and per kind the time, the number of kernels and the largest names
(with --grid, name and launch grid: which shape of a Triton kernel takes the time).
"""

import collections
import gzip
import json
import re
import sys

KINDS = [  # the first pattern a kernel's name matches decides its kind
    ("cuBLAS matmuls (frozen weights, r-wide LoRA, the loss's vocabulary)", r"gemm|cutlass|xmma|nvjet|cublas"),
    ("flash attention", r"flash"),
    ("LoRA A (Triton)", r"lora_a_kernel"),
    ("LoRA A gradient (Triton)", r"lora_a_grad"),
    ("LoRA dx (Triton)", r"lora_dx"),
    ("SwiGLU (Triton)", r"swiglu"),
    ("RMSNorm (Triton)", r"rms_norm"),
    ("RoPE (Triton)", r"rope"),
    ("cross-entropy (Triton)", r"cross_entropy"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("reductions", r"reduce"),
    ("copies and casts", r"copy|memcpy|convert"),
    ("fills", r"memset|fill"),
    ("other elementwise", r"elementwise|vectorized"),
    ("other", r"."),
]


def main(path: str, by_grid: bool = False) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        sys.exit(f"{path}: no GPU kernels in this trace")
    time, count = collections.Counter(), collections.Counter()
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in kernels:
        kind = next(k for k, pattern in KINDS if re.search(pattern, e["name"], re.I))
        time[kind] += e["dur"]
        count[kind] += 1
        grid = f" grid {e.get('args', {}).get('grid')}" if by_grid else ""
        names[kind][e["name"][:100] + grid] += e["dur"]
    busy = sum(time.values())
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    print(f"{path}: {len(kernels)} kernels, {busy / 1e3:.1f} ms busy in a span of {span / 1e3:.1f} ms")
    for kind, t in time.most_common():
        print(f"  {t / 1e3:8.2f} ms {count[kind]:6d}  {kind}")
        for name, t2 in names[kind].most_common(6 if by_grid else 3):
            print(f"  {t2 / 1e3:17.2f}    {name}")


if __name__ == "__main__":
    main(sys.argv[1], "--grid" in sys.argv[2:])
