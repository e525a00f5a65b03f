#!/usr/bin/env bash
# Issue 20's speed check: the real `tunesmith rlhf --rlhf_type dpo` (the guide's model and LoRA flags) against TRL's
# DPOTrainer with a PEFT LoRA (bench/baseline_dpo.py), in the same call, on the same preference pairs
# (bench/workloads.py's pairs.jsonl: alpaca-shaped prompts, answers of ~100-600 tokens), STEPS optimizer steps of
# BATCH pairs each (GC="true 0.85": ours once more for each value, with --gradient_checkpointing VALUE; true, or 1,
# every layer recomputed as TRL does, is the memory-matched mode). Target: ours at least 2.5x TRL's tokens/s at no
# more peak memory (reserved).
#   bash bench/rlhf_speed.sh                                  (the device: random-weight Qwen2.5-7B; logs under $OUT)
#   MODEL_DIR=/path/tiny STEPS=3 W=/tmp/x L=/tmp/y bash bench/rlhf_speed.sh    (the CPU: that the script runs)
source "$(dirname "$0")/gpu_common.sh"
MODEL=${MODEL_DIR:-$W/Qwen2.5-7B-Instruct}; STEPS=${STEPS:-30}; BATCH=${BATCH:-2}
[ -f $W/pairs.jsonl ] || python3 bench/workloads.py $W >/dev/null
RLHF=(--model "$MODEL" --train_type lora --torch_dtype bfloat16 --lora_rank 8 --lora_alpha 32 --target_modules all-linear
      --learning_rate 1e-4 --max_length 2048 --dataset pairs.jsonl --per_device_train_batch_size $BATCH
      --gradient_accumulation_steps 1 --max_steps $STEPS --logging_steps 1 --save_steps $STEPS --output_dir output)
(cd $W && CUDA_VISIBLE_DEVICES=0 python3 -m tunesmith rlhf --rlhf_type dpo "${RLHF[@]}") > $L/rlhf_dpo.log 2>&1 \
    || { tail -5 $L/rlhf_dpo.log; FAILED=1; }
check summary rlhf_dpo $L/rlhf_dpo.log
for g in ${GC:-}; do  # (GC=1: as before, every layer)
    (cd $W && CUDA_VISIBLE_DEVICES=0 python3 -m tunesmith rlhf --rlhf_type dpo "${RLHF[@]}" --output_dir output-gc$g \
        --gradient_checkpointing $g) > $L/rlhf_dpo_gc$g.log 2>&1 || { tail -5 $L/rlhf_dpo_gc$g.log; FAILED=1; }
    check summary rlhf_dpo_gc$g $L/rlhf_dpo_gc$g.log
done
(cd $W && CUDA_VISIBLE_DEVICES=0 timeout 600 python3 $REPO/bench/baseline_dpo.py --model "$MODEL" --data pairs.jsonl \
    --max_steps $STEPS --batch $BATCH 2>$L/baseline_dpo.err) || { tail -5 $L/baseline_dpo.err; FAILED=1; }
finish rlhf
exit $FAILED
