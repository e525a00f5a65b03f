#!/usr/bin/env bash
# The GPU smoke test, run on the device before any change to GPU code lands (README, "Contributing"):
#   bash bench/gpu_smoke.sh        (~4 min on one H200; logs under $OUT)
# Triton kernels against torch; the guide's command verbatim; a short mixed run (the guide's section 5 recipe)
# with CUDA graphs, without, and with the first capture made to fail. Fails on a traceback, any warning
# shown to the user, a missing adapter, or losses that depart from the eager path.
source "$(dirname "$0")/gpu_common.sh"
python3 tests/kernel_checks.py cuda || FAILED=1
export TRITON_CACHE_DIR=/tmp/triton-smoke  # one Triton cache for the whole smoke test, cold at first
sft guide; check clean $L/guide.log
sft guide_eager --cuda_graphs false; check same $L/guide.log $L/guide_eager.log 0.001
SHORT=("${MIXED[@]}" --max_steps 48)
sft mixed_short "${SHORT[@]}"; check clean $L/mixed_short.log
sft mixed_short_eager "${SHORT[@]}" --cuda_graphs false
check same $L/mixed_short.log $L/mixed_short_eager.log 0.02
TUNESMITH_FAULT_CAPTURE=1 sft mixed_short_fault "${SHORT[@]}"
grep -c "CUDA graph capture failed" $L/mixed_short_fault.log | grep -qx 1 || { echo "fault run: expected one notice line"; FAILED=1; }
grep -v "CUDA graph capture failed" $L/mixed_short_fault.log > $L/mixed_short_fault.rest; check clean $L/mixed_short_fault.rest
check same $L/mixed_short_fault.log $L/mixed_short_eager.log 0.02
grep -h "captures\|CUDA graph" $L/mixed_short*.log | head -5
finish smoke
[ $FAILED = 0 ] && echo "GPU SMOKE PASSED" || { echo "GPU SMOKE FAILED"; exit 1; }
