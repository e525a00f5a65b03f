#!/usr/bin/env bash
# Issue #6 on the GPU machine: QLoRA, multi-GPU and the memory planner, on the Qwen2.5-7B architecture
# with random (initialised) weights. Results and logs go under $OUT.
#
#   bash bench/gpu_scale.sh                 every part this machine can run (1 GPU: mem qlora; 2+: all)
#   bash bench/gpu_scale.sh mem qlora       planner vs measured peak at 1k-8k tokens (bf16 LoRA, QLoRA) + speed
#   bash bench/gpu_scale.sh ddp fsdp        2 GPUs: 1 vs 2 processes, same global batch; --fsdp runs
#
# Parts: mem (bf16 LoRA, default settings), qlora (the same with --quant_method bnb --quant_bits 4; the
# tokens/s at 2048 of both are the QLoRA-vs-LoRA speed), ddp, fsdp, dry (sft --dry_run on this card).
set -uo pipefail
REPO=$(pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1 TUNESMITH_NO_PROGRESS=1 HF_HUB_OFFLINE=1 TUNESMITH_HOME=/tmp/tshome
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
PARTS=${*:-$([ "$GPUS" -ge 2 ] && echo "dry mem qlora ddp fsdp" || echo "dry mem qlora")}
LENGTHS=${LENGTHS:-1024,2048,4096,8192}
STEPS=${STEPS:-10}
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

python3 -m pip install --no-deps -q .device/wheels/*.whl 2>&1 | tail -1
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, torch.cuda.get_device_name(), 'x', torch.cuda.device_count())"
W=/tmp/scale; mkdir -p $W
M=$W/Qwen2.5-7B-Instruct
[ -f $M/config.json ] || { stamp "building the random-weight 7B folder"; python3 bench/make_qwen7b.py $M --tokenizer .device/tokenizer; }
[ -f $W/data.jsonl ] || python3 bench/scale_bench.py data $W/data.jsonl --records 96 --words 300  # ~900 tokens each

for part in $PARTS; do
case $part in
dry)
  stamp "sft --dry_run on this card (default settings, 2048 and 8192 tokens)"
  python3 -m tunesmith sft --model $M --dry_run true 2>&1 | tee $OUT/dry_run.txt
  python3 -m tunesmith sft --model $M --dry_run true --max_length 8192 2>&1 | tail -3 | tee -a $OUT/dry_run.txt
  ;;
mem)
  stamp "planner vs measured, bf16 LoRA (sft's default settings), lengths $LENGTHS"
  python3 bench/scale_bench.py memory $M --lengths $LENGTHS --steps $STEPS --out $OUT/mem_bf16.json 2>&1 | grep -v Loading
  ;;
qlora)
  stamp "planner vs measured, QLoRA nf4, lengths $LENGTHS"
  python3 bench/scale_bench.py memory $M --quant_bits 4 --lengths $LENGTHS --steps $STEPS --out $OUT/mem_qlora.json 2>&1 | grep -v Loading
  ;;
ddp|fsdp)
  if [ "$GPUS" -lt 2 ]; then echo "part $part needs 2 GPUs (this machine has $GPUS)"; continue; fi
  cd $W
  # the same 8-sample global batch: 1 GPU x accumulation 8, and 2 GPUs x accumulation 4; the same
  # engine on both (CUDA graphs are single-process only, so they are off for this comparison)
  common="--model $M --dataset data.jsonl --max_steps $STEPS --per_device_train_batch_size 1 --lora_dropout 0 \
          --logging_steps 1 --save_steps 1000 --max_length 2048 --torch_dtype bfloat16 --cuda_graphs false"
  if [ ! -f one.log ]; then
    stamp "1 GPU, accumulation 8"
    CUDA_VISIBLE_DEVICES=0 python3 -m tunesmith sft $common --gradient_accumulation_steps 8 --output_dir one 2>&1 | grep -v Loading > one.log; tail -3 one.log
  fi
  if [ $part = ddp ]; then
    stamp "2 GPUs (NPROC_PER_NODE=2, DDP), accumulation 4"
    NPROC_PER_NODE=2 python3 -m tunesmith sft $common --gradient_accumulation_steps 4 --output_dir two 2>&1 | grep -v Loading > two.log; tail -3 two.log
    stamp "2 GPUs through torchrun by hand, accumulation 4"
    python3 -m torch.distributed.run --nproc_per_node 2 -m tunesmith sft $common --gradient_accumulation_steps 4 --output_dir two_torchrun 2>&1 | grep -v Loading > two_torchrun.log; tail -2 two_torchrun.log
    python3 $REPO/bench/scale_bench.py compare one=$(ls -d one/v*) ddp2=$(ls -d two/v*) torchrun2=$(ls -d two_torchrun/v*) | tee $OUT/ddp.txt
    ls two/v*/ two/v*/checkpoint-*/ | tee -a $OUT/ddp.txt
    python3 -c "
import sys, json; from safetensors import safe_open
a, b = (safe_open(p + '/adapter_model.safetensors', 'pt') for p in sys.argv[1:])
same = {k: a.get_slice(k).get_shape() for k in a.keys()} == {k: b.get_slice(k).get_shape() for k in b.keys()}
cfg = [json.load(open(p + '/adapter_config.json')) for p in sys.argv[1:]]
print('adapter files 1 GPU vs 2 GPUs: same tensor names and shapes:', same, '; same adapter_config keys:', cfg[0].keys() == cfg[1].keys())
" $(ls -d one/v*/checkpoint-*) $(ls -d two/v*/checkpoint-*) | tee -a $OUT/ddp.txt
  else
    stamp "2 GPUs with --fsdp true, accumulation 4"
    NPROC_PER_NODE=2 python3 -m tunesmith sft $common --gradient_accumulation_steps 4 --fsdp true --output_dir fsdp 2>&1 | grep -v Loading > fsdp.log; tail -4 fsdp.log
    python3 $REPO/bench/scale_bench.py compare one=$(ls -d one/v*) fsdp2=$(ls -d fsdp/v*) | tee $OUT/fsdp.txt
    CKPT=$(sed -n 's/^last_model_checkpoint: //p' fsdp.log)
    [ -n "$CKPT" ] && python3 -m tunesmith infer --adapters $CKPT --query "你是谁?" --max_new_tokens 8 2>&1 | tail -2 | tee -a $OUT/fsdp.txt
  fi
  cat one.log two.log two_torchrun.log fsdp.log > $OUT/sft_runs.log 2>/dev/null
  cd $REPO
  ;;
*) echo "unknown part $part (dry mem qlora ddp fsdp)";;
esac
done
stamp "summary"
ls $OUT/mem_*.json >/dev/null 2>&1 && python3 bench/scale_bench.py table $OUT/mem_*.json | tee $OUT/summary.txt
for f in ddp fsdp; do [ -f $OUT/$f.txt ] && grep " vs " $OUT/$f.txt | tee -a $OUT/summary.txt; done
