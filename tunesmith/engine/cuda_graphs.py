"""CUDA graphs for packed rows: the forward and backward of a row, captured once per row shape
and replayed, so the GPU runs the whole pass without waiting for Python to issue ~3,000 kernels.

A packed row (train.micro_batches) is copied into the static buffers of the graph for its shape:
the smallest captured length that holds it (a multiple of BUCKET tokens) and a number of sample
slots (a power of two, at least 8): flash attention's grid is sized by the slots, so one graph for
64 slots would run ~8x the attention blocks of a row of 7 samples. The spare tokens form one more
sample with no loss, spare sample slots are empty (zero-length), spare loss slots have no target.
The pass's dropout seed lives on the device (lora_linear.begin_forward), so every replay draws new masks.

Used only where it is safe: CUDA, lean LoRA on every projection, Triton available. Anything
else, or a row with more samples than MAX_SAMPLES, runs eagerly.
"""

from __future__ import annotations

import time

import torch

from . import lora_linear
from .. import settings
from .kernels import next_pow2
from ..console import log

BUCKET = 256
MAX_SAMPLES = 64
MAX_TOKENS = 16384  # longer rows keep the GPU busy on their own, and a second memory pool would not fit
MIN_STEPS_LEFT = 40  # graphs start only in a run with this many optimizer steps still to come: a shorter
# run cannot win back the warm-up pass and the captures (the guide's 10 steps stay eager). Then each row
# shape is captured at first sight, into one memory pool: eager passes beside the pool would hold a second
# set of activations in the allocator's cache. A shape first seen later, when a capture no longer pays,
# is replayed by the smallest captured graph that holds it (its spare tokens are one more sample with no
# loss): no capture, and no eager pass beside the pool (session 7: +6 GiB peak on the mixed recipe).
MAX_FAILURES = 3  # captures that fail before graphs are turned off for the run


