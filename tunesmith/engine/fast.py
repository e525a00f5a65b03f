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

import torch
import torch.nn.functional as F

DOC_ATTENTION = "tunesmith_doc"
_registered = False


class FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed samples: q [T, heads, d], k/v [T, kv_heads, d] (grouped-query
    attention natively: k and v are never repeated to the query's head count), boundaries `bounds`
    (int32 on the device) and the longest sample `longest` (an int, so no host sync). PyTorch's own
    flash kernels (aten._flash_attention_forward/backward), the ones behind SDPA and varlen_attn."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, longest, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, bounds, bounds, longest, longest, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bounds, rng, unused)
        ctx.longest, ctx.scale = longest, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, bounds, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, bounds, bounds, ctx.longest, ctx.longest, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


def flash_usable(q: torch.Tensor) -> bool:
    """Flash attention runs here: a CUDA tensor in bf16/fp16 with a head size it supports."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


_varlen_failed = False


def varlen_attention(q, k, v, bounds, longest: int | None, scale=None):
    """Causal attention within each packed sample. q: [T, heads, d]; k, v: [T, kv_heads, d]; returns
    [T, heads, d]. Flash on CUDA; elsewhere SDPA on each sample's slice."""
    global _varlen_failed
    if longest and not _varlen_failed and flash_usable(q):
        try:
            return FlashVarlen.apply(q, k, v, bounds, int(longest), scale)
        except (RuntimeError, TypeError, NotImplementedError) as e:  # a build without flash kernels
            _varlen_failed = True
            from ..model.load import log

            log(f"flash attention unavailable ({str(e).splitlines()[0][:100]}); using per-sample SDPA")
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, d]
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


