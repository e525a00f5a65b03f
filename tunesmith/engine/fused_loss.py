"""The loss only at answer positions, in recomputed chunks: the [tokens, vocab] logits never exist."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


def chunked_cross_entropy(hidden, head, targets, chunk: int = 8192):
    """sum of CE(head(hidden), targets). Above `chunk` rows the logits are made and dropped one chunk
    at a time and recomputed in backward: memory for one chunk of logits instead of all of them.
    The general path (a head with trainable parameters); `linear_cross_entropy` is the fast one."""
    from torch.utils.checkpoint import checkpoint

    def part(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    if hidden.shape[0] <= chunk:
        return part(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """CE(hidden W^T, targets) of each row, for a frozen W (0 where the target is negative). The gradient of
    `hidden` is worked out in the same pass over each chunk of logits (softmax - one-hot, times W), so backward
    only scales it: no [rows, vocab] tensor outlives its chunk and nothing is recomputed. On CUDA one Triton kernel
    (kernels.cross_entropy_) turns a chunk's half-precision logits into its losses and, in place, softmax - one-hot,
    in float32 arithmetic; elsewhere the float32 logits become the softmax in place: one float32 and one
    half-precision copy at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], rows):
                h, t = hidden[i:i + rows].to(weight.dtype), targets[i:i + rows]
                if _triton(h):  # one kernel: the loss, and softmax - one-hot over the half-precision logits
                    logits = h @ weight.t()
                    losses[i:i + rows] = kernels.cross_entropy_(logits, t, want_grad)
                    if want_grad:
                        grad[i:i + rows] = logits @ weight
                    del logits
                    continue
                valid = t >= 0  # a negative target (-100) marks a row without loss
                t = t.clamp(min=0)
                logits = h @ weight.t()
                picked = logits.gather(1, t[:, None]).squeeze(1).float()
                probs = logits.float()
                del logits
                top = probs.amax(dim=-1, keepdim=True)
                sums = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                losses[i:i + rows] = (lse - picked) * valid
                if want_grad:
                    probs.div_(sums)
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    part = probs.to(weight.dtype) @ weight
                    grad[i:i + rows] = (part * valid[:, None].to(part.dtype)).to(grad.dtype)
                del probs
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g[:, None].to(grad.dtype), None, None, None


_triton = kernels.runs_on


LOSS_CHUNK_BYTES = 2**27  # float32 logits of the fused loss held at once


def loss_chunk_rows(vocab: int, budget_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Rows of float32 logits per chunk of the fused loss (planner.loss_bytes counts the same)."""
    return max(64, budget_bytes // (4 * vocab))


def linear_cross_entropy(hidden, head, targets, budget_bytes: int = LOSS_CHUNK_BYTES):
    """sum of CE(head(hidden), targets). A plain frozen linear head takes the fused path, with
    float32 logits for at most `budget_bytes` at a time; anything else the chunked autograd one."""
    if not fusable(head):
        return chunked_cross_entropy(hidden, head, targets)
    return linear_token_nll(hidden, head, targets, budget_bytes).sum()


def fusable(head) -> bool:
    """A plain frozen linear head: the fused loss computes its gradient as it goes."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def linear_token_nll(hidden, head, targets, budget_bytes: int = LOSS_CHUNK_BYTES):
    """-log p(target) of each row through a fusable head, float32 logits for at most `budget_bytes` at a time
    (rlhf's per-token log-probabilities: the same memory as sft's loss)."""
    return _LinearCrossEntropy.apply(hidden, head.weight, targets, loss_chunk_rows(head.weight.shape[0], budget_bytes))
