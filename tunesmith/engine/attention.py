"""Per-sample attention over a packed row ("document attention"): the causal flash/SDPA kernel on each
sample's slice, so no sample sees another and no (tokens x tokens) mask is ever built; registered with
transformers' attention interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ..console import log


DOC_ATTENTION = "tunesmith_doc"
_registered = False
_varlen_failed = False


class FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed samples: q [T, heads, d], k/v [T, kv_heads, d] (grouped-query
    attention natively: k and v are never repeated to the query's head count), boundaries `bounds`
    (int32 on the device) and the longest sample `longest` (an int, so no host sync); a sliding-window layer
    attends to its last `window` tokens only (itself included, as transformers' sliding_window_overlay). PyTorch's
    own flash kernels (aten._flash_attention_forward/backward), the ones behind SDPA and varlen_attn."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, longest, scale, window=None):
        band = {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scale, **band)
        ctx.save_for_backward(q, k, v, out, lse, bounds, rng, unused)
        ctx.longest, ctx.scale, ctx.band = longest, scale, band
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, bounds, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, bounds, bounds, ctx.longest, ctx.longest, 0.0, True, rng, unused,
            scale=ctx.scale, **ctx.band)
        return dq, dk, dv, None, None, None, None


def flash_usable(q: torch.Tensor) -> bool:
    """Flash attention runs here: a CUDA tensor in bf16/fp16 with a head size it supports."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def effective_window(window: int | None, longest: int | None) -> int | None:
    """A sliding window that matters: None when no sample is longer than it (plain causal attention is the same)."""
    return window if window and (longest is None or int(longest) > window) else None


def varlen_attention(q, k, v, bounds, longest: int | None, scale=None, window: int | None = None):
    """Causal attention within each packed sample, over its last `window` tokens where a sliding-window layer
    sets one. q: [T, heads, d]; k, v: [T, kv_heads, d]; returns [T, heads, d]. Flash on CUDA; elsewhere SDPA on
    each sample's slice."""
    global _varlen_failed
    window = effective_window(window, longest)
    if longest and not _varlen_failed and flash_usable(q):
        try:
            return FlashVarlen.apply(q, k, v, bounds, int(longest), scale, window)
        except (RuntimeError, TypeError, NotImplementedError) as e:  # a build without flash kernels
            _varlen_failed = True

            log(f"flash attention unavailable ({str(e).splitlines()[0][:100]}); using per-sample SDPA")
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, d]
    if window is not None:
        return _per_sample_banded(q, k, v, bounds, scale, window, None)[0].transpose(0, 1)
    return _per_sample_sdpa(q, k, v, bounds, scale)[0].transpose(0, 1)


def _per_sample_sdpa(query, key, value, bounds, scale):
    """SDPA, causal, on each sample's slice of [b, heads, T, d] tensors; [b, heads, T, d]."""
    edges = bounds.tolist()
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       scale=scale, enable_gqa=query.shape[1] != key.shape[1])
        for s, e in zip(edges[:-1], edges[1:])
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _per_sample_banded(query, key, value, bounds, scale, window, softcap):
    """As _per_sample_sdpa, for layers that attend to the last `window` tokens only (sliding-window layers:
    Gemma 2/3, Mistral, Qwen3 where set) and/or cap their logits at `softcap` (Gemma 2): the masks and the
    softcapping of transformers' eager attention, on each sample's slice."""
    edges = bounds.tolist()
    groups = query.shape[1] // key.shape[1]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    outs = []
    for s, e in zip(edges[:-1], edges[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        pos = torch.arange(e - s, device=q.device)
        allowed = pos[None, :] <= pos[:, None]
        if window:
            allowed &= pos[:, None] - pos[None, :] < window  # as transformers' sliding_window_overlay
        if softcap is None:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale))
            continue
        scores = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
        outs.append(weights @ v)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                       softcap=None, **kwargs):
    """Causal attention within each packed sample. query: [b, heads, T, d]; key/value: [b, kv_heads, T, d].
    `cu_seq_lens_q` (sample boundaries, as flash-attn's varlen API) arrives through the model's kwargs;
    a sliding-window layer's window and Gemma 2's logit softcap arrive from the attention module (Qwen2-MoE's passes
    no window: its sliding layers carry one, which transformers applies through the mask)."""
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        bounds = torch.tensor([0, query.shape[2]], dtype=torch.int32, device=query.device)
    longest = kwargs.get("max_length_q") or query.shape[2]
    window = effective_window(sliding_window, longest)
    if softcap or (window and query.shape[0] != 1):
        out = _per_sample_banded(query, key, value, bounds, scaling, window, softcap)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] == 1:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
        return varlen_attention(q, k, v, bounds, kwargs.get("max_length_q"), scaling, window).unsqueeze(0), None
    return _per_sample_sdpa(query, key, value, bounds, scaling).transpose(1, 2).contiguous(), None


def use_document_attention(model) -> None:
    """Route the model's attention through document_attention (transformers' attention registry)."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not _registered:
        AttentionInterface.register(DOC_ATTENTION, document_attention)
        AttentionMaskInterface.register(DOC_ATTENTION, lambda *args, **kwargs: None)  # no mask: slices are causal
        _registered = True
    model.set_attn_implementation(DOC_ATTENTION)
