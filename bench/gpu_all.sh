#!/usr/bin/env bash
# Every speed measurement of bench/RESULTS.md, in one or two device calls (one H100):
#   bash bench/gpu_all.sh bench    ~5 min: bench_lora.py, baseline with and without checkpointing, tunesmith
#                                  eager and with CUDA graphs (no memory limit, and within the baseline's peak),
#                                  loss check, the guide's run, a profile, the longest row
#   bash bench/gpu_all.sh cli      ~4 min: gpu_guide.sh (the guide's `tunesmith sft` flags verbatim on a
#                                  random-weight 7B folder) and gpu_startup.sh (command to first step vs reading)
# (needs .device/wheels: peft, liger-kernel; logs and JSON under $OUT)
set -uo pipefail
export PYTHONPATH=$(pwd) PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | tail -1
for part in ${*:-bench cli}; do
case $part in
bench)
  python3 tests/kernel_checks.py cuda
  timeout 330 python3 bench/bench_lora.py --engines hf_gc,hf,tsgraph_fit,tsgraph_gc0,ts_fit,ts_gc0 --profile tsgraph_gc0 \
      --long 16384,32768,65536,131072 --out $OUT/bench.json > $OUT/bench.log 2>&1
  grep -E "^(hf|ts)|loss check|guide run|longest|^\|" $OUT/bench.log ;;
cli)
  timeout 140 bash bench/gpu_guide.sh > $OUT/guide.log 2>&1; grep -E "^==|real|first optimizer|done in" $OUT/guide.log
  timeout 140 bash bench/gpu_startup.sh > $OUT/startup.log 2>&1; grep -E "read|first optimizer|cache" $OUT/startup.log ;;
*) echo "unknown part $part (bench cli)" ;;
esac
done
