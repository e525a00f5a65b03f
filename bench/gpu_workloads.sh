#!/usr/bin/env bash
# The workload suite: the real `tunesmith sft` on data shaped like users' data (bench/workloads.py), on the
# random-weight Qwen2.5-7B, beside the ms-swift-style baselines (bench/baseline_sft.py) in the same call:
#   bash bench/gpu_workloads.sh [guide] [mixed] [chat] [long] [bench] [baseline]    (logs, JSON under $OUT)
# Each workload: command to adapter (wall), training tokens/s from logging.jsonl, peak reserved memory
# against the planner's estimate, final loss; `baseline` runs swift_default and swift_best on the same data
# (BASELINE_ENGINES='... unsloth' adds Unsloth: carry .whl-unsloth). NO_EAGER=1: mixed without its eager run.
source "$(dirname "$0")/gpu_common.sh"
CHAT=(--dataset chat.jsonl --gradient_accumulation_steps 8 --max_length 16384 --num_train_epochs 1 --logging_steps 1)
LONG=(--dataset long.jsonl --max_length 65536 --num_train_epochs 1 --gradient_accumulation_steps 2 --logging_steps 1)
summary() { python3 bench/check_run.py summary "$@" | tee -a $OUT/workloads.jsonl; }
baseline() {  # baseline NAME STEPS FLAGS...
    local name=$1 steps=$2; shift 2
    for engine in ${BASELINE_ENGINES:-swift_default swift_best}; do
        local path=$REPO; [ $engine = unsloth ] && unsloth_site && path=$UNSLOTH_SITE:$REPO
        (cd $W && PYTHONPATH=$path timeout ${BASELINE_TIMEOUT:-300} python3 $REPO/bench/baseline_sft.py --engine $engine --max_steps $steps -- \
            "${GUIDE[@]}" "$@" 2>$L/baseline_${name}_$engine.err | sed "s/^{/{\"workload\": \"$name\", /") \
            | tee -a $OUT/workloads.jsonl || tail -3 $L/baseline_${name}_$engine.err
    done
}
START=${CALL_START:-$(date +%s)}  # CALL_START/DEADLINE_S: parts that would start past the deadline are skipped
for part in ${*:-guide mixed chat long bench}; do
if [ -n "${DEADLINE_S:-}" ] && [ $(( $(date +%s) - START )) -gt $DEADLINE_S ]; then
    echo "$part: skipped ($(( $(date +%s) - START )) s into the call, deadline $DEADLINE_S s)"; continue
fi
case $part in
guide)  # each on a cold Triton cache, as on a fresh machine
       TRITON_CACHE_DIR=/tmp/triton-g1 sft guide; summary guide $L/guide.log
       TRITON_CACHE_DIR=/tmp/triton-g2 sft guide_eager --cuda_graphs false; summary guide_eager $L/guide_eager.log ;;
mixed) sft mixed "${MIXED[@]}"; summary mixed $L/mixed.log; grep -h "CUDA graph" $L/mixed.log
       [ -n "${NO_EAGER:-}" ] || { sft mixed_eager "${MIXED[@]}" --cuda_graphs false; summary mixed_eager $L/mixed_eager.log; } ;;
mixed_baseline) baseline mixed ${BASELINE_STEPS:-40} "${MIXED[@]}" ;;
mixed_gc) sft mixed_gc "${MIXED[@]}" --gradient_checkpointing true; summary mixed_gc $L/mixed_gc.log ;;
chat) sft chat "${CHAT[@]}"; summary chat $L/chat.log ;;
chat_gc) sft chat_gc "${CHAT[@]}" --gradient_checkpointing true; summary chat_gc $L/chat_gc.log ;;  # at the baselines' memory
chat_baseline) baseline chat ${CHAT_BASELINE_STEPS:-4} "${CHAT[@]}" ;;
long) sft long "${LONG[@]}"; summary long $L/long.log ;;
long_gc) sft long_gc "${LONG[@]}" --gradient_checkpointing true; summary long_gc $L/long_gc.log ;;
long_baseline) baseline long ${LONG_BASELINE_STEPS:-2} "${LONG[@]}" ;;
bench) timeout 150 python3 bench/bench_lora.py --engines hf_gc,tsgraph_fit --skip_loss_check --skip_guide \
           --out $L/bench_graphs.json > $L/bench_graphs.log 2>&1; grep -hE "^(hf|ts)" $L/bench_graphs.log ;;
*) echo "unknown part $part" ;;
esac
done
finish workloads
