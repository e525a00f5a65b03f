#!/usr/bin/env bash
# After examples/guide.sh: DPO on top of its SFT adapter, preferring the new identity over the base model's own answer.
# 1. the base model's own answers to the guide's questions  2. pairs: chosen the guide's answer, rejected the base's
# 3. tunesmith rlhf from the SFT checkpoint (the reference: that same adapter, frozen)  4. the before/after table.
set -euo pipefail
cd "$(dirname "$0")"
CKPT=${1:-$(sed -n 's/^last_model_checkpoint: //p' output/.last_run)}
python3 -c 'import json; print("\n".join(r["instruction"] for r in json.load(open("self_cognition.json"))))' > output/questions.txt

echo "== the base model's own answers (the rejected ones) =="
tunesmith eval --adapters "$CKPT" --questions output/questions.txt --max_new_tokens 64 --output_dir output/base-answers > /dev/null
python3 - <<'PY'
import json
base = {r["question"]: r["base"] for r in json.load(open("output/base-answers/eval.json"))["rows"]}
with open("output/identity_pairs.jsonl", "w") as f:
    for r in json.load(open("self_cognition.json")):
        q = r["instruction"]
        pair = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r["output"]}],
                "rejected_response": base[q]}
        f.write(json.dumps(pair, ensure_ascii=False) + "\n")
print(open("output/identity_pairs.jsonl").readline().strip())
PY

echo "== DPO from the SFT checkpoint $CKPT =="
tunesmith rlhf --rlhf_type dpo --adapters "$CKPT" --dataset output/identity_pairs.jsonl \
    --num_train_epochs 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
    --learning_rate 1e-4 --logging_steps 4 --output_dir output/dpo | tee output/.last_dpo

DPO=$(sed -n 's/^last_model_checkpoint: //p' output/.last_dpo)
echo "== before / after SFT + DPO ($DPO) =="
tunesmith eval --adapters "$DPO" --expect 迪菲赫尔曼 --max_new_tokens 64
