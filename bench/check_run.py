"""Checks on a `tunesmith sft` run for bench/gpu_smoke.sh and bench/gpu_workloads.sh.

    python bench/check_run.py clean LOG                 no traceback and no warning shown to the user
    python bench/check_run.py same RUN_A RUN_B [REL]    per-step training losses of two runs agree (logging.jsonl)
    python bench/check_run.py summary NAME LOG          one JSON line: wall, tokens/s, peak memory, final loss
    python bench/check_run.py versus LOG BASELINE_JSON  per-step losses against bench/baseline_sft.py's (reported)

Exits 1 with one line saying what failed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

SHOWN_WARNING = re.compile(r"(Traceback \(most recent call last\)|\w*Warning\b|^\s*warnings\.warn|Error:)")


def run_dir(log: str) -> Path:
    text = Path(log).read_text(errors="replace")
    m = re.search(r"^last_model_checkpoint: (.+)$", text, re.M)
    if not m:
        sys.exit(f"{log}: no adapter written (no last_model_checkpoint line)")
    return Path(os.environ.get("RUNS_IN", ".")) / Path(m.group(1)).parent  # (relative to where sft ran)


def losses(log: str) -> list[tuple[str, float]]:
    lines = [json.loads(x) for x in (run_dir(log) / "logging.jsonl").read_text().splitlines() if x.strip()]
    return [(e["global_step/max_steps"], e["loss"]) for e in lines if "loss" in e]


def clean(log: str) -> None:
    bad = [line for line in Path(log).read_text(errors="replace").splitlines() if SHOWN_WARNING.search(line)]
    if bad:
        sys.exit(f"{log}: {len(bad)} line(s) a user should not see, first: {bad[0][:200]}")
    run_dir(log)
    print(f"{log}: clean")


def same(a: str, b: str, rel: float = 0.02) -> None:
    la, lb = losses(a), losses(b)
    if [s for s, _ in la] != [s for s, _ in lb]:
        sys.exit(f"{a} and {b} logged different steps")
    worst = max(abs(x - y) / max(abs(y), 1e-9) for (_, x), (_, y) in zip(la, lb))
    if worst > rel:
        sys.exit(f"{a} departs from {b}: per-step loss differs by {worst:.2%} (allowed {rel:.0%})")
    print(f"{a} vs {b}: {len(la)} logged steps, largest loss difference {worst:.2e} (relative)")


def versus(log: str, baseline: str) -> None:
    """How far the run's per-step losses are from the baseline's (same windows, same schedule; bf16 and dropout
    masks differ): reported, not failed, since the engines sum in different orders."""
    ours = [x for _, x in losses(log)]
    theirs = json.loads(Path(baseline).read_text().strip().splitlines()[-1])["losses"]
    n = min(len(ours), len(theirs))
    gaps = [abs(x - y) / max(abs(y), 1e-9) for x, y in zip(ours[:n], theirs[:n])]
    print(f"{log} vs {baseline}: {n} steps, per-step loss within {max(gaps):.2e} (relative; mean {sum(gaps) / n:.2e}); "
          f"final {ours[n - 1]:.4f} vs {theirs[n - 1]:.4f}")


def summary(name: str, log: str) -> None:
    text = Path(log).read_text(errors="replace")
    lines = [json.loads(x) for x in (run_dir(log) / "logging.jsonl").read_text().splitlines() if x.strip()]
    train = [e for e in lines if "tokens/s" in e]
    wall = re.search(r"done in (\d+) s \(training (\d+) s\)", text)
    plan = re.search(r"memory plan: ~([\d.]+) GiB", text)
    print(json.dumps({"workload": name, "wall_s": int(wall.group(1)) if wall else None,
                      "train_s": int(wall.group(2)) if wall else None,
                      # the first logged line holds the first step (start-up, captures): the rest is the rate
                      "tokens_per_s": round(sum(e["tokens/s"] for e in train[1:]) / max(1, len(train[1:])), 1),
                      "memory_gib": max(e.get("memory(GiB)", 0) for e in train),
                      "planned_gib": float(plan.group(1)) if plan else None,
                      "final_loss": train[-1]["loss"]}))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"clean": clean, "same": same, "summary": summary, "versus": versus}[cmd](*[float(x) if i == 2 and cmd == "same" else x
                                                               for i, x in enumerate(rest)])
