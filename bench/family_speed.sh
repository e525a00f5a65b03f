#!/usr/bin/env bash
# Issue 17's speed check on the device, one family after another (FAMILIES, default qwen3 llama gemma3_text phi3):
# the real `tunesmith sft` (default flags: the lean decoder layers where the family takes them) against
# transformers + PEFT with ms-swift's best option (packing + Liger, bench/baseline_sft.py), in the same call, on the
# mixed workload's data and a random-weight 8B-class folder of the family (bench/make_qwen7b.py: Qwen3-8B,
# Llama-3.1-8B, Gemma-3-12B, Phi-4-mini; glm4: GLM-4-9B-0414; qwen3_moe: Qwen3-30B-A3B) with FAMILY_LAYERS layers (default 12; per-layer figures scale), STEPS
# optimizer steps each, with sft's schedule on both sides so that the per-step losses compare; with GC=1 ours runs a second time with --gradient_checkpointing true (the memory-matched
# mode: every layer checkpointed, as the baseline); on an MoE family, with PEFT_EXPERTS=1 ours runs once more with
# PEFT's own expert forward (TUNESMITH_PEFT_EXPERTS=1: LoRA merged into the experts' weights, as before
# engine/moe_lora.py); NO_BASELINE=1 skips transformers + PEFT, BASELINE_SECONDS=N stops it after the step that passes N s
# (on Qwen3-30B-A3B it did not finish 10 steps in 200 s): its rate is over the steps it made.
#   NO_7B=1 GC=1 FAMILIES='phi3 qwen3' bash bench/family_speed.sh      (alone, or after bench/gpu_smoke.sh in the same call, which builds the data; logs under $OUT)
source "$(dirname "$0")/gpu_common.sh"
STEPS=${STEPS:-30}
for fam in ${FAMILIES:-qwen3 llama gemma3_text phi3}; do
    F=$W/family-$fam
    [ -f $F/config.json ] || python3 bench/make_qwen7b.py $F --tokenizer .device/tokenizer --family $fam \
        --layers ${FAMILY_LAYERS:-12} >/dev/null
    X=(); [[ $fam == *moe ]] && X=(--lora_dropout 0)  # (PEFT adapts the experts' 3-D weights without dropout)
    sft $fam "${MIXED[@]}" --model family-$fam --max_steps $STEPS "${X[@]}"; python3 bench/check_run.py summary $fam $L/$fam.log
    grep -h "fast path\|memory plan" $L/$fam.log | cut -c1-300
    if [ -n "${GC:-}" ]; then
        sft $fam-gc "${MIXED[@]}" --model family-$fam --max_steps $STEPS --gradient_checkpointing true "${X[@]}"
        python3 bench/check_run.py summary $fam-gc $L/$fam-gc.log
    fi
    if [ -n "${PEFT_EXPERTS:-}" ] && [[ $fam == *moe ]]; then
        TUNESMITH_PEFT_EXPERTS=1 sft $fam-peft "${MIXED[@]}" --model family-$fam --max_steps $STEPS "${X[@]}"
        python3 bench/check_run.py summary $fam-peft $L/$fam-peft.log
        python3 bench/check_run.py same $L/$fam.log $L/$fam-peft.log 0.02
    fi
    [ -n "${NO_BASELINE:-}" ] && { rm -rf $F; continue; }
    (cd $W && timeout 300 python3 $REPO/bench/baseline_sft.py --engine swift_best --max_steps $STEPS \
        ${BASELINE_SECONDS:+--max_seconds $BASELINE_SECONDS} -- "${GUIDE[@]}" \
        "${MIXED[@]}" --model family-$fam "${X[@]}" 2>$L/baseline_$fam.err >$L/baseline_$fam.json) || tail -3 $L/baseline_$fam.err
    sed 's/, "losses": .*/}/' $L/baseline_$fam.json; python3 bench/check_run.py versus $L/$fam.log $L/baseline_$fam.json
    rm -rf $F  # (disk)
done
finish family
