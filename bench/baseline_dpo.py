"""The baseline for `tunesmith rlhf --rlhf_type dpo`: TRL's DPOTrainer with a PEFT LoRA, on one GPU.

    python bench/baseline_dpo.py --model PATH --data pairs.jsonl [--max_steps N] [--batch 2] [--max_length 2048]

pairs.jsonl holds TRL's conversational records ({"prompt": [messages], "chosen": [assistant turn],
"rejected": [assistant turn]}), the same file `tunesmith rlhf` trains on. As the guide: LoRA r 8, alpha 32 on
every linear layer, bf16, gradient checkpointing; the reference is the base model with the adapter off (TRL's
default for a PEFT model, as ours without --adapters). Tokens are counted as ours counts them (logging.jsonl's
tokens/s): prompt + chosen plus prompt + rejected of every pair, no padding.
Prints one JSON line: tokens/s over the steps after the first, peak memory, final loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

GiB = 2**30
CUDA = torch.cuda.is_available()  # the CPU only to check this script


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max_steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2, help="pairs per optimizer step (no accumulation)")
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--learning_rate", type=float, default=1e-4)
    a = ap.parse_args()

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokens, marks = [0], []  # tokens of the current step; (time, tokens) at the end of each step

    class Counting(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            tokens[0] += int(inputs["attention_mask"].sum())  # chosen rows + rejected rows, prompt in each
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if CUDA:
                torch.cuda.synchronize()
            marks.append((time.time(), tokens[0]))
            tokens[0] = 0

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = DPOConfig(output_dir="/tmp/baseline_dpo", per_device_train_batch_size=a.batch,
                       gradient_accumulation_steps=1, max_steps=a.max_steps, learning_rate=a.learning_rate,
                       lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
                       bf16=CUDA, use_cpu=not CUDA, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=a.max_length, beta=0.1,
                       dataloader_num_workers=0, seed=42, disable_tqdm=True)
    peft = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=config, train_dataset=load_dataset("json", data_files=a.data, split="train"),
                       processing_class=tok, peft_config=peft, callbacks=[Timing()])
    trainer.remove_callback(PrinterCallback)  # stdout: the one JSON line
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError:
        error = "out of memory"
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    rate = None
    if len(marks) > 1:  # the first step holds the start-up (and compiles): the rate is over the rest
        rate = round(sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0]), 1)
    print(json.dumps({"engine": "trl_dpo", "steps": len(marks), "tokens_per_s": rate,
                      "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if CUDA else None,
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if CUDA else None,
                      "final_loss": round(losses[-1], 4) if losses else None, "error": error}), flush=True)


if __name__ == "__main__":
    main()