def bucket(tokens: int) -> int:
    """The captured row length that holds a row of `tokens` tokens."""
    return -(-tokens // BUCKET) * BUCKET


def shape_of(batch: dict) -> tuple[int, int]:
    """(row length, sample slots) of the graph that replays this packed row. Its longest sample is
    taken as the row length: keying graphs on the longest sample too made too many graphs."""
    length = bucket(batch["input_ids"].shape[1])
    slots = max(8, next_pow2(len(batch["cu_seq_lens_q"])))  # the samples and one more for the spare tokens
    return length, slots


class GraphedRows:
    def __init__(self, model, loss_fn):
        """loss_fn(batch) -> the row's summed loss (train.loss_of)."""
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict[tuple, tuple] = {}  # shape_of(row) -> (graph, static batch, loss, grads)
        self.pool = None
        self.broken = False
        self.warned = False
        self.failed: set = set()  # shapes whose capture failed: they run eagerly from then on
        self.capture_seconds = 0.0
        self.replays = 0

    def _static(self, shape: tuple, device) -> dict:
        length, slots = shape
        bounds = torch.full((slots + 1,), length, dtype=torch.int32, device=device)
        bounds[0] = 0
        return {
            "input_ids": torch.zeros(1, length, dtype=torch.long, device=device),
            "position_ids": torch.arange(length, device=device)[None],
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "loss_positions": torch.zeros(length, dtype=torch.long, device=device),
            "loss_targets": torch.full((length,), -100, dtype=torch.long, device=device),
            "attention_mask": None,
            "max_length_q": length,
            "max_length_k": length,
        }

    def _fill(self, static: dict, batch: dict) -> None:
        n = batch["input_ids"].shape[1]
        length = static["input_ids"].shape[1]
        static["input_ids"][:, :n].copy_(batch["input_ids"])
        static["input_ids"][:, n:].zero_()
        static["position_ids"][:, :n].copy_(batch["position_ids"])
        static["position_ids"][0, n:].copy_(torch.arange(length - n, device=static["position_ids"].device))
        cu = batch["cu_seq_lens_q"]
        static["cu_seq_lens_q"][: len(cu)].copy_(cu)
        static["cu_seq_lens_q"][len(cu):].fill_(length)  # the spare tokens: one sample, then empty ones
        k = batch["loss_positions"].shape[0]
        static["loss_positions"][:k].copy_(batch["loss_positions"])
        static["loss_positions"][k:].zero_()
        static["loss_targets"][:k].copy_(batch["loss_targets"])
        static["loss_targets"][k:].fill_(-100)

    def _capture(self, shape: tuple, batch: dict):
        static = self._static(shape, batch["input_ids"].device)
        self._fill(static, batch)
        seed = lora_linear.seed_state(batch["input_ids"].device)
        seed_before = seed.clone() if seed is not None else None
        if self.pool is None:  # a warm-up pass on a side stream before the first capture, as capture wants
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the side stream cannot use the blocks cached by the eager passes
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for p in self.params:
                    p.grad = None
                self.loss_fn(static).backward()
            torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None  # backward inside the capture makes the gradients, in the graph's memory
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's blocks go back to the device before the graph takes its own
        t = time.time()
        graph = torch.cuda.CUDAGraph()
        pool = self.pool if self.pool is not None else torch.cuda.graph_pool_handle()  # (known, to undo a failure)
        try:
            with torch.cuda.graph(graph, pool=pool):
                loss = self.loss_fn(static)
                fault_hook(static)
                loss.backward()
        except BaseException:
            _abandon(pool, shared=self.pool is not None)
            raise
        self.pool = pool
        self.capture_seconds += time.time() - t
        if seed is not None:  # the warm-up drew a seed an eager run would not have drawn: put it back
            seed.copy_(seed_before)
        # detached: a loss that keeps its autograd graph keeps the parameters' AccumulateGrad nodes, and
        # their stream, alive into later passes (the stream mismatch that broke capture)
        return graph, static, loss.detach(), [p.grad for p in self.params]

    def host(self, shape: tuple) -> tuple | None:
        """The captured shape that replays a row of `shape` at the least cost (itself if captured), or None."""
        if shape in self.graphs:
            return shape
        holds = [s for s in self.graphs if s[0] >= shape[0] and s[1] >= shape[1]]
        return min(holds, key=lambda s: (s[0], s[1])) if holds else None

    def row(self, batch: dict, shape: tuple | None = None):
        """(summed loss, gradients) of one packed row, replayed by the graph of `shape` (default: its own,
        captured now if new; window() has checked that it fits)."""
        shape = shape or shape_of(batch)
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(shape, batch)
        graph, static, loss, grads = self.graphs[shape]
        self._fill(static, batch)
        graph.replay()
        return loss, grads

    def window(self, rows: list[dict], scale: float, steps_left: int = MIN_STEPS_LEFT):
        """Loss (times scale) of a window of rows; leaves the window's gradient (times scale) in .grad.
        Returns None (nothing done) when some row cannot be replayed: the caller runs it eagerly.
        `steps_left`: optimizer steps still to come; a run too short to pay for a capture stays eager."""
        if self.broken or any(len(r.get("cu_seq_lens_q", ())) - 1 not in range(1, MAX_SAMPLES) for r in rows):
            return None
        shapes = [shape_of(r) for r in rows]
        if max(length for length, _ in shapes) > MAX_TOKENS or any(s in self.failed for s in shapes):
            return None
        if steps_left < MIN_STEPS_LEFT:  # no more captures: shapes not captured borrow a bigger graph, or run eagerly
            shapes = [self.host(s) for s in shapes]
            if None in shapes:
                return None
        new = [s for s in shapes if s not in self.graphs]
        saved = [p.grad for p in self.params]
        device = rows[0]["input_ids"].device
        seed = lora_linear.seed_state(device)
        seed_before = seed.clone() if seed is not None else None
        try:
            if len(rows) == 1:
                total, acc = self.row(rows[0], shapes[0])
            else:  # several rows: sum their gradients (each replay overwrites its graph's own)
                total, acc = None, None
                for batch, shape in zip(rows, shapes):
                    loss, grads = self.row(batch, shape)
                    if acc is None:
                        total, acc = loss.clone(), [g.clone() for g in grads]
                    else:
                        total += loss
                        torch._foreach_add_(acc, grads)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # a kernel that cannot be captured, or no room
            self._recover(e, [s for s in new if s not in self.graphs], saved, seed, seed_before)
            return None
        self.replays += 1
        torch._foreach_mul_(acc, scale)
        for p, g in zip(self.params, acc):
            p.grad = g
        return total * scale

    def _recover(self, error, shapes, saved, seed, seed_before) -> None:
        """Leave the process as it was before the failed capture: no capture in progress, the caller's
        gradients and dropout seed back, the failed graph's memory returned. Its shapes stay eager."""
        torch.cuda.synchronize()  # (raises if the device itself failed: then there is nothing to go on with)
        for p, g in zip(self.params, saved):
            p.grad = g
        if seed is not None:
            seed.copy_(seed_before)
        self.failed.update(shapes or ["?"])
        if not self.graphs:
            self.pool = None  # nothing captured lives in it: the next capture starts afresh, with its warm-up
        torch.cuda.empty_cache()
        if len(self.failed) >= MAX_FAILURES:
            self.broken = True
        if not self.warned:
            self.warned = True
            what = ", ".join(f"{length} tokens" for length, _ in shapes) or "a row"
            log(f"CUDA graph capture failed for rows of {what} ({str(error).splitlines()[0][:120]}); "
                "those rows run eagerly" + (", and so will all" if self.broken else ""))


    def report(self) -> str:
        return (f"CUDA graphs: {len(self.graphs)} row shapes captured in {self.capture_seconds:.1f} s, "
                f"{self.replays} windows replayed")


def _abandon(pool, shared: bool) -> None:
    """After a failed capture: torch's capture_end raised before telling the allocator that the capture
    ended, so the allocator still routes into the graph's pool. Stop that, and give a pool that no
    captured graph uses back to the allocator (its blocks return once their tensors are gone)."""
    device = torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_endAllocateCurrentStreamToPool"):
        end = getattr(torch._C, name, None)
        if end is not None:
            try:
                end(device, pool)
            except RuntimeError:  # already ended (the capture itself finished)
                pass
            break
    release = getattr(torch._C, "_cuda_releasePool", None)
    if not shared and release is not None:
        try:
            release(device, pool)
        except RuntimeError:
            pass


def fault_hook(static: dict) -> None:
    """Test hook (settings.fault_captures): the Nth capture meets an operation that cannot be captured (a
    host sync), as a kernel that cannot be captured would, so tests can check the fallback."""
    global _captures
    _captures += 1
    if _captures in settings.fault_captures():
        static["input_ids"].sum().item()


_captures = 0


def usable(model, device) -> bool:
    """CUDA, Triton, and every LoRA projection on the lean path (its dropout seeded from the device)."""
    from . import kernels, lora_linear

    return str(device).startswith("cuda") and kernels.available() and lora_linear.all_lean(model)