def document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed sample. query: [b, heads, T, d]; key/value: [b, kv_heads, T, d].
    `cu_seq_lens_q` (sample boundaries, as flash-attn's varlen API) arrives through the model's kwargs."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        bounds = torch.tensor([0, query.shape[2]], dtype=torch.int32, device=query.device)
    if query.shape[0] == 1:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
        return varlen_attention(q, k, v, bounds, kwargs.get("max_length_q"), scaling).unsqueeze(0), None
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
    """sum of CE(hidden W^T, targets) for a frozen W. The gradient of `hidden` is worked out in the
    same pass over each chunk of logits (softmax - one-hot, times W), so backward only scales it:
    no [rows, vocab] tensor outlives its chunk and nothing is recomputed. Within a chunk the float32
    logits become the softmax in place: one float32 and one half-precision copy at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], rows):
                h, t = hidden[i:i + rows].to(weight.dtype), targets[i:i + rows]
                valid = t >= 0  # a negative target (-100) marks a row without loss
                t = t.clamp(min=0)
                logits = h @ weight.t()
                picked = logits.gather(1, t[:, None]).squeeze(1).float()
                probs = logits.float()
                del logits
                top = probs.amax(dim=-1, keepdim=True)
                sums = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
                lse = (top + sums.log()).squeeze(1)
                total += ((lse - picked) * valid).sum()
                if want_grad:
                    probs.div_(sums)
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    part = probs.to(weight.dtype) @ weight
                    grad[i:i + rows] = (part * valid[:, None].to(part.dtype)).to(grad.dtype)
                del probs
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


LOSS_CHUNK_BYTES = 2**27  # float32 logits of the fused loss held at once


def loss_chunk_rows(vocab: int, budget_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Rows of float32 logits per chunk of the fused loss (planner.loss_bytes counts the same)."""
    return max(64, budget_bytes // (4 * vocab))


def linear_cross_entropy(hidden, head, targets, budget_bytes: int = LOSS_CHUNK_BYTES):
    """sum of CE(head(hidden), targets). A plain frozen linear head takes the fused path, with
    float32 logits for at most `budget_bytes` at a time; anything else the chunked autograd one."""
    plain = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    if not plain:
        return chunked_cross_entropy(hidden, head, targets)
    return _LinearCrossEntropy.apply(hidden, head.weight, targets, loss_chunk_rows(head.weight.shape[0], budget_bytes))


def apply_liger(model, swiglu: bool = True) -> list[str]:
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
        patch(model=model, rope=True, rms_norm=True, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:  # an unsupported combination: stay on the plain path
        from ..model.load import log

        log(f"Liger kernels not applied ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return []
    return ["rms_norm", "rope"] + (["swiglu"] if swiglu else [])


# Bytes of saved activations per token per layer, in units of hidden_size x element size, by
# (Liger kernels, lean LoRA); measured on the Qwen2.5-7B architecture on an H100 (bench/RESULTS.md).
ACTIVATION_WIDTH = {(True, True): 20, (False, True): 28, (True, False): 35, (False, False): 52}
MARGIN_WIDTH = 6  # gradients in flight between layers, residual sums: a few more hidden-wide tensors
QUANTIZED_EXTRA_WIDTH = 4  # a bitsandbytes 4/8-bit base keeps a little more per layer (measured: 39 vs 35)


def activation_bytes(layers: int, hidden: int, elt: int, tokens: int, checkpointed: int, liger: bool,
                     lean: bool = True, quantized: bool = False) -> int:
    """Saved activations of one forward pass of `tokens` tokens with `checkpointed` of the `layers`
    layers recomputed in backward (one layer's full activations exist during its recompute)."""
    width = ACTIVATION_WIDTH[(liger, lean)] + (QUANTIZED_EXTRA_WIDTH if quantized else 0)
    full = width * hidden * elt * tokens  # one layer, nothing recomputed
    kept = hidden * elt * tokens  # one checkpointed layer keeps only its input
    margin = MARGIN_WIDTH * hidden * elt * tokens
    return (layers - checkpointed) * full + checkpointed * kept + (full if checkpointed else 0) + margin


def fewest_checkpointed(layers: int, hidden: int, elt: int, tokens: int, liger: bool, lean: bool, budget: float,
                        quantized: bool = False) -> int:
    """The fewest layers to checkpoint so the activations fit in `budget` bytes (all of them if none fits)."""
    fits = (k for k in range(layers + 1)
            if activation_bytes(layers, hidden, elt, tokens, k, liger, lean, quantized) <= budget)
    return next(fits, layers)


def usable_for_activations(model, reserve: int = 0, budget: int | None = None) -> float:
    """GPU bytes left for activations: `budget` in all less what is allocated now, else 85% of what is free,
    less `reserve` (the loss) and the adapter's gradients and AdamW states (12 bytes a trainable parameter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if budget is None:
        return (torch.cuda.mem_get_info()[0] - reserve - 12 * trainable) * 0.85
    return budget - torch.cuda.memory_allocated() - reserve - 12 * trainable


def plan_checkpointing(model, tokens: int | None, liger: bool, lean: bool = False, reserve: int = 0,
                       budget: int | None = None) -> float:
    """The smallest share of layers to checkpoint so that the activations of the largest forward
    pass fit: in `budget` bytes of GPU memory in all, or else in 85% of what is free now, less
    `reserve` bytes (the loss's logits: planner.loss_bytes) and the adapter's gradients and AdamW
    states (checkpointing costs a second forward of those layers)."""
    from ..model.load import log

    if not tokens or not torch.cuda.is_available():
        return 1.0
    cfg = model.config
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    elt = next(model.parameters()).element_size()
    free = usable_for_activations(model, reserve, budget)
    quantized = bool(getattr(cfg, "quantization_config", None))
    k = fewest_checkpointed(layers, hidden, elt, tokens, liger, lean, free, quantized)
    need = activation_bytes(layers, hidden, elt, tokens, k, liger, lean, quantized)
    if need <= free:
        log(f"activations of {tokens} tokens need ~{need / 2**30:.1f} GiB with {k} of {layers} layers "
            f"checkpointed ({free / 2**30:.1f} GiB usable)")
    return k / layers


def lean_layer_widths(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int):
    """What one lean decoder layer (lean_layer.py) keeps per token, in hidden-widths: (with nothing
    recomputed, less per recompute level, transient while one layer runs backward)."""
    attention = (2 * heads * head_dim + 2 * kv_heads * head_dim) / hidden  # q and the output, k and v
    mlp = intermediate / hidden  # gate or up
    return 2 + attention + 2 * mlp, mlp, 3 * mlp + 4  # + x and h; transient: the product, its gradient, a recompute


def lean_activation_bytes(widths: tuple, unit: float, levels: list[int], checkpointed: set) -> float:
    """Saved activations of lean layers at these recompute levels with these layers checkpointed (a
    checkpointed layer keeps its input; one at a time is recomputed, at level 2); unit = one hidden-width
    of one layer (hidden x element size x tokens)."""
    full, mlp, transient = widths
    kept = sum(full - lv * mlp for i, lv in enumerate(levels) if i not in checkpointed)
    kept += len(checkpointed) + ((full - 2 * mlp) if checkpointed else 0)
    return (kept + transient) * unit


def choose_recompute(layers: int, widths: tuple, unit: float, free: float) -> tuple[list[int], set]:
    """The least recompute whose activations fit `free` bytes, cheapest first: `up` recomputed layer by
    layer (one matmul each), then `gate` too, then whole layers checkpointed (all of them if nothing fits)."""
    def spread(k):
        return {round(i * layers / k) for i in range(k)} if k else set()

    plans = []
    for u in range(2 * layers + 1):
        ones, twos = (spread(u), set()) if u <= layers else (set(range(layers)), spread(u - layers))
        plans.append(([2 if i in twos else 1 if i in ones else 0 for i in range(layers)], set()))
    plans += [([2] * layers, spread(k)) for k in range(1, layers + 1)]
    return next((p for p in plans if lean_activation_bytes(widths, unit, *p) <= free), plans[-1])


def config_widths(config) -> tuple:
    heads = config.num_attention_heads
    return lean_layer_widths(config.hidden_size, config.intermediate_size, heads, config.num_key_value_heads,
                             getattr(config, "head_dim", None) or config.hidden_size // heads)


def plan_memory(model, tokens: int | None, reserve: int = 0, budget: int | None = None) -> tuple[list[int], int]:
    """For a model on lean decoder layers: the least recompute that fits the activations of `tokens`
    tokens in `budget` bytes in all (else 85% of what is free now), less `reserve` (the loss) and the
    adapter's gradients and AdamW states. Returns (recompute level per layer, how many layers to checkpoint)."""
    from ..model.load import log

    n = len(decoder_layers(model))
    if not tokens or not torch.cuda.is_available():
        return [0] * n, 0
    elt = next(model.parameters()).element_size()
    free = usable_for_activations(model, reserve, budget)
    widths, unit = config_widths(model.config), model.config.hidden_size * elt * tokens
    levels, checkpointed = choose_recompute(n, widths, unit, free)
    need = lean_activation_bytes(widths, unit, levels, checkpointed)
    if need <= free:
        log(f"activations of {tokens} tokens need ~{need / 2**30:.1f} GiB ({free / 2**30:.1f} GiB usable): up "
            f"recomputed in {sum(lv >= 1 for lv in levels)} layers, gate in {sum(lv == 2 for lv in levels)}, "
            f"{len(checkpointed)} of {n} layers checkpointed")
    return levels, len(checkpointed)


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def checkpoint_layers(model, share: float, preserve_rng: bool = True) -> int:
    """Recompute activations in `share` (0..1) of the decoder layers, spread evenly; returns how many.
    Our own wrapper around torch.utils.checkpoint (non-reentrant; the RNG state is kept so that
    dropout masks repeat, unless the layers draw none from it, as with lean LoRA, whose masks come
    from their own seeds, and which a CUDA graph needs): the same on every transformers version,
    and no hooks run twice."""
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
                return checkpoint(_plain, *args, use_reentrant=False, preserve_rng_state=preserve_rng, **kwargs)
            return _plain(*args, **kwargs)

        layer._tunesmith_plain_forward = plain
        layer.forward = forward
    return len(chosen)
