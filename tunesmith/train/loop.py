"""`tunesmith sft`: the LoRA training recipe, top to bottom.

    run()      check the inputs, build the pieces (data, model, optimizer), then fit()
    fit()      the loop: for each optimizer step, forward+backward over one accumulation
               window, clip, step, log, validate, save

Resuming (resume.py) restores the pieces before fit(); fit() then starts after the checkpoint's step.
Ctrl-C/SIGTERM and NaN/inf steps are handled by the small guards in guards.py.

The update follows ms-swift/transformers semantics: the loss of one optimizer step is the mean
over all answer tokens of its accumulation window. With --packing_window (default) the whole
window runs as one padding-free packed sequence: the same update, far fewer, larger matmuls.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from . import distributed, planner, resume
from ..engine import fast, cuda_graphs, decoder_layer, lora_linear
from ..args import SftArguments, args_dict, save_args
from .checkpoint import new_run_dir, save_checkpoint
from ..data.sources import check_local
from ..errors import UserError
from .stopping import NonFinite, StopSignals
from ..model.load import load_config, load_model, load_tokenizer, log, pick_device, pick_dtype, resolve_model
from ..data.template import IGNORE, ChatTemplate, Encoded
from ..data.cache import prepare

MIN_USEFUL_STEPS = 30  # below this an identity/style fine-tune at lr 1e-4 rarely takes (see run_plan)


def run(args: SftArguments) -> int:
    t_start = time.time()
    marks = {"launch": _process_start(), "start": t_start}
    par = distributed.setup(args)  # one process, or one of several under torchrun
    if args.dry_run:
        return planner.dry_run(args, par.world)
    # 1. Model files and tokenizer (fast), then the data, read and tokenized once and cached on disk:
    #    data problems surface before the weights load. Missing files are caught first of all.
    check_local(args.dataset + args.val_dataset)
    marks["data"] = time.time()
    resolved = resolve_model(args.model)
    args.model = resolved.name  # args.json names the exact base, so infer/export find it again
    load_config(resolved.path)
    tok = load_tokenizer(resolved.path)
    template = ChatTemplate(tok, args.system)
    with par.main_first():  # rank 0 tokenizes and caches, the others read its cache
        data = prepare(args, tok, resolved.path)
    for line in data.report:
        log(line)
    train_set, val_set, stats = data.train, data.val, data.stats
    if args.eval_steps is not None and not len(val_set):
        log("warning: --eval_steps is set but there is no validation data, so nothing will be evaluated; "
            "add --split_dataset_ratio 0.1 or --val_dataset FILE")
    if stats["too_long"]:
        what = "dropped" if args.truncation_strategy == "delete" else "truncated"
        log(f"{stats['too_long']} samples are longer than --max_length {args.max_length} tokens: {what} "
            "(--truncation_strategy delete|right|left)")
    if stats["no_loss"]:
        log(f"{stats['no_loss']} samples have no answer tokens left to train on and were skipped")
    if not train_set:
        raise UserError("no training samples left after tokenization (see the lines above)")
    marks["tokenized"] = time.time()
    plan = run_plan(args, len(train_set), par.world)
    for line in plan["messages"]:
        log(line)
    fingerprint = resume.data_fingerprint(train_set)
    ckpt = resume.find_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    state = resume.check_same_run(ckpt, args, fingerprint, par.world) if ckpt else None
    longest_row = _longest_row(train_set, args, plan["accumulation"])
    device = par.device(args.device)
    planner.check_fits(args, resolved.path, longest_row, device, par.world)  # before any weights load

    # 2. Model with LoRA, optimizer, schedule, run folder.
    torch = _seed_everything(args.seed)
    dtype = pick_dtype(args.torch_dtype, device)
    if par.fsdp and args.gradient_checkpointing is None:  # memory is planned per shard: recompute everything
        args.gradient_checkpointing = 1.0
    model = load_model(resolved.path, dtype, "cpu" if par.fsdp else device, args.quant_bits)  # FSDP: shards move
    marks["loaded"] = time.time()
    model = prepare_model(model, args, device, longest_row=longest_row)
    forward = par.wrap(model, loss_of, device)  # DDP / FSDP2 under torchrun; plain loss_of otherwise
    graphed = None
    if args.cuda_graphs and not par.active and cuda_graphs.usable(model, device):
        graphed = cuda_graphs.GraphedRows(model, forward)
    optimizer, scheduler = build_optimizer(model, args, plan["max_steps"])
    run_dir = None
    if ckpt:
        resume.restore(ckpt, model, optimizer, scheduler)
        state.update(checkpoint=ckpt, data_fingerprint=fingerprint)
        if par.main:
            run_dir = resume.continue_in(ckpt, args.output_dir, state["global_step"])
            if not (run_dir / "args.json").exists():  # a new run folder under another --output_dir
                save_args(args, run_dir / "args.json")
            log(f"resuming from {ckpt} at step {state['global_step']} of {plan['max_steps']}; run folder: {run_dir}")
    else:
        state = {"global_step": 0, "log_history": [], "data_fingerprint": fingerprint}
        if par.main:
            run_dir = new_run_dir(args.output_dir)
            save_args(args, run_dir / "args.json")
            log(f"run folder: {run_dir}")
    run_dir = Path(par.broadcast(str(run_dir) if par.main else None))  # rank 0 alone writes it
    marks["ready"] = time.time()

    try:
        last = fit(model, tok, template, train_set, val_set, optimizer, scheduler, args, plan, run_dir, device,
                   resolved.name, marks, state, par=par, forward=forward, graphed=graphed)
    except OSError as e:  # a full disk or a folder that became read-only: say so, point at what is intact
        raise resume.write_failed(e, run_dir) from None
    if last.get("stopped_by"):
        log(f"stopped after step {last['step']} of {plan['max_steps']}; checkpoint: {last['checkpoint']}")
        log(f"continue with: {resume.resume_command(last['checkpoint'])}")
        return last["stopped_by"]
    if graphed and graphed.graphs:
        log(graphed.report())
    log(f"done in {time.time() - t_start:.0f} s (training {last['train_runtime']:.0f} s)")
    if par.main:
        print(f"last_model_checkpoint: {last['checkpoint']}", flush=True)
    return 0


def run_plan(args: SftArguments, n_samples: int, world: int = 1) -> dict:
    """How many optimizer steps this run makes, and a warning when that is too few to learn from.
    With several processes each optimizer step takes batch x accumulation samples from each of them."""
    accumulation = args.effective_accumulation(world)
    batches_per_epoch = math.ceil(n_samples / (args.per_device_train_batch_size * world))
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)  # a short last window still steps
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    per_step = min(n_samples, args.per_device_train_batch_size * accumulation * world)
    gpus = f" x {world} processes" if world > 1 else ""
    msgs = [f"{n_samples} training samples, {per_step} per optimizer step "
            f"(batch {args.per_device_train_batch_size} x accumulation {accumulation}{gpus}): "
            f"{steps_per_epoch} step(s) per epoch, {max_steps} optimizer steps in all"]
    if max_steps < MIN_USEFUL_STEPS:
        fix = max(1, math.floor(batches_per_epoch * args.num_train_epochs / MIN_USEFUL_STEPS))
        better = math.ceil(batches_per_epoch / min(fix, accumulation)) * args.num_train_epochs
        msgs.append(
            f"warning: {max_steps} optimizer steps are usually too few to teach the model anything at "
            f"--learning_rate {args.learning_rate:g} (ms-swift's run of the guide with these settings still "
            f"answered as before). Use --gradient_accumulation_steps {min(fix, accumulation)} ({better:.0f} steps) "
            "or more --num_train_epochs."
        )
    return {"accumulation": accumulation, "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "messages": msgs}


def prepare_model(model, args: SftArguments, device: str, longest_row: int | None = None,
                  memory_budget: int | None = None):
    """Fast-path switches (see fast.py), LoRA, and recompute/checkpointing where memory needs it."""
    notes = []
    if args.packing_window:
        fast.use_document_attention(model)
        notes.append("packed windows with per-sample attention")
    layers = fast.decoder_layers(model)
    lean_layers = planner.lean_layers_apply(args, getattr(model.config, "model_type", "")) and all(
        decoder_layer.supported(layer) for layer in layers)
    if device.startswith("cuda") and args.use_liger and not lean_layers:  # lean layers bring their own
        kernels = fast.apply_liger(model, swiglu=not args.lean_lora)  # the lean MLP fuses its own SwiGLU
        notes += [f"Liger {'/'.join(kernels)}"] if kernels else []
    model = add_lora(model, args)
    lean = False
    if args.lean_lora:
        n = lora_linear.use_lean_lora(model)
        notes += [f"lean LoRA on {n} projections"] if n else []
        lean = lora_linear.all_lean(model)
        lean_layers = lean_layers and decoder_layer.use_lean_layers(model)
        notes += [f"lean decoder layers ({lean_layers})"] if lean_layers else []
    levels = [0] * len(layers)  # recompute levels of the lean layers (plan_memory's, where memory is short)
    share = args.gradient_checkpointing
    if share is None:  # only where memory requires it
        reserve = planner.loss_bytes(model.config.vocab_size, model.config.hidden_size, longest_row or 0, 2)
        if not device.startswith("cuda"):
            share = 0.0
        elif lean_layers and lean_layers == len(layers):
            levels, k = fast.plan_memory(model, longest_row, reserve=reserve, budget=memory_budget)
            share = k / len(layers)
            if any(levels):
                notes.append(f"up recomputed in {sum(lv >= 1 for lv in levels)} layers, gate in "
                             f"{sum(lv == 2 for lv in levels)}")
        else:
            liger = any("Liger" in n for n in notes)
            share = fast.plan_checkpointing(model, longest_row, liger, lean, reserve=reserve, budget=memory_budget)
    for layer, level in zip(layers, levels):
        layer._tunesmith_recompute = level
    n = fast.checkpoint_layers(model, float(share), preserve_rng=not lean)
    notes.append(f"activation checkpointing on {n} layers" if n else "no activation checkpointing")
    log("fast path: " + ", ".join(notes))
    return model


def _longest_row(train_set, args: SftArguments, accumulation: int) -> int:
    """Tokens in the largest forward pass: a packed window (capped at its row budget) or a micro-batch."""
    lengths = sorted((len(s.input_ids) for s in train_set), reverse=True)
    if args.packing_window:
        budget = max(args.max_length, args.per_device_train_batch_size * args.max_length)
        return min(budget, sum(lengths[: args.per_device_train_batch_size * accumulation]))
    return args.per_device_train_batch_size * lengths[0]


def add_lora(model, args: SftArguments):
    from peft import LoraConfig, get_peft_model

    targets = args.target_modules
    target = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"--target_modules {' '.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA r={args.lora_rank} alpha={args.lora_alpha} on {target}: {trainable / 1e6:.2f}M trainable "
        f"parameters ({100 * trainable / total:.2f}% of {total / 1e6:.0f}M)")
    return model


def build_optimizer(model, args: SftArguments, max_steps: int):
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=all(p.is_cuda for p in decay + no_decay) or None,  # one kernel for all parameters on CUDA
    )
    warmup = math.ceil(args.warmup_ratio * max_steps)

    def lr_factor(step: int) -> float:  # transformers' schedules: linear warmup, then decay to 0
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, max_steps - warmup)
        if args.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if args.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


# ---------------------------------------------------------------------------------------------
# The loop


def fit(model, tok, template, train_set, val_set, optimizer, scheduler, args, plan, run_dir, device, model_name,
        marks=None, state=None, par=None, forward=None, graphed=None) -> dict:
    """Train from step state["global_step"] + 1 (0 for a new run) to max_steps.
    `par` (distributed.py): this process's part of each window; `forward`: batch -> summed loss;
    `graphed` (cuda_graphs.py): replays each packed row from a CUDA graph where it can."""
    from tqdm import tqdm

    par = par or distributed.Parallel()
    forward = forward or (lambda batch: loss_of(model, batch))
    max_steps, accumulation = plan["max_steps"], plan["accumulation"]
    state = state or {"global_step": 0, "log_history": []}
    done = state["global_step"]
    windows = itertools.islice(  # a resumed run skips the windows it already trained on
        batch_windows(len(train_set), args.per_device_train_batch_size, accumulation * par.world, args.seed), done, None)
    eval_steps = args.eval_steps or args.save_steps
    log_path = run_dir / "logging.jsonl" if par.main else None  # rank 0 alone writes
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if par.main else (lambda msg: None)
    history = state["log_history"]
    pending = state.get("pending") or {"loss": [], "tokens": 0, "grad_norm": []}
    last_ckpt = state.get("checkpoint")
    nonfinite = NonFinite(args.max_nonfinite_steps)
    t0 = time.time() - state.get("elapsed", 0.0)
    bar = tqdm(total=max_steps, initial=done, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=os.environ.get("TUNESMITH_NO_PROGRESS") == "1" or not par.main)
    model.train()
    with StopSignals() as stop:
        for step in range(done + 1, max_steps + 1):
            epoch, window = next(windows)
            whole = [train_set[i] for i in window]
            n_target = sum(s.n_trained for s in whole)  # the whole window's, on every rank
            mine = par.share(window, lambda i: len(train_set[i].input_ids))
            weight = par.loss_scale / n_target
            if not mine:  # fewer samples than processes: join the gradient exchange with a zero loss
                mine, weight = window[:1], 0.0
            samples = [train_set[i] for i in mine]

            micros = list(micro_batches(samples, args, device))
            replayed = graphed.window(micros, weight, max_steps - step + 1) if graphed else None  # from CUDA graphs
            if replayed is not None:
                loss_sum = nonfinite.poison(replayed, step)
            else:
                loss_sum = _eager_window(micros, forward, weight, par, lambda loss: nonfinite.poison(loss, step))
            # one host sync per optimizer step; the ranks' parts of the loss, and any stop request, summed
            loss_sum, stops = par.sum_floats(float(loss_sum) / par.loss_scale, stop.requested, device=device)
            stopping = stops > 0
            grad_norm = _clip(model, args.max_grad_norm)
            good = nonfinite.ok(step, loss_sum, grad_norm)
            if good:  # a NaN/inf step changes nothing; the schedule still moves on with the data
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not good:
                _append_jsonl(log_path, {"skipped": "non-finite loss or gradient", "global_step/max_steps": f"{step}/{max_steps}"})
                if nonfinite.gave_up:
                    raise nonfinite.error(last_ckpt, args)

            if step == 1 and marks:
                _report_startup(marks, device)
            if good:
                pending["loss"].append(loss_sum)
                pending["grad_norm"].append(grad_norm)
            pending["tokens"] += sum(len(s.input_ids) for s in whole)
            elapsed = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{pending['tokens'] / max(1e-9, elapsed - pending.get('since', 0)):.0f}")

            if (step % args.logging_steps == 0 or step == 1 or step == max_steps) and pending["loss"]:
                entry = {
                    "loss": round(sum(pending["loss"]) / len(pending["loss"]), 6),
                    "grad_norm": round(sum(pending["grad_norm"]) / len(pending["grad_norm"]), 6),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": round(step / plan["steps_per_epoch"], 4),
                    "global_step/max_steps": f"{step}/{max_steps}",
                    "percentage": f"{100 * step / max_steps:.2f}%",
                    "elapsed_time": _hms(elapsed),
                    "remaining_time": _hms(elapsed / step * (max_steps - step)),
                    "memory(GiB)": round(_memory_gib(device), 2),
                    "train_speed(s/it)": round(elapsed / step, 4),
                    "tokens/s": round(pending["tokens"] / max(1e-9, elapsed - pending.get("since", 0)), 1),
                }
                _append_jsonl(log_path, entry)
                history.append({"step": step, "loss": entry["loss"]})
                pending = {"loss": [], "tokens": 0, "grad_norm": [], "since": elapsed}

            if val_set and (step % eval_steps == 0 or step == max_steps):
                val_loss = evaluate(model, val_set, args, device, forward)
                _append_jsonl(log_path, {"eval_loss": round(val_loss, 6), "global_step/max_steps": f"{step}/{max_steps}",
                                         "elapsed_time": _hms(time.time() - t0)})
                history.append({"step": step, "eval_loss": val_loss})
                say(f"[tunesmith] step {step}: eval_loss {val_loss:.4f}")

            if (step % args.save_steps == 0 and good) or step == max_steps or stopping:
                trainer_state = {"global_step": step, "max_steps": max_steps, "epoch": step / plan["steps_per_epoch"],
                                 "log_history": history, "base_model": model_name, "pending": pending,
                                 "elapsed": time.time() - t0, "data_fingerprint": state.get("data_fingerprint"),
                                 "world_size": par.world}
                adapter, optim = par.adapter_state(model), par.optimizer_state(model, optimizer)  # FSDP: gathered
                if par.main:
                    files = _resume_files(args, trainer_state, optim, scheduler)
                    save_checkpoint(run_dir, step, model, files, args.save_total_limit, adapter)
                    say(f"[tunesmith] saved {run_dir / f'checkpoint-{step}'}")
                par.barrier()  # the checkpoint is complete before any rank goes on
                last_ckpt = run_dir / f"checkpoint-{step}"
            if stopping and step < max_steps:
                bar.close()
                return {"checkpoint": last_ckpt, "step": step, "stopped_by": stop.exit_code if stop.requested else 143}
    bar.close()
    runtime = time.time() - t0
    _append_jsonl(log_path, {"train_runtime": round(runtime, 2), "train_steps": max_steps,
                             "last_model_checkpoint": str(last_ckpt)})
    try:
        if par.main:
            plot_loss(history, run_dir / "images" / "train_loss.png")
    except OSError as e:  # the adapter is saved; a missing plot must not fail the run
        log(f"could not write the loss plot ({e.strerror})")
    return {"checkpoint": last_ckpt, "train_runtime": runtime}


def _eager_window(micros: list, forward, weight: float, par, poison):
    """Forward+backward of a window's micro-batches; their summed loss (times weight), detached. No loss
    outlives its backward: a kept autograd graph keeps the parameters' AccumulateGrad nodes (and the
    stream they were made on) alive into the next pass, which breaks a CUDA graph capture there."""
    loss_sum = 0.0
    for micro, last in _with_last(micros):
        with par.no_sync(last):  # gradients are exchanged after the window's last micro-batch
            loss = poison(forward(micro) * weight)  # mean over the window's answer tokens
            loss.backward()
        loss_sum = loss_sum + loss.detach()
        del loss
    return loss_sum


def _resume_files(args, trainer_state: dict, optimizer_state: dict, scheduler) -> dict:
    """Everything besides the adapter that a checkpoint needs to continue exactly (resume.restore)."""
    return {
        "args.json": args_dict(args),
        "trainer_state.json": trainer_state,
        "optimizer.pt": optimizer_state,
        "scheduler.pt": scheduler.state_dict(),
        "rng_state.pth": _rng_state(),
    }


def batch_windows(n: int, batch_size: int, accumulation: int, seed: int):
    """Endless (epoch, sample indices) per optimizer step; a fresh seeded shuffle each epoch."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        per_window = batch_size * accumulation
        for start in range(0, n, per_window):
            yield epoch, order[start:start + per_window]
        epoch += 1


