"""The training loop: fit() runs the optimizer steps that recipe.run() set up.

    for each optimizer step: forward+backward over one accumulation window (batches.py packs it into rows,
    replayed from CUDA graphs where they were captured), clip, step, log (run_log.py), validate, save

Ctrl-C/SIGTERM and NaN/inf steps are handled by the small guards in stopping.py.

The update follows ms-swift/transformers semantics: the loss of one optimizer step is the mean
over all answer tokens of its accumulation window. With --packing_window (default) the whole
window runs as one padding-free packed sequence: the same update, far fewer, larger matmuls.
"""

from __future__ import annotations
import itertools
import random
import sys
import time
from . import distributed, run_log
from .. import settings
from ..args import SftArguments, args_dict
from .checkpoint import save_checkpoint
from .stopping import NonFinite, StopSignals, poison
from ..console import log
from ..data.template import Encoded
from .batches import AnswerTokens, batch_windows, loss_of, micro_batches, with_last
from .run_log import append_jsonl, hms, plot_loss, report_startup


# ---------------------------------------------------------------------------------------------
# The loop


def fit(model, tok, template, train_set, val_set, optimizer, scheduler, args, plan, run_dir, device, model_name,
        marks=None, state=None, par=None, forward=None, graphed=None, objective=None) -> dict:
    """Train from step state["global_step"] + 1 (0 for a new run) to max_steps.
    `par` (distributed.py): this process's part of each window; `forward`: batch -> summed loss;
    `graphed` (cuda_graphs.py): replays each packed row from a CUDA graph where it can;
    `objective`: what a window's loss is a mean over, and its batches (sft: AnswerTokens; rlhf: preference.py)."""
    from tqdm import tqdm

    par = par or distributed.Parallel()
    forward = forward or (lambda batch: loss_of(model, batch))
    objective = objective or AnswerTokens()
    max_steps, accumulation = plan["max_steps"], plan["accumulation"]
    state = state or {"global_step": 0, "log_history": []}
    done = state["global_step"]
    windows = itertools.islice(  # a resumed run skips the windows it already trained on
        batch_windows(len(train_set), args.per_device_train_batch_size, accumulation * par.world, args.seed), done, None)
    eval_steps = args.eval_steps or args.save_steps
    log_path = run_log.start(run_dir, args, done) if par.main else None  # rank 0 alone writes (and --report_to)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if par.main else (lambda msg: None)
    history = state["log_history"]
    pending = state.get("pending") or {"loss": [], "tokens": 0, "grad_norm": []}
    last_ckpt = state.get("checkpoint")
    nonfinite, nan_steps = NonFinite(args.max_nonfinite_steps), settings.fault_nan_steps()
    t0 = time.time() - state.get("elapsed", 0.0)
    bar = tqdm(total=max_steps, initial=done, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=settings.no_progress() or not par.main)
    model.train()
    with StopSignals() as stop:
        for step in range(done + 1, max_steps + 1):
            epoch, window = next(windows)
            whole = [train_set[i] for i in window]
            n_target = objective.units(whole)  # the whole window's, on every rank
            mine = par.share(window, lambda i: objective.length(train_set[i]))
            weight = par.loss_scale / n_target
            if not mine:  # fewer samples than processes: join the gradient exchange with a zero loss
                mine, weight = window[:1], 0.0
            samples = [train_set[i] for i in mine]

            micros = objective.batches(samples, args, device)
            replayed = graphed.window(micros, weight, max_steps - step + 1) if graphed else None  # from CUDA graphs
            if replayed is not None:
                loss_sum = poison(replayed, step, nan_steps)
            else:
                loss_sum = _eager_window(micros, forward, weight, par, lambda loss: poison(loss, step, nan_steps))
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
                append_jsonl(log_path, {"skipped": "non-finite loss or gradient", "global_step/max_steps": f"{step}/{max_steps}"})
                if nonfinite.gave_up:
                    raise nonfinite.error(last_ckpt, args)

            if step == 1 and marks:
                report_startup(marks, device)
            if good:
                pending["loss"].append(loss_sum)
                pending["grad_norm"].append(grad_norm)
            pending["tokens"] += sum(objective.length(s) for s in whole)
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
                    "elapsed_time": hms(elapsed),
                    "remaining_time": hms(elapsed / step * (max_steps - step)),
                    "memory(GiB)": round(_memory_gib(device), 2),
                    "train_speed(s/it)": round(elapsed / step, 4),
                    "tokens/s": round(pending["tokens"] / max(1e-9, elapsed - pending.get("since", 0)), 1),
                    **objective.metrics(),
                }
                append_jsonl(log_path, entry)
                history.append({"step": step, "loss": entry["loss"]})
                pending = {"loss": [], "tokens": 0, "grad_norm": [], "since": elapsed}

            if val_set and (step % eval_steps == 0 or step == max_steps):
                val_loss = evaluate(model, val_set, args, device, forward)
                append_jsonl(log_path, {"eval_loss": round(val_loss, 6), "global_step/max_steps": f"{step}/{max_steps}",
                                         "elapsed_time": hms(time.time() - t0)})
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
    append_jsonl(log_path, {"train_runtime": round(runtime, 2), "train_steps": max_steps,
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
    for micro, last in with_last(micros):
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
