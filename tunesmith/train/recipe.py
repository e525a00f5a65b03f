"""`tunesmith sft`: the LoRA training recipe, top to bottom.

    run()             the whole recipe on one screen:
    read_inputs()     model files, tokenizer, tokenized data (before any weights load)
    plan_run()        step counts, the checkpoint to resume from, the memory check
    build()           model, fast path and LoRA (prepare_model, add_lora), CUDA graphs, optimizer (build_optimizer)
    open_run_folder() the run folder and its args.json; then loop.fit(), then finish()

Resuming (resume.py) restores the pieces before fit(); fit() then starts after the checkpoint's step.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from . import distributed, planner, resume, status
from .. import settings
from ..engine import activation_memory, attention, checkpointing, cuda_graphs, decoder_layer, lora_linear, moe_lora, patches
from ..args import SftArguments, save_args
from .checkpoint import new_run_dir
from ..data.sources import check_local
from ..errors import UserError
from ..model.families import check_supported, skeleton
from ..model.load import load_config, load_model, load_tokenizer, pick_dtype
from ..console import log
from ..model.resolve import resolve_model
from ..data.template import ChatTemplate
from ..data.cache import prepare
from .batches import loss_of
from .keep import KeepTerm
from .loop import fit
from .run_log import process_start


MIN_USEFUL_STEPS = 30  # below this an identity/style fine-tune at lr 1e-4 rarely takes (see run_plan)


def run(args: SftArguments, method=None) -> int:
    """`method` (rlhf.py: preference tuning) brings its own data, adapter and loss; None is sft."""
    marks = {"launch": process_start(), "start": time.time()}
    status.update(phase="starting")
    par = distributed.setup(args)  # one process, or one of several under torchrun
    if args.dry_run:
        return planner.dry_run(args, par.world)
    inputs = read_inputs(args, method, par, marks)  # 1. files, tokenizer and data: problems show before any weights load
    plan = plan_run(args, inputs, method, par)  # steps, resume, memory: a run that cannot fit stops here
    parts = build(args, method, inputs, plan, par, marks)  # 2. model with LoRA, optimizer, schedule
    run_dir = open_run_folder(args, plan, par)
    status.update(phase="training", run_dir=str(run_dir), step=plan.state["global_step"], max_steps=plan.max_steps)
    marks["ready"] = time.time()
    try:  # 3. the loop
        last = fit(parts.model, inputs.tok, inputs.template, inputs.train_set, inputs.val_set, parts.optimizer,
                   parts.scheduler, args, plan.steps, run_dir, plan.device, inputs.resolved.name, marks, plan.state,
                   par=par, forward=parts.forward, graphed=parts.graphed, objective=parts.objective, keep=parts.keep)
    except OSError as e:  # a full disk or a folder that became read-only: say so, point at what is intact
        raise resume.write_failed(e, run_dir) from None
    return finish(last, plan, parts, marks, par)


@dataclass
class Inputs:
    """What is read before any weights load."""

    resolved: object  # model.resolve's answer: the exact base model and its local path
    tok: object
    template: ChatTemplate
    train_set: list
    val_set: list


@dataclass
class Plan:
    """How the run goes: its step counts (run_plan), where it resumes from, its device and largest forward pass."""

    steps: dict
    state: dict  # global_step, log_history, data_fingerprint (and the checkpoint when resuming)
    device: str
    longest_row: int

    @property
    def max_steps(self) -> int:
        return self.steps["max_steps"]

    @property
    def checkpoint(self) -> Path | None:
        return self.state.get("checkpoint")


@dataclass
class Parts:
    model: object
    objective: object  # rlhf's loss, or None for sft's
    forward: object  # what fit() calls for a micro-batch's loss (DDP / FSDP2 wrapped under torchrun)
    graphed: object  # cuda_graphs.GraphedRows, or None
    optimizer: object
    scheduler: object
    keep: object = None  # keep.KeepTerm (--keep_kl), or None


def read_inputs(args: SftArguments, method, par, marks: dict) -> Inputs:
    """The model's files (fast), then the data, read and tokenized once and cached on disk. Missing files first of all."""
    check_local(args.dataset + args.val_dataset)
    marks["data"] = time.time()
    resolved = resolve_model(args.model)
    args.model = resolved.name  # args.json names the exact base, so infer/export find it again
    config = load_config(resolved.path)
    check_supported(config, resolved.path)
    lora_config(skeleton(config), args)  # what --target_modules and --lora_dropout mean for this model
    tok = load_tokenizer(resolved.path)
    template = ChatTemplate(tok, args.system)
    with par.main_first():  # rank 0 tokenizes and caches, the others read its cache
        data = method.prepare(args, tok) if method else prepare(args, tok, resolved.path)
    _report_data(args, data)
    marks["tokenized"] = time.time()
    return Inputs(resolved, tok, template, data.train, data.val)


