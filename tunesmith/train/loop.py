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
from . import distributed, run_log, status
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
        marks=None, state=None, par=None, forward=None, graphed=None, objective=None, keep=None) -> dict:
    """Train from step state["global_step"] + 1 (0 for a new run) to max_steps.
    `par` (distributed.py): this process's part of each window; `forward`: batch -> summed loss;
    `graphed` (cuda_graphs.py): replays each packed row from a CUDA graph where it can;
    `objective`: what a window's loss is a mean over, and its batches (sft: AnswerTokens; rlhf: preference.py);
    `keep` (keep.py, --keep_kl): every few steps one more short forward+backward that holds the model to the base."""
    par = par or distributed.Parallel()
    forward = forward or (lambda batch: loss_of(model, batch))
    objective = objective or AnswerTokens()
    max_steps = plan["max_steps"]
    state = state or {"global_step": 0, "log_history": []}
    done = state["global_step"]
    windows = itertools.islice(  # a resumed run skips the windows it already trained on
        batch_windows(len(train_set), args.per_device_train_batch_size, plan["accumulation"] * par.world, args.seed),
        done, None)
    meter = Meter(run_dir, args, plan, state, par, device)  # logging.jsonl, curves, progress bar, status file
    nonfinite, nan_steps = NonFinite(args.max_nonfinite_steps), settings.fault_nan_steps()
    last_ckpt = state.get("checkpoint")
    model.train()
    with StopSignals() as stop:
        for step in range(done + 1, max_steps + 1):
            # 1. Forward and backward over this step's window (this process's share of it).
            _, window = next(windows)
            whole = [train_set[i] for i in window]
            loss_sum = _window_loss(window, whole, train_set, objective, args, device, par, forward, graphed,
                                    steps_left=max_steps - step + 1, poison_loss=lambda x: poison(x, step, nan_steps))
            if keep:  # its gradient joins the window's; the logged loss stays the window's
                keep.step(step, args)
            # one host sync per optimizer step: the processes' parts of the loss, and any stop request, summed
            loss_sum, stops = par.sum_floats(float(loss_sum) / par.loss_scale, stop.requested, device=device)

            # 2. Clip and update. A NaN/inf step changes nothing; the schedule still moves on with the data.
            grad_norm = _clip(model, args.max_grad_norm)
            good = nonfinite.ok(step, loss_sum, grad_norm)
            if good:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if not good:
                meter.skipped(step)
                if nonfinite.gave_up:
                    raise nonfinite.error(last_ckpt, args)
            if step == 1 and marks:
                report_startup(marks, device)

            # 3. Log, validate, save.
            meter.stepped(step, loss_sum if good else None, grad_norm, sum(objective.length(s) for s in whole),
                          scheduler.get_last_lr()[0], lambda: {**objective.metrics(), **(keep.metrics() if keep else {})})
            if val_set and (step % (args.eval_steps or args.save_steps) == 0 or step == max_steps):
                meter.evaluated(step, evaluate(model, val_set, args, device, forward))
            if (step % args.save_steps == 0 and good) or step == max_steps or stops:
                last_ckpt = _save(model, optimizer, scheduler, args, run_dir, step, meter.trainer_state(step, model_name),
                                  par, meter.say)
            if stops and step < max_steps:
                meter.close()
                return {"checkpoint": last_ckpt, "step": step, "stopped_by": stop.exit_code if stop.requested else 143}
    return {"checkpoint": last_ckpt, "train_runtime": meter.finish(last_ckpt)}


def _window_loss(window, whole, train_set, objective, args, device, par, forward, graphed, steps_left, poison_loss):
    """Forward+backward of this process's share of a window, replayed from CUDA graphs where they are
    captured; leaves the gradient in .grad and returns the summed loss (a mean over the whole window's units)."""
    mine = par.share(window, lambda i: objective.length(train_set[i]))
    weight = par.loss_scale / objective.units(whole)
    if not mine:  # fewer samples than processes: join the gradient exchange with a zero loss
        mine, weight = window[:1], 0.0
    micros = objective.batches([train_set[i] for i in mine], args, device)
    replayed = graphed.window(micros, weight, steps_left) if graphed else None
    if replayed is not None:
        return poison_loss(replayed)
    return _eager_window(micros, forward, weight, par, poison_loss)


def _save(model, optimizer, scheduler, args, run_dir, step, trainer_state, par, say):
    """A checkpoint of the adapter and everything resume needs; rank 0 writes it, every rank waits for it."""
    adapter, optim = par.adapter_state(model), par.optimizer_state(model, optimizer)  # FSDP: gathered
    if par.main:
        files = _resume_files(args, trainer_state, optim, scheduler)
        save_checkpoint(run_dir, step, model, files, args.save_total_limit, adapter)
        say(f"[tunesmith] saved {run_dir / f'checkpoint-{step}'}")
    par.barrier()  # the checkpoint is complete before any rank goes on
    status.update(checkpoint=str(run_dir / f"checkpoint-{step}"))
    return run_dir / f"checkpoint-{step}"


