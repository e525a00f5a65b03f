#!/usr/bin/env bash
# A/B of two versions of tunesmith on the real `tunesmith sft` (the guide's flags, the mixed recipe, 48 steps),
# alternating ROUNDS times (default 2) on the same machine, so a change's gain is measured as users run it:
#   bash bench/gpu_ab.sh OLD_DIR      OLD_DIR holds the other version's `tunesmith` package (for example a copy
#                                     of this tree with one file taken from an earlier commit)
# One summary line a run (bench/check_run.py summary: tokens/s after the first step, memory, final loss).
source "$(dirname "$0")/gpu_common.sh"
OLD=$(cd "${1:?usage: bash bench/gpu_ab.sh OLD_DIR}" && pwd)
SHORT=("${MIXED[@]}" --max_steps 48)
for round in $(seq ${ROUNDS:-2}); do
    PYTHONPATH=$OLD sft old_$round "${SHORT[@]}"; python3 bench/check_run.py summary old_$round $L/old_$round.log
    sft new_$round "${SHORT[@]}"; python3 bench/check_run.py summary new_$round $L/new_$round.log
done
check same $L/old_1.log $L/new_1.log 0.02
finish ab
[ $FAILED = 0 ]
