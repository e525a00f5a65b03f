"""Helpers for bench/gpu_scale.sh (issue #6): planner vs measured memory, QLoRA speed, multi-GPU comparison.

    python bench/scale_bench.py memory MODEL_DIR --lengths 1024,2048,4096,8192 [--quant_bits 4] --out mem.json
        a few training steps per length through tunesmith's own pieces (prepare_model: packing, Liger,
        automatic checkpointing; loss_of; AdamW), peak memory against planner.estimate
    python bench/scale_bench.py data OUT.jsonl --records 64 --words 700
        synthetic alpaca records of ~1k tokens for the `sft` runs
    python bench/scale_bench.py compare NAME=RUN_DIR ...
        per-step loss and tokens/s of `sft` runs (logging.jsonl) side by side
    python bench/scale_bench.py table mem.json ...
        the memory/speed tables of earlier `memory` runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `tunesmith sft` sets it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GiB = 2**30


def memory(a) -> None:
    import gc

    import torch

    from bench_lora import chat_samples, lora_args
    from tunesmith.train import planner
    from tunesmith.model.load import load_model
    from tunesmith.train.recipe import build_optimizer, prepare_model
    from tunesmith.train.batches import loss_of, micro_batches

    torch.cuda.init()
    t = time.time()
    base = load_model(Path(a.model), torch.bfloat16, "cuda", a.quant_bits)
    print(f"loaded in {time.time() - t:.0f} s ({'QLoRA nf4' if a.quant_bits else 'bf16'})", flush=True)
    shape = planner.read_shape(Path(a.model))
    results = []
    for n in [int(x) for x in a.lengths.split(",")]:
        gc.collect()
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info()[0]
        args = lora_args(max_length=n, gradient_checkpointing=a.checkpointing,
                         **({"quant_method": "bnb", "quant_bits": a.quant_bits} if a.quant_bits else {}))
        model = prepare_model(base, args, "cuda", longest_row=n)
        checkpointed = sum(1 for m in model.modules() if "_tunesmith_plain_forward" in m.__dict__)
        optimizer, _ = build_optimizer(model, args, 1000)
        model.train()
        steps = a.steps if n == a.timed_length else 3
        batches = [chat_samples(n, seed=1000 * n + i) for i in range(steps)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, oom = [], False
        try:
            for samples in batches:
                t = time.perf_counter()
                n_target = sum(s.n_trained for s in samples)
                for micro in micro_batches(samples, args, "cuda"):
                    (loss_of(model, micro) / n_target).backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        except torch.OutOfMemoryError:
            oom = True
        alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        device_used = total - free  # everything this process holds: context + allocator cache
        loss_tokens = sum(s.n_trained for s in batches[0])
        s = planner.settings_for(args, shape, n)
        s.loss_tokens, s.checkpointed = loss_tokens, checkpointed
        est = planner.estimate(shape, s)
        auto = planner.estimate(shape, planner._with(s, checkpointed=None), free_before)
        row = {"quant_bits": a.quant_bits, "tokens": n, "loss_tokens": loss_tokens, "checkpointed": checkpointed,
               "planner_auto_checkpointed": auto["checkpointed"], "oom": oom,
               "measured_alloc_gib": alloc / GiB, "measured_reserved_gib": reserved / GiB,
               "measured_device_gib": device_used / GiB, "planned_alloc_gib": est["allocated"] / GiB,
               "planned_total_gib": est["total"] / GiB, "ratio_alloc": est["allocated"] / alloc,
               "ratio_total": est["total"] / device_used, "planned": {k: v / GiB for k, v in est.items()
                                                                       if k in ("weights", "adapter", "activations", "loss")},
               "s_per_step": statistics.median(times[2:] or times) if times else None}
        row["tokens_per_s"] = n / row["s_per_step"] if row["s_per_step"] else None
        results.append(row)
        print(json.dumps(row), flush=True)
        model.unload()
        del optimizer, model
    Path(a.out).write_text(json.dumps(results, indent=2))


def table(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    print("\n| base | tokens | ckpt layers (sft / planner) | measured alloc / device GiB | planned alloc / total GiB "
          "| planned/measured alloc | planned/measured device | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = "QLoRA nf4" if r["quant_bits"] else "bf16 LoRA"
        speed = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else ("OOM" if r["oom"] else "-")
        print(f"| {base} | {r['tokens']} | {r['checkpointed']} / {r['planner_auto_checkpointed']} | "
              f"{r['measured_alloc_gib']:.1f} / {r['measured_device_gib']:.1f} | {r['planned_alloc_gib']:.1f} / "
              f"{r['planned_total_gib']:.1f} | {r['ratio_alloc']:.2f} | {r['ratio_total']:.2f} | {speed} |")
    worst = max(abs(r["ratio_total"] - 1) for r in rows)
    print(f"largest planner error against the device memory used: {100 * worst:.1f}% (target: within 15%)")


def data(a) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(a.out, "w", encoding="utf-8") as f:
        for i in range(a.records):
            n = rng.randint(a.words // 2, a.words * 3 // 2)
            text = " ".join(rng.choice(words) for _ in range(n))
            cut = int(len(text) * 0.4)
            f.write(json.dumps({"instruction": text[:cut], "input": "", "output": text[cut:]}) + "\n")
    print(f"wrote {a.records} records to {a.out}")


def compare(pairs: list[str]) -> None:
    runs = {}
    for pair in pairs:
        name, folder = pair.split("=", 1)
        lines = [json.loads(x) for x in (Path(folder) / "logging.jsonl").read_text().splitlines()]
        runs[name] = [x for x in lines if "loss" in x]
    names = list(runs)
    print("\n| step | " + " | ".join(f"{n} loss" for n in names) + " | " + " | ".join(f"{n} tokens/s" for n in names)
          + " | " + " | ".join(f"{n} GiB" for n in names) + " |")
    print("|---" * (1 + 3 * len(names)) + "|")
    for i in range(max(len(r) for r in runs.values())):
        cells = [runs[n][i] if i < len(runs[n]) else {} for n in names]
        step = next(c["global_step/max_steps"] for c in cells if c)
        print(f"| {step} | " + " | ".join(f"{c.get('loss', float('nan')):.4f}" for c in cells) + " | "
              + " | ".join(f"{c.get('tokens/s', 0):.0f}" for c in cells) + " | "
              + " | ".join(f"{c.get('memory(GiB)', 0):.1f}" for c in cells) + " |")
    ref = names[0]
    for n in names[1:]:
        pairs_ = list(zip(runs[ref], runs[n]))
        rel = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in pairs_)
        speed = lambda r: statistics.median(x["tokens/s"] for x in r[2:] or r)  # noqa: E731 (first steps warm up)
        print(f"{n} vs {ref}: largest relative loss difference {rel:.2e}; median tokens/s "
              f"{speed(runs[n]):.0f} vs {speed(runs[ref]):.0f} = {speed(runs[n]) / speed(runs[ref]):.2f}x")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("model")
    m.add_argument("--lengths", default="1024,2048,4096,8192")
    m.add_argument("--quant_bits", type=int, default=None)
    m.add_argument("--checkpointing", type=float, default=None, help="share of layers checkpointed (default: sft's plan)")
    m.add_argument("--steps", type=int, default=8, help="steps at --timed_length (3 elsewhere)")
    m.add_argument("--timed_length", type=int, default=2048)
    m.add_argument("--out", default="memory.json")
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--records", type=int, default=64)
    d.add_argument("--words", type=int, default=300)
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+")
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    a = ap.parse_args()
    if a.cmd == "memory":
        memory(a)
    elif a.cmd == "data":
        data(a)
    elif a.cmd == "compare":
        compare(a.runs)
    else:
        table(a.files)


if __name__ == "__main__":
    main()
