"""The fast path. Each switch has a safe fallback and a CPU-runnable test against the plain path.

- Padding-free packing: the samples of one accumulation window are concatenated into one row;
  attention runs per sample ("document attention") with the causal flash/SDPA kernel on each
  slice, so no sample sees another and no (tokens x tokens) mask is ever built.
- Fused kernels from Liger (RMSNorm, SwiGLU, RoPE) where it is installed and the model runs on CUDA.
- Loss only at answer positions, in recomputed chunks: the [tokens, vocab] logits never exist.
- Mixed precision for the adapter: half-precision matmuls on the activations, float32 master weights.
- Activation checkpointing on a chosen share of the layers, only where memory requires it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DOC_ATTENTION = "tunesmith_doc"
_registered = False


@functools.cache
def varlen_kernel():
    """PyTorch's flash varlen attention (torch >= 2.10, CUDA) and how to ask it for causal + GQA.
    Looked up on first use: importing it pulls in torch._dynamo (seconds of start-up)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)} if "window_size" in params else None
    if causal is None:
        return None
    return varlen_attn, causal, "enable_gqa" in params


_varlen_failed = False


def document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed sample. query: [b, heads, T, d]; key/value: [b, kv_heads, T, d].
    `cu_seq_lens_q` (sample boundaries, as flash-attn's varlen API) arrives through the model's kwargs.
    On CUDA one flash varlen kernel does all samples; elsewhere SDPA runs on each sample's slice."""
    global _varlen_failed
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        bounds = torch.tensor([0, query.shape[2]], dtype=torch.int32, device=query.device)
    gqa = query.shape[1] != key.shape[1]
    longest = kwargs.get("max_length_q")
    if query.is_cuda and query.shape[0] == 1 and longest and not _varlen_failed and varlen_kernel() is not None:
        varlen_attn, causal, native_gqa = varlen_kernel()
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
        if gqa and not native_gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = {"enable_gqa": True} if gqa and native_gqa else {}
        try:  # boundaries already on the device and the longest sample as an int: no host sync
            out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling, **causal, **extra)
            return out.unsqueeze(0), None
        except (RuntimeError, TypeError, NotImplementedError) as e:  # dtype/head size the kernel lacks
            _varlen_failed = True
            from .models import log

            log(f"flash varlen attention unavailable ({str(e).splitlines()[0][:100]}); using per-sample SDPA")
    edges = bounds.tolist()
    outs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       scale=scaling, enable_gqa=gqa)
        for s, e in zip(edges[:-1], edges[1:])
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


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


def mixed_precision(model, dtype, device):
    """On CUDA with a bf16/fp16 base: autocast, and PEFT's cast of every LoRA input to the adapter's
    float32 turned off. The adapter keeps float32 master weights; its matmuls run in half precision
    on the half-precision activations, with no full-size float32 copies of them."""
    import contextlib

    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    if not getattr(model, "_tunesmith_no_input_cast", False):
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
        model._tunesmith_no_input_cast = True
    return torch.autocast("cuda", dtype=dtype)


def chunked_cross_entropy(hidden, head, targets, chunk: int = 8192):
    """sum of CE(head(hidden), targets). Above `chunk` rows the logits are made and dropped one chunk
    at a time and recomputed in backward: memory for one chunk of logits instead of all of them."""
    from torch.utils.checkpoint import checkpoint

    def part(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    if hidden.shape[0] <= chunk:
        return part(hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(part, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
    return total


def apply_liger(model) -> list[str]:
    """Liger's fused RMSNorm/SwiGLU/RoPE for the model's architecture; [] when not available."""
    try:
        import liger_kernel.transformers as lk
    except ImportError:
        return []
    arch = getattr(model.config, "model_type", "")
    patch = getattr(lk, f"apply_liger_kernel_to_{arch}", None)
    if patch is None:
        return []
    try:
        patch(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:  # an unsupported combination: stay on the plain path
        from .models import log

        log(f"Liger kernels not applied ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return []
    return ["rms_norm", "swiglu", "rope"]


# Bytes of saved activations per token per layer, in units of hidden_size x element size; measured
# on the Qwen2.5-7B architecture on an H100 (bench/RESULTS.md): with Liger kernels and without.
ACTIVATION_WIDTH = {True: 36, False: 52}


def activation_bytes(layers: int, hidden: int, elt: int, tokens: int, checkpointed: int, liger: bool) -> int:
    """Saved activations of one forward pass of `tokens` tokens with `checkpointed` of the `layers`
    layers recomputed in backward (one layer's full activations exist during its recompute)."""
    full = ACTIVATION_WIDTH[liger] * hidden * elt * tokens  # one layer, nothing recomputed
    kept = hidden * elt * tokens  # one checkpointed layer keeps only its input
    return (layers - checkpointed) * full + checkpointed * kept + (full if checkpointed else 0)


def fewest_checkpointed(layers: int, hidden: int, elt: int, tokens: int, liger: bool, budget: float) -> int:
    """The fewest layers to checkpoint so the activations fit in `budget` bytes (all of them if none fits)."""
    return next((k for k in range(layers + 1) if activation_bytes(layers, hidden, elt, tokens, k, liger) <= budget), layers)


def plan_checkpointing(model, tokens: int | None, liger: bool, reserve: int = 0) -> float:
    """The smallest share of layers to checkpoint so that the activations of the largest forward
    pass fit in 85% of the free GPU memory less `reserve` bytes (the loss's logits: planner.loss_bytes)
    (checkpointing costs a second forward of those layers)."""
    from .models import log

    if not tokens or not torch.cuda.is_available():
        return 1.0
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    elt = next(model.parameters()).element_size()
    free = (torch.cuda.mem_get_info()[0] - reserve) * 0.85
    k = fewest_checkpointed(layers, hidden, elt, tokens, liger, free)
    need = activation_bytes(layers, hidden, elt, tokens, k, liger)
    if need <= free:
        log(f"activations of {tokens} tokens need ~{need / 2**30:.1f} GiB with {k} of {layers} layers "
            f"checkpointed ({free / 2**30:.0f} GiB usable)")
    return k / layers


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def checkpoint_layers(model, share: float) -> int:
    """Recompute activations in `share` (0..1) of the decoder layers, spread evenly; returns how many.
    Our own wrapper around torch.utils.checkpoint (non-reentrant, RNG state kept so dropout masks
    repeat): the same on every transformers version, and no hooks run twice."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    n = round(share * len(layers))
    chosen = {round(i * len(layers) / n) for i in range(n)} if n else set()
    for i, layer in enumerate(layers):
        plain = layer.__dict__.pop("_tunesmith_plain_forward", None)
        if plain is not None:  # undo an earlier choice
            layer.forward = plain
        if i not in chosen:
            continue
        plain = layer.forward

        def forward(*args, _plain=plain, _layer=layer, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        layer._tunesmith_plain_forward = plain
        layer.forward = forward
    return len(chosen)
