"""CUDA graphs for packed rows: the forward and backward of a row, captured once per row shape
and replayed, so the GPU runs the whole pass without waiting for Python to issue ~3,000 kernels.

A packed row (train.micro_batches) is copied into the static buffers of the graph for its shape:
the smallest captured length that holds it (a multiple of BUCKET tokens) and a number of sample
slots (a power of two, at least 8): flash attention's grid is sized by the slots, so one graph for
64 slots would run ~8x the attention blocks of a row of 7 samples. The spare tokens form one more
sample with no loss, spare sample slots are empty (zero-length), spare loss slots have no target.
The pass's dropout seed lives on the device (lean_lora.begin_forward), so every replay draws new masks.

Used only where it is safe: CUDA, lean LoRA on every projection, Triton available. Anything
else, or a row with more samples than MAX_SAMPLES, runs eagerly.
"""

from __future__ import annotations

import torch

from .kernels import next_pow2

BUCKET = 256
MAX_SAMPLES = 64
CAPTURE_AFTER = 3  # rows run eagerly this often before the first capture: short runs pay no capture. Later
# shapes are captured at first sight, into the same memory pool: eager passes beside the pool would hold
# a second set of activations in the allocator's cache
MAX_TOKENS = 16384  # longer rows keep the GPU busy on their own, and a second memory pool would not fit


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
        self.seen: dict[tuple, int] = {}

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
        saved = [p.grad for p in self.params]
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
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self.loss_fn(static)
            loss.backward()
        self.pool = graph.pool()
        grads = [p.grad for p in self.params]
        for p, g in zip(self.params, saved):
            p.grad = g
        return graph, static, loss, grads

    def row(self, batch: dict):
        """(summed loss, gradients) of one packed row (window() has checked that it fits a graph)."""
        shape = shape_of(batch)
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(shape, batch)
        graph, static, loss, grads = self.graphs[shape]
        self._fill(static, batch)
        graph.replay()
        return loss, grads

    def window(self, rows: list[dict], scale: float):
        """Loss (times scale) of a window of rows; leaves the window's gradient (times scale) in .grad.
        Returns None (nothing done) when some row cannot be replayed: the caller runs it eagerly."""
        if self.broken or any(len(r.get("cu_seq_lens_q", ())) - 1 not in range(1, MAX_SAMPLES) for r in rows):
            return None
        shapes = [shape_of(r) for r in rows]
        if max(length for length, _ in shapes) > MAX_TOKENS:
            return None
        for shape in shapes:
            self.seen[shape] = self.seen.get(shape, 0) + 1
        if not self.graphs and any(self.seen[shape] <= CAPTURE_AFTER for shape in shapes):
            return None
        try:
            if len(rows) == 1:
                total, acc = self.row(rows[0])
            else:  # several rows: sum their gradients (each replay overwrites its graph's own)
                total, acc = None, None
                for batch in rows:
                    loss, grads = self.row(batch)
                    if acc is None:
                        total, acc = loss.clone(), [g.clone() for g in grads]
                    else:
                        total += loss
                        torch._foreach_add_(acc, grads)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # a kernel that cannot be captured, or no room
            from .models import log

            self.broken = True
            log(f"CUDA graphs off ({str(e).splitlines()[0][:120]}); running eagerly")
            for p in self.params:
                p.grad = None
            return None
        torch._foreach_mul_(acc, scale)
        for p, g in zip(self.params, acc):
            p.grad = g
        return total * scale


def usable(model, device) -> bool:
    """CUDA, Triton, and every LoRA projection on the lean path (its dropout seeded from the device)."""
    from . import kernels, lean_lora

    return str(device).startswith("cuda") and kernels.available() and lean_lora.all_lean(model)
