#!/usr/bin/env bash
# Start-up: from the command to the first optimizer step on a 7B model in local safetensors files,
# against the time to read those files (page cache dropped before each). Run on the device machine.
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
W=/tmp/startup; mkdir -p $W; cp examples/self_cognition.json $W/
if [ -f /tmp/scale/Qwen2.5-7B-Instruct/config.json ]; then ln -sfn /tmp/scale/Qwen2.5-7B-Instruct $W/Qwen2.5-7B-Instruct
elif [ ! -d $W/Qwen2.5-7B-Instruct ]; then python3 bench/make_qwen7b.py $W/Qwen2.5-7B-Instruct --tokenizer .device/tokenizer; fi
cd $W
drop() { sync; (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null && echo "(page cache dropped)" || echo "(page cache NOT dropped: files may be cached)"; }
echo "== reading the weights: cat *.safetensors > /dev/null"
drop; /usr/bin/time -f "read (cold) %e s" cat Qwen2.5-7B-Instruct/*.safetensors > /dev/null
/usr/bin/time -f "read again (cached) %e s" cat Qwen2.5-7B-Instruct/*.safetensors > /dev/null
echo "== tunesmith sft to the first step: cold, with the weights prefetched during the imports; cold without; cached"
drop; python3 -m tunesmith sft --model Qwen2.5-7B-Instruct --dataset self_cognition.json --max_steps 1 --output_dir o1 2>&1 | grep "first optimizer"
drop; TUNESMITH_NO_PREFETCH=1 python3 -m tunesmith sft --model Qwen2.5-7B-Instruct --dataset self_cognition.json --max_steps 1 --output_dir o2 2>&1 | grep "first optimizer"
python3 -m tunesmith sft --model Qwen2.5-7B-Instruct --dataset self_cognition.json --max_steps 1 --output_dir o3 2>&1 | grep "first optimizer"
