#!/usr/bin/env bash
# Start-up: from the command to the first optimizer step on a 7B model in local safetensors files,
# against the time to read those files. Then the guide's sft on it. Run on the device machine.
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
W=/tmp/startup; mkdir -p $W; cp examples/self_cognition.json $W/
if [ -f /tmp/scale/Qwen2.5-7B-Instruct/config.json ]; then ln -sfn /tmp/scale/Qwen2.5-7B-Instruct $W/Qwen2.5-7B-Instruct
elif [ ! -d $W/Qwen2.5-7B-Instruct ]; then python3 bench/make_qwen7b.py $W/Qwen2.5-7B-Instruct --tokenizer .device/tokenizer; fi
cd $W
sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "page cache dropped" || echo "page cache NOT dropped (files may be cached)"
echo "== reading the weights: cat *.safetensors > /dev/null"
/usr/bin/time -f "read %e s" cat Qwen2.5-7B-Instruct/*.safetensors > /dev/null
/usr/bin/time -f "read again (cached) %e s" cat Qwen2.5-7B-Instruct/*.safetensors > /dev/null
echo "== tunesmith sft to the first step"
python3 -m tunesmith sft --model Qwen2.5-7B-Instruct --dataset self_cognition.json --max_steps 1 --output_dir o1 2>&1 | grep "first optimizer"
echo "== the guide's sft (GA 16, 10 epochs)"
python3 -m tunesmith sft --model Qwen2.5-7B-Instruct --train_type lora --dataset self_cognition.json --torch_dtype bfloat16 \
    --num_train_epochs 10 --per_device_train_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 \
    --target_modules all-linear --gradient_accumulation_steps 16 --logging_steps 5 --max_length 2048 --output_dir output \
    --system 'You are a helpful assistant.' --warmup_ratio 0.05 2>&1 | grep -v Loading | tail -6
