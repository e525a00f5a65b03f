#!/usr/bin/env bash
# The guide's command from launch to adapter on the device, as a user's machine meets it: Python writes
# bytecode (pip-installed environments have it), the 7B weight files evicted from the page cache, Triton's
# cache empty, with the kernels built during start-up (engine/kernel_cache, the default) and without
# (TUNESMITH_KERNEL_PREBUILD=0), twice each; then once more with Triton's cache warm.
#   bash bench/startup_guide.sh     (after bench/gpu_smoke.sh or gpu_workloads.sh in the same call; logs under $OUT)
source "$(dirname "$0")/gpu_common.sh"
unset PYTHONDONTWRITEBYTECODE
M=$W/Qwen2.5-7B-Instruct
evict() { sync; python3 -c "
import glob, os
for f in glob.glob('$M/*.safetensors'):
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)"; }
TRITON_CACHE_DIR=/tmp/triton-bytecode sft startup_bytecode --max_steps 1 >/dev/null  # writes the bytecode
for i in 1 2; do
  evict; TRITON_CACHE_DIR=/tmp/triton-cold-$i sft startup_prebuild_$i
  evict; TRITON_CACHE_DIR=/tmp/triton-none-$i TUNESMITH_KERNEL_PREBUILD=0 sft startup_none_$i
done
evict; TRITON_CACHE_DIR=/tmp/triton-cold-1 sft startup_warm
grep -h "first optimizer step\|done in" $L/startup_*.log
finish startup
