#!/usr/bin/env bash
# --keep_kl on the GPU (issue 19): the term's extra forward/backward and its adapter-off reference pass beside the fast
# path, CUDA graphs included, on the random-weight 7B (bench/seed_replay.py gives it canned bank answers).
#   bash bench/gpu_keep.sh        (~2 min on one H200 after gpu_smoke.sh on the same machine; logs under $OUT)
# Fails on a traceback, a warning shown to the user, a missing adapter, no keep_kl in logging.jsonl, or a first
# step whose window loss departs from the run without the term (the term adds to the gradient, not to the loss).
source "$(dirname "$0")/gpu_common.sh"
(cd $W && python3 $REPO/bench/seed_replay.py Qwen2.5-7B-Instruct 'You are a helpful assistant.') >/dev/null || FAILED=1
SHORT=("${MIXED[@]}" --max_steps 24)
[ -f $L/mixed_keep0.log ] || sft mixed_keep0 "${SHORT[@]}"
sft mixed_keep "${SHORT[@]}" --keep_kl 1; check clean $L/mixed_keep.log
sft guide_keep --keep_kl 1; check clean $L/guide_keep.log
python3 - "$L" <<'PY' || FAILED=1
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from check_run import run_dir
logs = sys.argv[1]
def lines(name):
    return [json.loads(x) for x in (run_dir(f"{logs}/{name}.log") / "logging.jsonl").read_text().splitlines() if x.strip()]
for name in ("mixed_keep", "guide_keep"):
    kls = [e["keep_kl"] for e in lines(name) if "keep_kl" in e]
    assert kls and all(k == k and k >= 0 for k in kls), f"{name}: keep_kl {kls}"
    print(f"{name}: keep_kl logged {kls[:6]}")
a, b = lines("mixed_keep0"), lines("mixed_keep")
assert abs(a[0]["loss"] - b[0]["loss"]) <= 1e-3 * abs(a[0]["loss"]), (a[0]["loss"], b[0]["loss"])
last = lambda rows, key: [e[key] for e in rows if key in e][-1]
print(f"mixed, 24 steps: tokens/s {last(a, 'tokens/s'):.0f} without the term, {last(b, 'tokens/s'):.0f} with it; "
      f"peak reserved {last(a, 'memory(GiB)')} vs {last(b, 'memory(GiB)')} GiB")
PY
grep -h "keep_kl\|CUDA graph" $L/mixed_keep.log $L/guide_keep.log | head -6
finish keep
[ $FAILED = 0 ] && echo "GPU KEEP PASSED" || { echo "GPU KEEP FAILED"; exit 1; }
