#!/usr/bin/env bash
# The guide ("first fine-tune of Qwen2.5-7B in ten minutes"), on the offline default model.
# 1. the base model answers  2. a LoRA adapter learns a new identity, in Chinese and English
# 3. base and tuned answers side by side, and the general knowledge kept.
set -euo pipefail
cd "$(dirname "$0")"
QUESTIONS=("你是谁?" "请介绍一下你自己" "谁在维护你?" "中国的首都是哪里?" "Who are you?")

ask() {  # ask QUESTIONS with the given infer flags; print question | answer pairs
    local args=() answers
    for q in "${QUESTIONS[@]}"; do args+=(--query "$q"); done
    mapfile -t answers < <(tunesmith infer "$@" --temperature 0 --max_new_tokens 64 --stream false "${args[@]}" | tr -s '\n')
    for i in "${!QUESTIONS[@]}"; do printf '  %s\n    -> %s\n' "${QUESTIONS[$i]}" "${answers[$i]:-}"; done
}

echo "== before tuning =="
ask  # no --system: the model's own default, as in the guide
mkdir -p output

echo "== tuning on the guide's 8 self-cognition records and 8 English ones of ours, held to the base elsewhere =="
tunesmith sft \
    --train_type lora \
    --dataset self_cognition.json 'self-cognition:en#8' \
    --torch_dtype bfloat16 \
    --num_train_epochs 5 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-4 \
    --lora_rank 8 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --logging_steps 5 \
    --max_length 2048 \
    --output_dir output \
    --system 'You are a helpful assistant.' \
    --keep_kl 1 \
    --model_author 'CSDN 迪菲赫尔曼' \
    --model_name Swift-Robot | tee output/.last_run

CKPT=$(sed -n 's/^last_model_checkpoint: //p' output/.last_run)
echo "== before / after tuning ($CKPT): the guide's section 4.2 table =="
tunesmith eval --adapters "$CKPT" --expect 迪菲赫尔曼 --max_new_tokens 64
