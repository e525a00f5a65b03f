#!/usr/bin/env bash
# The guide's GPU commands, verbatim but for `swift` -> `tunesmith`, on a random-weight
# Qwen2.5-7B-Instruct folder (no hub on the GPU machines). Run on the device machine:
#   bash bench/gpu_guide.sh      (logs under $OUT; reuses bench/gpu_scale.sh's 7B folder if present)
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | tail -1
W=/tmp/guide; mkdir -p $W; cp examples/self_cognition.json $W/
if [ -f /tmp/scale/Qwen2.5-7B-Instruct/config.json ]; then ln -sfn /tmp/scale/Qwen2.5-7B-Instruct $W/Qwen2.5-7B-Instruct
elif [ ! -d $W/Qwen2.5-7B-Instruct ]; then python3 bench/make_qwen7b.py $W/Qwen2.5-7B-Instruct --tokenizer .device/tokenizer; fi
cd $W
guide_sft() {
CUDA_VISIBLE_DEVICES=0 python3 -m tunesmith sft \
    --model Qwen2.5-7B-Instruct --train_type lora --dataset self_cognition.json --torch_dtype bfloat16 \
    --num_train_epochs 10 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 \
    --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 --save_total_limit 2 \
    --logging_steps 5 --max_length 2048 --output_dir output --system 'You are a helpful assistant.' \
    --warmup_ratio 0.05 --dataloader_num_workers 4 --model_author swift --model_name swift-robot "$@"
}
echo "== swift sft, as in the guide (packed accumulation windows, CUDA graphs)"
time guide_sft 2>&1 | tee $OUT/guide_sft.log | grep -v Loading
CKPT=$(sed -n 's/^last_model_checkpoint: //p' $OUT/guide_sft.log)
cat $(dirname $CKPT)/logging.jsonl > $OUT/guide_logging.jsonl
echo "== swift infer --adapters"
time (python3 -m tunesmith infer --adapters $CKPT --stream true --temperature 0 --max_new_tokens 20 --query "你是谁?") 2>&1 | tail -4
echo "== same sft without CUDA graphs"
time guide_sft --cuda_graphs false 2>&1 | tee $OUT/guide_sft_nographs.log | grep -v Loading | tail -4
echo "== same sft, batch by batch (--packing_window false)"
time guide_sft --packing_window false 2>&1 | tee $OUT/guide_sft_nopack.log | grep -v Loading | tail -3
