"""The lean decoder layer: a llama/qwen2-style decoder layer with LoRA on all seven projections, as
three autograd functions, for packed rows (train.micro_batches) in training.

    x -> RMSNorm -> q, k, v (LoRA) [-> per-head RMSNorm of q, k: Qwen3] -> RoPE -> flash attention -> o (LoRA) -> + x = h
    h -> RMSNorm -> gate, up (LoRA) -> silu(gate) * up -> down (LoRA) -> + h

What backward keeps, per token, in hidden-widths (Qwen2.5-7B): the layer input x and h (2), q, k,
v and the attention output (2.3, kept by flash attention for its own backward), gate and up (10.6):
about 15, against 19 for lean LoRA projections inside transformers' layer and 35 for PEFT's. The
RMSNorm outputs are recomputed from x and h (an elementwise pass), the dropout masks are redrawn
from seeds (lora_linear.begin_forward), every LoRA intermediate is r wide, and k and v are never
repeated to the query's head count.

Per layer, `layer._tunesmith_recompute` (chosen by activation_memory.plan_memory, only where memory needs it)
trades one more matmul in backward for memory: 1 recomputes `up` (5.3 widths fewer), 2 recomputes
`gate` and `up` (10.6 fewer). Whole-layer checkpointing (checkpointing.checkpoint_layers) comes after that.

On CUDA the LoRA side runs in Triton kernels (kernels.lora_a, lora_a_grad, lora_dx_add: one pass
over the shared input per projection, masks drawn inside, never stored), as do RMSNorm and RoPE;
on the CPU the same maths runs in plain torch (tests/test_fast.py compares it with transformers +
PEFT). The adapter stays PEFT's: the functions read and write its lora_A/lora_B parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attention, checkpointing, kernels
from .lora_linear import is_lora_linear, keep_mask, lora_parts, pass_seed

STEP = 65_537  # seed distance between the projections of one group (as use_lean_lora numbers them)
ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Group:
    """Projections that share one input: their LoRA scales, dropout p, and the seed offset of the first
    (projection i draws its mask from offset + i * STEP)."""

    scales: tuple
    p: float
    offset: int
    eps: float = 1e-6  # of the RMSNorm in front, if any


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda and kernels.available()


# ---------------------------------------------------------------------------------------------
# The pieces, each with a Triton path (CUDA) and a torch path (anywhere)


def lora_a(x, a, g: Group):
    """x [T, K], a [P, R, K] -> [T, P*R]: dropout_i(x) A_i^T for each projection i, side by side."""
    P, R, K = a.shape
    if g.p == 0:
        return x @ a.reshape(P * R, K).to(x.dtype).t()
    if _triton(x):
        return kernels.lora_a(x, a, g.p, pass_seed(x, g.offset), STEP)
    return torch.cat([(x * keep_mask(x, g.p, pass_seed(x, g.offset + i * STEP))) @ a[i].to(x.dtype).t()
                      for i in range(P)], 1)


def lora_a_grad(x, gb, P: int, g: Group):
    """x [T, K], gb [T, P*R] -> float32 [P, R, K]: gb_i^T dropout_i(x)."""
    T, K = x.shape
    R = gb.shape[1] // P
    if g.p == 0:
        return (gb.t() @ x).float().view(P, R, K)
    if _triton(x):
        return kernels.lora_a_grad(x, gb, P, g.p, pass_seed(x, g.offset), STEP)
    return torch.stack([(gb[:, i * R:(i + 1) * R].t() @ (x * keep_mask(x, g.p, pass_seed(x, g.offset + i * STEP)))).float()
                        for i in range(P)])


def lora_dx_add(dx, gb, a, g: Group):
    """dx [T, K] += sum_i dropout_i(gb_i A_i), in place."""
    P, R, K = a.shape
    if g.p == 0:
        return dx.addmm_(gb, a.reshape(P * R, K).to(dx.dtype))
    if _triton(dx):
        return kernels.lora_dx_add(dx, gb, a, g.p, pass_seed(dx, g.offset), STEP)
    for i in range(P):
        dx.add_((gb[:, i * R:(i + 1) * R] @ a[i].to(dx.dtype)) * keep_mask(dx, g.p, pass_seed(dx, g.offset + i * STEP)))
    return dx


def rms_norm(x, w, eps: float):
    """(transformers' RMSNorm of x [T, N], float32 1/rms per row)."""
    if _triton(x):
        return kernels.rms_norm(x, w, eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (w * (xf * rstd[:, None]).to(x.dtype)).to(x.dtype), rstd


def rms_norm_backward(dy, x, w, rstd):
    if _triton(x):
        return kernels.rms_norm_backward(dy, x, w, rstd)
    normed = x.float() * rstd[:, None]
    dn = dy.float() * w.float()
    return (rstd[:, None] * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x.dtype)


def rope(x, cos, sin, backward: bool = False):
    """Rotate-half rotary embedding of x [T, heads, d] by cos/sin [T, d] (backward: its transpose)."""
    d = x.shape[-1]
    if _triton(x) and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0:
        return kernels.rope(x, cos, sin, backward)
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if backward:
        xs = x * s
        return x * c + torch.cat((xs[..., d // 2:], -xs[..., :d // 2]), -1)
    return x * c + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * s


def swiglu(gate, up):
    if _triton(gate):
        return kernels.swiglu(gate, up)[0]
    return F.silu(gate) * up


def swiglu_backward(gate, up, grad_c):
    """Gradients of gate and up; written over gate and up (tensors not needed again)."""
    if _triton(gate):
        return kernels.swiglu_backward(gate, up, grad_c)
    sig = torch.sigmoid(gate)
    return grad_c * up * sig * (1 + gate * (1 - sig)), grad_c * gate * sig


def _project(y, h, weight, bias, b, scale, i, rank):
    """Projection i of a group: y W^T + bias + scale * H_i B^T."""
    out = F.linear(y, weight, None if bias is None else bias.to(weight.dtype))
    return out.addmm_(h[:, i * rank:(i + 1) * rank], b.to(weight.dtype).t(), alpha=scale)


def _group_backward(y, grads, h, a, weights, bs, g: Group, need_input: bool):
    """(gradient of the group's input or None, grad A [P, R, K] float32, [grad B_i float32])."""
    P, R, _ = a.shape
    dtype = weights[0].dtype
    gb = torch.cat([(grads[i] @ bs[i].to(dtype)) * g.scales[i] for i in range(P)], 1)
    grad_b = [((grads[i].t() @ h[:, i * R:(i + 1) * R]) * g.scales[i]).float() for i in range(P)]
    grad_a = lora_a_grad(y, gb, P, g)
    dy = None
    if need_input:
        dy = grads[0] @ weights[0]
        for i in range(1, P):
            dy.addmm_(grads[i], weights[i])
        lora_dx_add(dy, gb, a, g)
    return dy, grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# The autograd functions


class Projections(torch.autograd.Function):
    """[RMSNorm ->] P LoRA projections of one input x [T, K]; keeps x, 1/rms and the r-wide H."""

    @staticmethod
    def forward(ctx, x, norm_weight, g: Group, *params):  # params: weight, bias, A, B of each projection
        weights, biases, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        dtype = weights[0].dtype
        with torch.autocast(x.device.type, enabled=False):
            y, rstd = rms_norm(x, norm_weight, g.eps) if norm_weight is not None else (x, None)
            y = y.to(dtype)
            a = torch.stack(As)
            h = lora_a(y, a, g)
            outs = tuple(_project(y, h, weights[i], biases[i], Bs[i], g.scales[i], i, a.shape[1])
                         for i in range(len(weights)))
        ctx.save_for_backward(x, norm_weight, rstd, h, a, *weights, *Bs)
        ctx.g, ctx.n = g, len(weights)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        x, norm_weight, rstd, h, a, *rest = ctx.saved_tensors
        n, g = ctx.n, ctx.g
        weights, bs = rest[:n], rest[n:]
        dtype = weights[0].dtype
        with torch.autocast(x.device.type, enabled=False):
            y = rms_norm(x, norm_weight, g.eps)[0].to(dtype) if norm_weight is not None else x.to(dtype)
            grads = [gr.to(dtype) for gr in grads]
            dy, grad_a, grad_b = _group_backward(y, grads, h, a, weights, bs, g, ctx.needs_input_grad[0])
            del y
            dx = None
            if dy is not None:
                dx = rms_norm_backward(dy, x, norm_weight, rstd) if norm_weight is not None else dy
        out = [None if dx is None else dx.to(x.dtype), None, None]
        for i in range(n):
            out += [None, None, grad_a[i], grad_b[i]]
        return tuple(out)


class Mlp(torch.autograd.Function):
    """RMSNorm -> gate/up (LoRA) -> silu(gate) * up -> down (LoRA), for h [T, hidden]. Keeps h, 1/rms,
    gate and up (unless `recompute` says to make them again in backward) and the r-wide H's; the
    [T, intermediate] product silu(gate) * up is recomputed, never kept."""

    @staticmethod
    def forward(ctx, h, norm_weight, gu: Group, down: Group, recompute: int,
                wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d):
        dtype = wg.dtype
        with torch.autocast(h.device.type, enabled=False):
            y = rms_norm(h, norm_weight, gu.eps)[0].to(dtype)
            a_gu = torch.stack((ag, au))
            r = a_gu.shape[1]
            h_gu = lora_a(y, a_gu, gu)
            gate = _project(y, h_gu, wg, bg, b_g, gu.scales[0], 0, r)
            up = _project(y, h_gu, wu, bu, b_u, gu.scales[1], 1, r)
            del y
            c = swiglu(gate, up)
            a_d = ad[None]
            h_d = lora_a(c, a_d, down)
            out = _project(c, h_d, wd, bd, b_d, down.scales[0], 0, r)
            del c
        ctx.save_for_backward(h, norm_weight, h_gu, h_d, gate if recompute < 2 else None, up if recompute < 1 else None,
                              wg, bg, wu, bu, wd, a_gu, a_d, b_g, b_u, b_d)
        ctx.gu, ctx.down = gu, down
        return out

    @staticmethod
    def backward(ctx, grad):
        h, norm_weight, h_gu, h_d, gate, up, wg, bg, wu, bu, wd, a_gu, a_d, b_g, b_u, b_d = ctx.saved_tensors
        gu, down = ctx.gu, ctx.down
        dtype = wg.dtype
        r = a_gu.shape[1]
        with torch.autocast(h.device.type, enabled=False):
            y, rstd = rms_norm(h, norm_weight, gu.eps)
            y = y.to(dtype)
            if gate is None:
                gate = _project(y, h_gu, wg, bg, b_g, gu.scales[0], 0, r)
            if up is None:
                up = _project(y, h_gu, wu, bu, b_u, gu.scales[1], 1, r)
            c = swiglu(gate, up)
            gy = grad.to(dtype)
            grad_c, grad_ad, grad_bd = _group_backward(c, [gy], h_d, a_d, [wd], [b_d], down, True)
            del c
            grad_gate, grad_up = swiglu_backward(gate, up, grad_c)
            del grad_c, gate, up
            dy, grad_agu, grad_bgu = _group_backward(y, [grad_gate, grad_up], h_gu, a_gu, [wg, wu], [b_g, b_u], gu,
                                                     ctx.needs_input_grad[0])
            del y, grad_gate, grad_up
            dh = rms_norm_backward(dy, h, norm_weight, rstd).to(h.dtype) if dy is not None else None
        return (dh, None, None, None, None, None, None, grad_agu[0], grad_bgu[0], None, None, grad_agu[1], grad_bgu[1],
                None, None, grad_ad[0], grad_bd[0])


class HeadNorm(torch.autograd.Function):
    """RMSNorm of each head of q or k [T, heads, d] (Qwen3's q_norm / k_norm; their weights are the base model's,
    frozen). Keeps the input and 1/rms of each head."""

    @staticmethod
    def forward(ctx, x, w, eps: float):
        flat = x.reshape(-1, x.shape[-1])
        y, rstd = rms_norm(flat, w, eps)
        ctx.save_for_backward(flat, w, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        flat, w, rstd = ctx.saved_tensors
        return rms_norm_backward(dy.reshape(flat.shape).contiguous(), flat, w, rstd).view(dy.shape), None, None


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope(q, cos, sin), rope(k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        return rope(gq, cos, sin, True), rope(gk, cos, sin, True), None, None


# ---------------------------------------------------------------------------------------------
# The layer


def _group(modules, eps: float = 1e-6):
    """(Group, flat params) of LoRA projections that share an input, or None (not all plain LoRA, or
    different ranks or dropout)."""
    parts = [lora_parts(m) for m in modules]
    if any(p is None for p in parts) or len({p[2].shape[0] for p in parts}) != 1 or len({p[5] for p in parts}) != 1:
        return None
    params = [t for (w, b, a, bb, _, _) in parts for t in (w, b, a, bb)]
    return Group(tuple(float(p[4]) for p in parts), parts[0][5], modules[0]._tunesmith_seed, eps), params


def layer_forward(layer, hidden_states, *args, **kwargs):
    """A packed row through the lean layer in training; anything else through transformers' own forward."""
    plain = layer._tunesmith_plain_layer
    emb, bounds = kwargs.get("position_embeddings"), kwargs.get("cu_seq_lens_q")
    if args or emb is None or bounds is None or hidden_states.shape[0] != 1 or not (
            layer.training and torch.is_grad_enabled()):
        return plain(hidden_states, *args, **kwargs)
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _group([attn.q_proj, attn.k_proj, attn.v_proj], layer.input_layernorm.variance_epsilon)
    o = _group([attn.o_proj])
    gate_up = _group([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm.variance_epsilon)
    down = _group([mlp.down_proj])
    if None in (qkv, o, gate_up, down):  # an adapter disabled, merged or unloaded
        return plain(hidden_states, *args, **kwargs)
    x = hidden_states[0]
    T = x.shape[0]
    heads, kv_heads, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q, k, v = Projections.apply(x, layer.input_layernorm.weight, qkv[0], *qkv[1])
    q, k = q.view(T, heads, d), k.view(T, kv_heads, d)
    if hasattr(attn, "q_norm"):  # Qwen3
        q = HeadNorm.apply(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
        k = HeadNorm.apply(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
    cos, sin = emb
    q, k = Rope.apply(q, k, cos[0], sin[0])
    out = attention.varlen_attention(q, k, v.view(T, kv_heads, d), bounds, kwargs.get("max_length_q"), attn.scaling)
    (o_out,) = Projections.apply(out.reshape(T, heads * d), None, o[0], *o[1])
    h = x + o_out
    level = getattr(layer, "_tunesmith_recompute", 0)
    h = h + Mlp.apply(h, layer.post_attention_layernorm.weight, gate_up[0], down[0], level, *gate_up[1], *down[1])
    return h[None]


def supported(layer, max_length: int | None = None) -> bool:
    """A llama/qwen2-style decoder layer (base model, before LoRA): plain RMSNorms (Qwen3's per-head q/k norms
    too), full attention, a SiLU-gated MLP. A sliding window (Mistral's is in its config) is full attention
    only when no sample (at most `max_length` tokens) is longer than it."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "config", None) is None:
        return False
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    norms += [getattr(attn, n) for n in ("q_norm", "k_norm") if hasattr(attn, n)]  # Qwen3's per-head norms
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    return (getattr(attn.config, "model_type", "") in ARCHITECTURES
            and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms)
            and (window is None or (max_length is not None and max_length <= window))
            and hasattr(attn, "q_norm") == hasattr(attn, "k_norm")
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and all(hasattr(attn, n) for n in PROJECTIONS[:4]) and all(hasattr(mlp, n) for n in PROJECTIONS[4:]))


def use_lean_layers(model, max_length: int | None = None) -> int:
    """Route the decoder layers whose seven projections all carry LoRA (after lora_linear.use_lean_lora)
    through layer_forward; returns how many."""
    count = 0
    for layer in checkpointing.decoder_layers(model):
        if not supported(layer, max_length) or hasattr(layer, "_tunesmith_plain_layer"):
            continue
        mods = [getattr(layer.self_attn, n) for n in PROJECTIONS[:4]] + [getattr(layer.mlp, n) for n in PROJECTIONS[4:]]
        if not all(is_lora_linear(m) and hasattr(m, "_tunesmith_seed") for m in mods):
            continue
        layer._tunesmith_plain_layer = layer.forward
        layer.forward = functools.partial(layer_forward, layer)
        count += 1
    return count
