"""Start-up time with and without the tokenized cache, on a synthetic 50k-record set.

    python bench/tokenize_cache.py [--records 50000] [--model qwen2.5-0.5b]

Runs `tunesmith data inspect` (the same data preparation as `sft`, without loading the weights) twice
with a fresh cache folder and reports the wall time and peak memory of each run.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the model learns to answer questions about data files tokens cache training 数据 模型 训练 回答 问题".split()


def synthetic(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": text(rng.randint(5, 40)), "input": text(rng.randint(0, 20)),
                                "output": text(rng.randint(10, 120))}, ensure_ascii=False) + "\n")


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return time.time() - t0, proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--model", default=None)
    opts = ap.parse_args()
    from tunesmith.model.resolve import resolve_model

    models = resolve_model(opts.model).path.parent
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "models").symlink_to(models)  # share the converted models, not the tokenized cache
        data = Path(tmp) / "synthetic.jsonl"
        synthetic(data, opts.records)
        env = {**os.environ, "TUNESMITH_HOME": str(home)}
        cmd = [sys.executable, "-m", "tunesmith", "data", "inspect", str(data), "--samples", "0"]
        if opts.model:
            cmd += ["--model", opts.model]
        first, log1 = timed(cmd, env)
        second, log2 = timed(cmd, env)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"{opts.records} records, {data.stat().st_size / 2**20:.1f} MiB jsonl, {os.cpu_count()} cores")
        print(f"first run (read + tokenize + cache): {first:.1f} s   [{[l for l in log1.splitlines() if 'tokenized' in l][-1]}]")
        print(f"second run (cache hit):               {second:.1f} s")
        print(f"saved {first - second:.1f} s per start-up; peak RSS of a run {peak:.0f} MiB")


if __name__ == "__main__":
    main()