def _report_data(args: SftArguments, data) -> None:
    for line in data.report:
        log(line)
    stats = data.stats
    if args.eval_steps is not None and not len(data.val):
        log("warning: --eval_steps is set but there is no validation data, so nothing will be evaluated; "
            "add --split_dataset_ratio 0.1 or --val_dataset FILE")
    if stats["too_long"]:
        what = "dropped" if args.truncation_strategy == "delete" else "truncated"
        log(f"{stats['too_long']} samples are longer than --max_length {args.max_length} tokens: {what} "
            "(--truncation_strategy delete|right|left)")
    if stats["no_loss"]:
        log(f"{stats['no_loss']} samples have no answer tokens left to train on and were skipped")
    if not data.train:
        raise UserError("no training samples left after tokenization (see the lines above)")


def plan_run(args: SftArguments, inputs: Inputs, method, par) -> Plan:
    """Step counts, the checkpoint to resume from (checked to be this run's), and the memory check."""
    steps = run_plan(args, len(inputs.train_set), par.world)
    for line in steps["messages"]:
        log(line)
    fingerprint = resume.data_fingerprint(inputs.train_set)
    ckpt = resume.find_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if ckpt:
        state = resume.check_same_run(ckpt, args, fingerprint, par.world)
        state.update(checkpoint=ckpt, data_fingerprint=fingerprint)
    else:
        state = {"global_step": 0, "log_history": [], "data_fingerprint": fingerprint}
    length = method.length if method else (lambda s: len(s.input_ids))
    longest_row = _longest_row(inputs.train_set, args, steps["accumulation"], length)
    device = par.device(args.device)
    planner.check_fits(args, inputs.resolved.path, longest_row, device, par.world)  # before any weights load
    return Plan(steps, state, device, longest_row)


def build(args: SftArguments, method, inputs: Inputs, plan: Plan, par, marks: dict) -> Parts:
    """The model with its fast path and LoRA (or rlhf's adapters), its loss, CUDA graphs, optimizer and schedule;
    a resumed run gets their state back from the checkpoint."""
    _seed_everything(args.seed)
    dtype = pick_dtype(args.torch_dtype, plan.device)
    if par.fsdp and args.gradient_checkpointing is None:  # memory is planned per shard: recompute everything
        args.gradient_checkpointing = 1.0
    model = load_model(inputs.resolved.path, dtype, "cpu" if par.fsdp else plan.device, args.quant_bits)  # FSDP: shards move
    marks["loaded"] = time.time()
    model = prepare_model(model, args, plan.device, longest_row=plan.longest_row,
                          adapter=method.adapter if method else add_lora)
    objective = method.objective(model, args) if method else None
    forward = objective or par.wrap(model, loss_of, plan.device)  # DDP / FSDP2 under torchrun; plain loss_of otherwise
    graphed = None
    if args.cuda_graphs and not par.active and not method and cuda_graphs.usable(model, plan.device):
        graphed = cuda_graphs.GraphedRows(model, forward)
    optimizer, scheduler = build_optimizer(model, args, plan.max_steps)
    if plan.checkpoint:
        resume.restore(plan.checkpoint, model, optimizer, scheduler)
    keep = None
    if args.keep_kl and not method:
        window_tokens = sum(len(s.input_ids) for s in inputs.train_set) / plan.steps["steps_per_epoch"]
        keep = KeepTerm.build(model, inputs.template, args, inputs.resolved.path, plan.device, window_tokens, par)
    return Parts(model, objective, forward, graphed, optimizer, scheduler, keep)


def open_run_folder(args: SftArguments, plan: Plan, par) -> Path:
    """A new run folder with args.json, or the resumed run's (a new one when --output_dir moved); rank 0 writes it."""
    run_dir = None
    if par.main and plan.checkpoint:
        step = plan.state["global_step"]
        run_dir = resume.continue_in(plan.checkpoint, args.output_dir, step)
        if not (run_dir / "args.json").exists():  # a new run folder under another --output_dir
            save_args(args, run_dir / "args.json")
        log(f"resuming from {plan.checkpoint} at step {step} of {plan.max_steps}; run folder: {run_dir}")
    elif par.main:
        run_dir = new_run_dir(args.output_dir)
        save_args(args, run_dir / "args.json")
        log(f"run folder: {run_dir}")
    return Path(par.broadcast(str(run_dir) if par.main else None))


