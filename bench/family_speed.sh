#!/usr/bin/env bash
# Issue 17's speed check for one family on the device: the real `tunesmith sft` (default flags: the lean decoder
# layers where the family takes them) against transformers + PEFT with ms-swift's best option (packing + Liger,
# bench/baseline_sft.py), in the same call, on the mixed workload's data and a random-weight Qwen3-8B-shaped folder
# with FAMILY_LAYERS layers (default 12; per-layer figures scale), STEPS optimizer steps each.
#   bash bench/family_speed.sh      (after bench/gpu_smoke.sh in the same call, which builds the data; logs under $OUT)
source "$(dirname "$0")/gpu_common.sh"
F=$W/Qwen3-8B; STEPS=${STEPS:-30}
[ -f $F/config.json ] || python3 bench/make_qwen7b.py $F --tokenizer .device/tokenizer --family qwen3 --layers ${FAMILY_LAYERS:-12}
sft qwen3 "${MIXED[@]}" --model Qwen3-8B --max_steps $STEPS; python3 bench/check_run.py summary qwen3 $L/qwen3.log
grep -h "fast path\|memory plan" $L/qwen3.log
(cd $W && timeout 300 python3 $REPO/bench/baseline_sft.py --engine swift_best --max_steps $STEPS -- "${GUIDE[@]}" \
    "${MIXED[@]}" --model Qwen3-8B 2>$L/baseline_qwen3.err) || tail -3 $L/baseline_qwen3.err
finish family
