# Sourced by bench/gpu_smoke.sh and bench/gpu_workloads.sh on the device machine: wheels, the random-weight
# Qwen2.5-7B folder (not with NO_7B=1) and the workload data (bench/workloads.py) under $W, and `sft NAME FLAGS...`, which runs
# the real `tunesmith sft` with the guide's flags plus FLAGS and keeps its output in $OUT/NAME.log.
# W, L: other work folders; MODEL_DIR set: the 7B folder is not built (a script that uses MODEL_DIR, on the CPU).
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=${W:-/tmp/ws}; L=${L:-/tmp/logs}; mkdir -p $W $L  # logs go to $L, and back as one archive (finish)
export RUNS_IN=$W  # where check_run.py finds the run folders the logs name
[ -d .device/wheels ] && python3 -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | grep -v WARNING | tail -1
UNSLOTH_SITE=/tmp/unsloth-site
unsloth_site() {  # Unsloth (baseline_sft.py --engine unsloth) apart in $UNSLOTH_SITE, on that engine's path only,
    # installed at its first use from a carried .whl-unsloth (made by ../shared/peers/fetch_unsloth_wheels.sh)
    [ -f $UNSLOTH_SITE/.done ] && return
    python3 -m pip install -q --no-index --no-deps --no-compile --target $UNSLOTH_SITE $REPO/.whl-unsloth/*.whl \
        > $L/unsloth_site.log 2>&1 || { echo "unsloth: $(tail -1 $L/unsloth_site.log)"; return 1; }
    touch $UNSLOTH_SITE/.done
}
cp examples/self_cognition.json $W/
[ -n "${MODEL_DIR:-}${NO_7B:-}" ] || [ -f $W/Qwen2.5-7B-Instruct/config.json ] || python3 bench/make_qwen7b.py $W/Qwen2.5-7B-Instruct --tokenizer .device/tokenizer
[ -f $W/mixed.jsonl ] || python3 bench/workloads.py $W >/dev/null
GUIDE=(--model Qwen2.5-7B-Instruct --train_type lora --dataset self_cognition.json --torch_dtype bfloat16
       --num_train_epochs 10 --per_device_train_batch_size 1 --per_device_eval_batch_size 1
       --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear
       --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 --save_total_limit 2
       --logging_steps 5 --max_length 2048 --output_dir output --system 'You are a helpful assistant.'
       --warmup_ratio 0.05 --dataloader_num_workers 4 --model_author swift --model_name swift-robot)
MIXED=(--dataset mixed.jsonl self_cognition.json --num_train_epochs 3 --logging_steps 1)
sft() {  # sft NAME FLAGS...: the guide's command with FLAGS after it (later flags win), within SFT_TIMEOUT s if set
    local name=$1; shift
    local t=$(date +%s.%N)
    (cd $W && CUDA_VISIBLE_DEVICES=0 timeout ${SFT_TIMEOUT:-0} python3 -m tunesmith sft "${GUIDE[@]}" "$@") > $L/$name.log 2>&1
    local rc=$?
    cp "$W/$(sed -n 's/^last_model_checkpoint: //p' $L/$name.log | xargs -r dirname)/logging.jsonl" $L/$name.jsonl 2>/dev/null
    echo "$name: exit $rc, $(python3 -c "import time; print(round(time.time() - $t, 1))") s command to adapter"
    return $rc
}
check() { python3 $REPO/bench/check_run.py "$@" || FAILED=1; }
finish() { tar czf $OUT/$1.tgz -C $L . ; }  # finish NAME: every log of this call in $OUT/NAME.tgz
FAILED=0