class Meter:
    """What a run reports as it goes: logging.jsonl lines every --logging_steps (and --report_to's curves),
    eval lines, the progress bar, the status file; and what of it a checkpoint keeps (trainer_state)."""

    def __init__(self, run_dir, args, plan, state, par, device):
        from tqdm import tqdm

        self.args, self.plan, self.state, self.device = args, plan, state, device
        self.max_steps = plan["max_steps"]
        self.log_path = run_log.start(run_dir, args, state["global_step"]) if par.main else None  # rank 0 writes
        self.say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if par.main else (lambda msg: None)
        self.history = state["log_history"]
        self.pending = state.get("pending") or {"loss": [], "tokens": 0, "grad_norm": []}
        self.world = par.world
        self.t0 = time.time() - state.get("elapsed", 0.0)
        self.bar = tqdm(total=self.max_steps, initial=state["global_step"], desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=settings.no_progress() or not par.main)

    def stepped(self, step: int, loss, grad_norm: float, tokens: int, lr: float, metrics) -> None:
        """One optimizer step done (loss None: skipped as non-finite); a logging.jsonl line when it is due."""
        pending = self.pending
        if loss is not None:
            pending["loss"].append(loss)
            pending["grad_norm"].append(grad_norm)
        pending["tokens"] += tokens
        elapsed = time.time() - self.t0
        speed = pending["tokens"] / max(1e-9, elapsed - pending.get("since", 0))
        remaining = elapsed / step * (self.max_steps - step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss if loss is not None else float('nan'):.4f}", lr=f"{lr:.2e}", tok_s=f"{speed:.0f}")
        status.update(every_step=True, step=step, loss=loss, learning_rate=lr, elapsed_s=round(elapsed, 1),
                      remaining_s=round(remaining, 1), tokens_per_s=round(speed, 1))
        if not ((step % self.args.logging_steps == 0 or step == 1 or step == self.max_steps) and pending["loss"]):
            return
        entry = {
            "loss": round(sum(pending["loss"]) / len(pending["loss"]), 6),
            "grad_norm": round(sum(pending["grad_norm"]) / len(pending["grad_norm"]), 6),
            "learning_rate": lr,
            "epoch": round(step / self.plan["steps_per_epoch"], 4),
            "global_step/max_steps": f"{step}/{self.max_steps}",
            "percentage": f"{100 * step / self.max_steps:.2f}%",
            "elapsed_time": hms(elapsed),
            "remaining_time": hms(remaining),
            "memory(GiB)": round(_memory_gib(self.device), 2),
            "train_speed(s/it)": round(elapsed / step, 4),
            "tokens/s": round(speed, 1),
            **metrics(),
        }
        append_jsonl(self.log_path, entry)
        self.history.append({"step": step, "loss": entry["loss"]})
        self.pending = {"loss": [], "tokens": 0, "grad_norm": [], "since": elapsed}

    def skipped(self, step: int) -> None:
        append_jsonl(self.log_path, {"skipped": "non-finite loss or gradient",
                                     "global_step/max_steps": f"{step}/{self.max_steps}"})

    def evaluated(self, step: int, val_loss: float) -> None:
        append_jsonl(self.log_path, {"eval_loss": round(val_loss, 6), "global_step/max_steps": f"{step}/{self.max_steps}",
                                     "elapsed_time": hms(time.time() - self.t0)})
        self.history.append({"step": step, "eval_loss": val_loss})
        self.say(f"[tunesmith] step {step}: eval_loss {val_loss:.4f}")

    def trainer_state(self, step: int, model_name: str) -> dict:
        return {"global_step": step, "max_steps": self.max_steps, "epoch": step / self.plan["steps_per_epoch"],
                "log_history": self.history, "base_model": model_name, "pending": self.pending,
                "elapsed": time.time() - self.t0, "data_fingerprint": self.state.get("data_fingerprint"),
                "world_size": self.world}

    def close(self) -> None:
        self.bar.close()

    def finish(self, last_ckpt) -> float:
        """The run's last logging.jsonl line and its loss plot; returns the training time."""
        self.bar.close()
        runtime = time.time() - self.t0
        append_jsonl(self.log_path, {"train_runtime": round(runtime, 2), "train_steps": self.max_steps,
                                     "last_model_checkpoint": str(last_ckpt)})
        try:
            if self.log_path is not None:
                plot_loss(self.history, self.log_path.parent / "images" / "train_loss.png")
        except OSError as e:  # the adapter is saved; a missing plot must not fail the run
            log(f"could not write the loss plot ({e.strerror})")
        return runtime


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
