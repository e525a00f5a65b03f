#!/usr/bin/env bash
# Every speed measurement of bench/RESULTS.md, in one or two device calls (one H100):
#   bash bench/gpu_all.sh bench    ~6 min: bench_lora.py, baseline with and without checkpointing, tunesmith
#                                  with CUDA graphs and eager within the baseline's peak, without recompute,
#                                  loss check, the guide's run, a profile, the longest row
#   bash bench/gpu_all.sh cli      ~6 min: gpu_guide.sh (the guide's `tunesmith sft` flags verbatim on a
#                                  random-weight 7B folder) and startup_profile.sh (command to first step vs reading)
# (needs .device/wheels: peft, liger-kernel; logs and JSON under $OUT)
set -uo pipefail
export PYTHONPATH=$(pwd) PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | tail -1
for part in ${*:-bench cli}; do
case $part in
bench)
  python3 tests/kernel_checks.py cuda
  # each tunesmith engine in its own process beside its own baseline: a second *_fit engine in one process
  # would plan from what the first left allocated
  timeout 150 python3 bench/bench_lora.py --engines hf_gc,tsgraph_fit --loss_engines tsgraph --profile tsgraph_gc0 \
      --out $OUT/bench_graphs.json > $OUT/bench_graphs.log 2>&1
  timeout 120 python3 bench/bench_lora.py --engines hf_gc,ts_fit --skip_loss_check --skip_guide --out $OUT/bench_eager.json \
      > $OUT/bench_eager.log 2>&1
  timeout 200 python3 bench/bench_lora.py --engines hf,ts_gc0 --skip_loss_check --skip_guide --long 32768,65536,131072 \
      --out $OUT/bench_nockpt.json > $OUT/bench_nockpt.log 2>&1
  grep -hE "^(hf|ts)|loss check|guide run|longest" $OUT/bench_*.log ;;
cli)
  timeout 140 bash bench/gpu_guide.sh > $OUT/guide.log 2>&1; grep -E "^==|real|first optimizer|done in" $OUT/guide.log
  timeout 300 bash bench/startup_profile.sh > $OUT/startup.log 2>&1; grep -E "==|read|first optimizer|loaded|staged" $OUT/startup.log ;;
*) echo "unknown part $part (bench cli)" ;;
esac
done
