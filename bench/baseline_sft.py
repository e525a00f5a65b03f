"""The baselines for the workload suite: the same training as a `tunesmith sft` command, done the way
ms-swift does it, or by Unsloth, on one GPU.

    python bench/baseline_sft.py --engine swift_default|swift_best|unsloth [--max_steps N] [--max_seconds S] -- SFT_FLAGS...

SFT_FLAGS are the `tunesmith sft` flags of the workload; the samples are tokenized by tunesmith's own
pipeline (same chat template, same answer-only labels) and trained in the same accumulation windows.
- swift_default: transformers + PEFT, gradient checkpointing, batch 1 x accumulation, no packing, SDPA,
  the model's own loss over full logits (ms-swift 3.x defaults);
- swift_best: ms-swift's fastest option, padding-free packing (`--packing true`, a window's samples packed
  into rows of --max_length with per-sample attention; flash attention varlen here through torch's own
  kernel, as flash-attn is not installed) plus Liger's kernels (rms_norm, rope, swiglu, fused linear
  cross-entropy), gradient checkpointing kept;
- unsloth: Unsloth's 16-bit LoRA at its fastest for this data (`FastLanguageModel`, its own gradient
  checkpointing `"unsloth"`, its fused LoRA and cross-entropy kernels), fed the same packed rows as swift_best in
  Unsloth's padding-free form (`packed_seq_lengths`: attention stays inside each sample). Needs the wheels of
  `../shared/peers/fetch_unsloth_wheels.sh` on the path (bench/gpu_common.sh installs `.whl-unsloth` when carried).
sft's AdamW and learning-rate schedule (train.recipe.build_optimizer), so the per-step losses compare with the
run's logging.jsonl. Prints one JSON line: tokens/s over the steps after the first, peak memory, the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
UNSLOTH = "unsloth" in sys.argv[1:sys.argv.index("--") if "--" in sys.argv else None]
if UNSLOTH:  # before transformers and peft, as Unsloth asks; offline, without its usage statistics
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
    try:
        import torchvision.ops  # noqa: F401
    except Exception:  # unsloth_zoo refuses a torchvision whose compiled ops do not load: hide it
        sys.modules["torchvision"] = None
    import unsloth  # noqa: F401

import torch  # noqa: E402

from tunesmith import cli  # noqa: E402
from tunesmith.engine import attention, decoder_layer
from tunesmith.model.load import load_tokenizer  # noqa: E402
from tunesmith.model.resolve import resolve_model
from tunesmith.data.template import IGNORE  # noqa: E402
from tunesmith.data.cache import prepare  # noqa: E402
from tunesmith.train.batches import batch_windows  # noqa: E402
from tunesmith.train.recipe import build_optimizer  # noqa: E402

GiB = 2**30
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to check this script


def rows(samples, packed: bool, max_length: int):
    """Micro-batches of a window: one sample each, or samples packed into rows of max_length."""
    if not packed:
        for s in samples:
            yield [s]
        return
    row, used = [], 0
    for s in samples:
        if row and used + len(s.input_ids) > max_length:
            yield row
            row, used = [], 0
        row.append(s)
        used += len(s.input_ids)
    if row:
        yield row


def batch_of(row):
    ids = torch.tensor([[t for s in row for t in s.input_ids]], device=DEVICE)
    labels = torch.tensor([[x for s in row for x in ([IGNORE] + s.labels[1:])]], device=DEVICE)
    out = {"input_ids": ids, "labels": labels}
    if len(row) > 1:
        lengths = [len(s.input_ids) for s in row]
        out["position_ids"] = torch.tensor([[p for n in lengths for p in range(n)]], device=DEVICE)
        if UNSLOTH:  # Unsloth's padding-free collator adds the lengths (int32, on the host)
            out["packed_seq_lengths"] = torch.tensor(lengths, dtype=torch.int32)
    return out


def load_unsloth(path, args):
    """Unsloth's model and LoRA with the run's rank, alpha, dropout and seed; its own checkpointing, or none with
    UNSLOTH_GC=0 (faster where the memory is there)."""
    from unsloth import FastLanguageModel

    checkpointing = "unsloth" if os.environ.get("UNSLOTH_GC", "1") != "0" else False

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(path), max_seq_length=args.max_length, dtype=torch.bfloat16, load_in_4bit=False,
        load_in_8bit=False, load_in_16bit=True, full_finetuning=False, use_gradient_checkpointing=checkpointing,
        local_files_only=True)
    return FastLanguageModel.get_peft_model(
        model, r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
        target_modules=list(decoder_layer.PROJECTIONS),  # all-linear, named: Unsloth takes names
        use_gradient_checkpointing=checkpointing, random_state=args.seed)


def load_transformers(path, args, best: bool):
    """transformers + PEFT with gradient checkpointing; best: Liger's kernels and per-sample attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": DEVICE})
    if best and DEVICE == "cuda":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        kernels = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)
        try:
            _apply_liger_kernel_to_instance(model=model, **kernels)
        except NotImplementedError as e:  # (GLM-4: Liger has no kernel for its interleaved partial RoPE)
            print(f"Liger without rope: {e}", file=sys.stderr)
            _apply_liger_kernel_to_instance(model=model, **dict(kernels, rope=False))
    if best:
        attention.use_document_attention(model)  # per-sample attention over the packed row
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["swift_default", "swift_best", "unsloth"], required=True)
    ap.add_argument("--max_steps", type=int, default=30)
    ap.add_argument("--max_seconds", type=float, default=None,
                    help="stop after the step that passes this many seconds; the rate is over the steps done")
    ap.add_argument("flags", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if UNSLOTH != (a.engine == "unsloth"):  # UNSLOTH was read from argv before argparse, to import Unsloth first
        sys.exit(f"baseline_sft: --engine {a.engine}, but the command line was read as {'' if UNSLOTH else 'not '}"
                 "asking for unsloth; give --engine ENGINE as two words before --")
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    args = cli.parse_args("sft", flags)
    resolved = resolve_model(args.model)
    tok = load_tokenizer(resolved.path)
    data = prepare(args, tok, resolved.path).train
    accumulation = args.effective_accumulation(1)
    best = a.engine != "swift_default"  # packed rows
    model = load_unsloth(resolved.path, args) if UNSLOTH else load_transformers(resolved.path, args, best)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = build_optimizer(model, args, a.max_steps)  # sft's AdamW and learning-rate schedule
    model.train()
    windows = batch_windows(len(data), args.per_device_train_batch_size, accumulation, args.seed)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, t_first, losses, error = 0, None, [], None
    try:
        for step in range(1, a.max_steps + 1):
            _, window = next(windows)
            samples = [data[i] for i in window]
            n_target = sum(s.n_trained for s in samples)
            total = 0.0
            for row in rows(samples, best, args.max_length):
                batch = batch_of(row)
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                out = model(**batch, use_cache=False)  # mean over the row's answer tokens: re-weighted to the window's
                (out.loss * n / n_target).backward()
                total += out.loss.detach().item() * n / n_target
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if step == 1:
                t_first = time.time()
            else:
                tokens += sum(len(s.input_ids) for s in samples)
                if a.max_seconds and time.time() - t_first > a.max_seconds:
                    break
    except torch.cuda.OutOfMemoryError:
        error = "out of memory"
    seconds = time.time() - t_first if t_first else 0.0
    print(json.dumps({"engine": a.engine, "steps": len(losses), "tokens_per_s": round(tokens / seconds, 1) if tokens else None,
                      "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if DEVICE == "cuda" else None,
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2) if DEVICE == "cuda" else None,
                      "final_loss": round(losses[-1], 4) if losses else None, "error": error,
                      "losses": [round(x, 5) for x in losses]}), flush=True)


if __name__ == "__main__":
    main()
