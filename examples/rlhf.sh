#!/usr/bin/env bash
# After examples/guide.sh: DPO on top of its SFT adapter, preferring the new identity over the base model's own answers.
# 1. tunesmith rlhf from the SFT checkpoint on the built-in identity pairs (self-cognition-dpo: chosen the new
#    identity, rejected what the base model answers, generated once and cached); the reference: that adapter, frozen
# 2. the before/after table.
set -euo pipefail
cd "$(dirname "$0")"
CKPT=${1:-$(sed -n 's/^last_model_checkpoint: //p' output/.last_run)}

# beta 1: a pair ~5 nats apart is hardly pushed further (the loss's weight is sigmoid(-5) < 1%); rpo_alpha 1 (NLL on
# the chosen answers) keeps them likely. At beta 0.1 and no NLL term DPO won its margin by pushing both answers
# down, and lost the identity.
echo "== DPO from the SFT checkpoint $CKPT =="
tunesmith rlhf --rlhf_type dpo --adapters "$CKPT" --dataset self-cognition-dpo \
    --model_name Swift-Robot --model_author 'CSDN 迪菲赫尔曼' \
    --beta 1 --rpo_alpha 1 --learning_rate 2e-5 \
    --num_train_epochs 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 \
    --logging_steps 9 --output_dir output/dpo | tee output/.last_dpo

DPO=$(sed -n 's/^last_model_checkpoint: //p' output/.last_dpo)
echo "== before / after SFT + DPO ($DPO) =="
tunesmith eval --adapters "$DPO" --expect 迪菲赫尔曼 --max_new_tokens 64