def _with_last(items):
    """(item, is_last) pairs, without materialising the iterator."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def micro_batches(samples: list[Encoded], args: SftArguments, device: str):
    """The forward passes of one window: packed rows (padding-free) or plain padded micro-batches.
    Everything is built on the CPU and moved once, so the GPU never waits on the host mid-step."""
    import torch

    if args.packing_window:
        # Rows of up to max(max_length, batch*max_length) tokens; samples never attend to each other
        # (per-sample attention from the boundaries in cu_seq_lens; position ids restart per sample).
        budget = max(args.max_length, args.per_device_train_batch_size * args.max_length)
        row: list[Encoded] = []
        for s in samples + [None]:
            if s is None or (row and sum(len(r.input_ids) for r in row) + len(s.input_ids) > budget):
                lengths = [len(r.input_ids) for r in row]
                batch = {
                    "input_ids": torch.tensor([[t for r in row for t in r.input_ids]]),
                    "labels": torch.tensor([[t for r in row for t in _shift(r.labels)]]),
                    "position_ids": torch.tensor([[p for n in lengths for p in range(n)]]),
                    "cu_seq_lens_q": torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32),
                }
                batch["cu_seq_lens_k"] = batch["cu_seq_lens_q"]
                yield _to_device(batch, device, max_length_q=max(lengths), max_length_k=max(lengths), attention_mask=None)
                row = []
            if s is not None:
                row.append(s)
        return
    bs = args.per_device_train_batch_size
    pad = 0
    for i in range(0, len(samples), bs):
        group = samples[i:i + bs]
        width = max(len(s.input_ids) for s in group)
        batch = {
            "input_ids": torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in group]),
            "labels": torch.tensor([_shift(s.labels) + [IGNORE] * (width - len(s.labels)) for s in group]),
            "attention_mask": torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in group]),
        }
        yield _to_device(batch, device, position_ids=None)


def _to_device(batch: dict, device: str, **plain) -> dict:
    """Tensors to the device (pinned + non-blocking on CUDA), plus where the loss is: the flat
    positions of answer tokens and their targets, found here so the forward needs no host sync."""
    import torch

    keep = (batch["labels"].reshape(-1) != IGNORE).nonzero().squeeze(1)
    batch["loss_positions"], batch["loss_targets"] = keep, batch["labels"].reshape(-1)[keep]
    cuda = device.startswith("cuda")
    out = {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)) for k, v in batch.items()}
    out.update(plain)
    return out


def _shift(labels: list[int]) -> list[int]:
    """Token t is predicted at position t-1: shift labels left once per sample (never across samples)."""
    return labels[1:] + [IGNORE]


def loss_of(model, batch) -> "torch.Tensor":
    """Summed cross-entropy over answer tokens. The vocabulary projection runs only where there is
    loss, in chunks that are recomputed in backward, so the [tokens, vocab] logits never exist."""
    base = model.get_base_model()
    lora_linear.begin_forward(batch["input_ids"].device)  # this pass's dropout masks
    extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in batch}
    with fast.mixed_precision(model, base.dtype, batch["input_ids"].device):
        out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], use_cache=False, **extra)
        hidden = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
        hidden = hidden.index_select(0, batch["loss_positions"])
        return fast.linear_cross_entropy(hidden, base.get_output_embeddings(), batch["loss_targets"])


def evaluate(model, val_set: list[Encoded], args: SftArguments, device: str, forward=None) -> float:
    """Mean loss per answer token. Under torchrun every rank evaluates the whole set (FSDP needs all
    ranks in each forward), so all agree without an exchange."""
    import torch

    forward = forward or (lambda batch: loss_of(model, batch))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_set), args.per_device_eval_batch_size):
            group = val_set[i:i + args.per_device_eval_batch_size]
            for micro in micro_batches(group, args, device):
                total += forward(micro).item()
            count += sum(s.n_trained for s in group)
    model.train()
    return total / max(1, count)


def _clip(model, max_norm: float) -> float:
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded DTensor


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), marker="o", ms=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", ms=4, label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _report_startup(marks: dict, device: str) -> None:
    """Where the time from the command to the first optimizer step went."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    now = time.time()
    names = ["launch", "start", "data", "tokenized", "loaded", "ready"]
    labels = {"start": "python+imports", "data": "data", "tokenized": "model files+tokenize", "loaded": "load weights",
              "ready": "LoRA+optimizer", "first": "first step"}
    stamps = [marks[n] for n in names if n in marks] + [now]
    keys = [n for n in names if n in marks][1:] + ["first"]
    parts = ", ".join(f"{labels[k]} {b - a:.1f} s" for k, a, b in zip(keys, stamps, stamps[1:]))
    log(f"first optimizer step {now - marks['launch']:.1f} s after launch ({parts})")


def _seed_everything(seed: int):
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    return torch


def _rng_state() -> dict:
    import torch

    import numpy as np

    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_reserved() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _append_jsonl(path: Path | None, entry: dict) -> None:
    if path is None:  # not rank 0
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m}m {s}s" if h else (f"{m}m {s}s" if m else f"{s}s")