def finish(last: dict, plan: Plan, parts: Parts, marks: dict, par) -> int:
    """The closing lines: how to continue a stopped run, or where the finished adapter is."""
    if last.get("stopped_by"):
        log(f"stopped after step {last['step']} of {plan.max_steps}; checkpoint: {last['checkpoint']}")
        log(f"continue with: {resume.resume_command(last['checkpoint'])}")
        status.update(phase="stopped", checkpoint=str(last["checkpoint"]))
        return last["stopped_by"]
    if parts.graphed and parts.graphed.graphs:
        log(parts.graphed.report())
    log(f"done in {time.time() - marks['start']:.0f} s (training {last['train_runtime']:.0f} s)")
    status.update(phase="finished", checkpoint=str(last["checkpoint"]))
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
    refining = bool(getattr(args, "rlhf_type", None) and getattr(args, "adapters", None))  # (preference tuning of an
    # SFT adapter: a few steps at a small learning rate is the recipe, examples/rlhf.sh)
    if max_steps < MIN_USEFUL_STEPS and not refining:
        msgs.append(
            f"warning: {max_steps} optimizer steps are usually too few to teach the model anything at "
            f"--learning_rate {args.learning_rate:g} (ms-swift's run of the guide with these settings still "
            f"answered as before). {_more_steps(args, batches_per_epoch, accumulation)}"
        )
    return {"accumulation": accumulation, "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "messages": msgs}


def _more_steps(args: SftArguments, batches_per_epoch: int, accumulation: int) -> str:
    """The flag that gets a run to MIN_USEFUL_STEPS: fewer batches per step while accumulation can drop,
    else more epochs (a fixed --max_steps is the user's own choice: raise it)."""
    if args.max_steps > 0:
        return f"Raise --max_steps to {MIN_USEFUL_STEPS} or more."
    fix = max(1, math.floor(batches_per_epoch * args.num_train_epochs / MIN_USEFUL_STEPS))
    if fix < accumulation:
        better = math.ceil(batches_per_epoch / fix) * args.num_train_epochs
        return f"Use --gradient_accumulation_steps {fix} ({better:.0f} steps) or more --num_train_epochs."
    per_epoch = math.ceil(batches_per_epoch / accumulation)
    epochs = math.ceil(MIN_USEFUL_STEPS / per_epoch)
    smaller = " or a smaller --per_device_train_batch_size" if args.per_device_train_batch_size > 1 else ""
    return (f"Accumulation is already {accumulation}: use --num_train_epochs {epochs} ({epochs * per_epoch} steps)"
            f"{smaller}, or more data.")


def prepare_model(model, args: SftArguments, device: str, longest_row: int | None = None,
                  memory_budget: int | None = None, adapter=None):
    """Fast-path switches (engine/), LoRA, and recompute/checkpointing where memory needs it."""
    notes = []
    if args.packing_window:
        attention.use_document_attention(model)
        notes.append("packed windows with per-sample attention")
    layers = checkpointing.decoder_layers(model)
    kind = getattr(model.config, "model_type", "")
    reasons = [decoder_layer.fallback_reason(layer) for layer in layers]  # None: the layer runs lean
    lean_layers = planner.lean_layers_apply(args, kind) and None in reasons
    if device.startswith("cuda") and args.use_liger and not lean_layers:  # lean layers bring their own
        kernels = patches.apply_liger(model, swiglu=not args.lean_lora)  # the lean MLP fuses its own SwiGLU
        notes += [f"Liger {'/'.join(kernels)}"] if kernels else []
    model = (adapter or add_lora)(model, args)
    lean = False
    if args.lean_lora:
        n = lora_linear.use_lean_lora(model)
        notes += [f"lean LoRA on {n} projections"] if n else []
        experts = 0 if settings.peft_experts() else moe_lora.use_lean_experts(model)  # (not merged into the
        # experts' weights, as PEFT does)
        notes += [f"lean LoRA on the experts of {experts} layers"] if experts else []
        lean = lora_linear.all_lean(model)
        lean_layers = lean_layers and decoder_layer.use_lean_layers(model)
        notes += [decoder_layer.lean_note(lean_layers, reasons, kind in decoder_layer.MOE)] if lean_layers else []
        if not lean_layers and args.packing_window and any(reasons):  # the family's own layers: say why
            why = "; ".join(dict.fromkeys(filter(None, reasons)))  # each reason once
            notes.append(f"transformers' {kind} decoder layers ({why})")
    levels = [0] * len(layers)  # recompute levels of the lean layers (plan_memory's, where memory is short)
    share = args.gradient_checkpointing
    if share is None:  # only where memory requires it
        reserve = planner.loss_bytes(model.config.vocab_size, model.config.hidden_size, longest_row or 0, 2)
        if not device.startswith("cuda"):
            share = 0.0
        elif lean_layers and lean_layers == len(layers) and kind not in decoder_layer.MOE:
            levels, k = activation_memory.plan_memory(model, longest_row, reserve=reserve, budget=memory_budget)
            share = k / len(layers)
            if any(levels):
                notes.append(f"up recomputed in {sum(lv >= 1 for lv in levels)} layers, gate in "
                             f"{sum(lv == 2 for lv in levels)}")
        else:
            liger = any("Liger" in n for n in notes)
            share = activation_memory.plan_checkpointing(model, longest_row, liger, lean, reserve=reserve, budget=memory_budget)
    for layer, level in zip(layers, levels):
        layer._tunesmith_recompute = level
    n = checkpointing.checkpoint_layers(model, float(share), preserve_rng=not lean)
    notes.append(f"activation checkpointing on {n} layers" if n else "no activation checkpointing")
    log("fast path: " + ", ".join(notes))
    return model


def _longest_row(train_set, args: SftArguments, accumulation: int, length=lambda s: len(s.input_ids)) -> int:
    """Tokens in the largest forward pass: a packed window (capped at its row budget) or a micro-batch."""
    lengths = sorted((length(s) for s in train_set), reverse=True)
    if args.packing_window:
        budget = max(args.max_length, args.per_device_train_batch_size * args.max_length)
        return min(budget, sum(lengths[: args.per_device_train_batch_size * accumulation]))
    return args.per_device_train_batch_size * lengths[0]


def lora_config(model, args: SftArguments):
    """PEFT's LoraConfig for --target_modules on `model` (also a skeleton on the meta device, before the weights load).
    An MoE whose experts are 3-D parameters (qwen3_moe, qwen2_moe) gets PEFT's own targets for them, but its router
    and the gate of its shared expert keep the base model's weights (PEFT's all-linear adapts them too), so routing
    stays exact; those parameter targets take no dropout, which is said before any weights load."""
    from peft import LoraConfig

    targets = args.target_modules
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without transformers 5's fused experts
        return config
    try:
        convert_peft_config_for_transformers(config, model, None)  # what get_peft_model does first
    except ValueError as e:
        raise UserError(f"--target_modules {' '.join(targets)}: {str(e).splitlines()[0][:200]}") from None
    if targets == ["all-linear"]:
        _all_linear_on_moe(model, config)
    if config.target_parameters:
        dims = {n: p.dim() for n, p in model.named_parameters()}
        routers = {t for t in config.target_parameters if any(n.endswith("." + t) and d == 2 for n, d in dims.items())}
        config.target_parameters = set(config.target_parameters) - routers
    if config.target_parameters and args.lora_dropout:
        kind = getattr(model.config, "model_type", "this")
        raise UserError(f"--lora_dropout {args.lora_dropout:g}: LoRA on the experts of a {kind} model (PEFT adapts their "
                        "3-D weights directly) takes no dropout; pass --lora_dropout 0")
    return config


PEFT_MISSES_EXPERTS = ("qwen2_moe",)  # PEFT's conversion maps qwen3_moe onto qwen2_moe's pattern, not qwen2_moe itself


def _all_linear_on_moe(model, config) -> None:
    """all-linear on an MoE whose experts PEFT's conversion misses (PEFT_MISSES_EXPERTS): the experts' 3-D parameters
    as it targets qwen3_moe's, gate_up_proj at twice the rank and alpha (the experts' gate and up, once separate
    Linears, each at r). The shared expert's gate (one output: how much of the shared expert joins) keeps the base
    model's weights, as the router does."""
    if getattr(model.config, "model_type", "") in PEFT_MISSES_EXPERTS and not config.target_parameters:
        experts = {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n}
        config.target_parameters = experts or None
        if "gate_up_proj" in experts:
            config.rank_pattern = {**(config.rank_pattern or {}), r".*\.gate_up_proj": 2 * config.r}
            config.alpha_pattern = {**(config.alpha_pattern or {}), r".*\.gate_up_proj": 2 * config.lora_alpha}
    if any(n.endswith(".shared_expert_gate") for n, _ in model.named_modules()):
        config.exclude_modules = {"shared_expert_gate"}


def add_lora(model, args: SftArguments):
    from peft import get_peft_model

    targets = args.target_modules
    target = "all-linear" if targets == ["all-linear"] else targets
    config = lora_config(model, args)
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
    """AdamW (fused on CUDA), no decay on biases and norms, and transformers' own learning-rate schedule."""
    import torch
    from transformers import get_scheduler

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=all(p.is_cuda for p in decay + no_decay) or None,  # one kernel for all parameters on CUDA
    )
    warmup = math.ceil(args.warmup_ratio * max_steps)  # as transformers' Trainer rounds --warmup_ratio
    return optimizer, get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                    num_training_steps=max_steps)


def _seed_everything(seed: int):
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
