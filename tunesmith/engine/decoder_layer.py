"""The lean decoder layer: a llama/qwen2-style decoder layer with LoRA on all its projections, as
three autograd functions, for packed rows (train.micro_batches) in training.

    x [-> RMSNorm] -> q, k, v (LoRA) [-> RMSNorm of q, k: Qwen3, Gemma 3, OLMo 2] -> RoPE -> flash attention -> o (LoRA)
      [-> RMSNorm: Gemma, OLMo 2, GLM-4] -> + x = h
    h [-> RMSNorm] -> gate, up (LoRA) -> act(gate) * up -> down (LoRA) [-> RMSNorm: Gemma, OLMo 2, GLM-4] -> + h

The families (ARCHITECTURES): Qwen2/2.5, Qwen3, Llama, Mistral; Phi-3/Phi-4-mini, whose qkv_proj and
gate_up_proj are fused Linears with one PEFT adapter each (run here as row blocks of the weight and of
lora_B that share the lora_A and its dropout mask: what separate projections cost), with partial rotary;
Gemma 2 and Gemma 3, with (1 + w) RMSNorms computed in float32, GeGLU (tanh GELU) and four norms a layer;
Granite (its residual_multiplier on each branch; its attention_multiplier is the attention's scaling); OLMo 2
(norms only after attention and after the MLP, q/k norms over all heads, weights times the float32 norm); GLM-4
(glm: Llama's two norms, a fused gate_up_proj as Phi-3's, q/k/v biases, and half of each head turned by an
interleaved RoPE, pairs of neighbouring channels: INTERLEAVED) and GLM-4-0414 (glm4: the same with four norms, as
Gemma's); Qwen2-MoE and Qwen3-MoE (MOE), whose lean
attention comes before an MoE block that runs as transformers computes it (its router, its experts with PEFT's LoRA
on their 3-D weights, Qwen2-MoE's shared expert on lean LoRA); a dense layer among them (mlp_only_layers) runs all lean
where its MLP carries LoRA.
Sliding-window layers (Gemma's, Mistral's, Qwen's where set) attend through flash attention's own window. A
layer whose attention the lean path cannot compute (Gemma 2's logit softcapping, which the flash kernels lack)
stays on transformers' layer, layer by layer (fallback_reason), and the start-up line says which and why
(lean_note).

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
over the shared input per projection, masks drawn inside, never stored), as do RMSNorm, RoPE and
SwiGLU; Gemma's norms (one rounding after the weight, not before as the kernel's) and GeGLU run in
torch there too. On the CPU the same maths runs in plain torch (tests/test_fast.py compares it with
transformers + PEFT). The adapter stays PEFT's: the functions read and write its lora_A/lora_B parameters.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attention, checkpointing, kernels
from .lora_linear import is_lora_linear, keep_mask, lora_parts, pass_seed

STEP = 65_537  # seed distance between the projections of one group (as use_lean_lora numbers them)
ARCHITECTURES = ("qwen2", "qwen3", "llama", "mistral", "phi3", "gemma2", "gemma3_text", "granite", "olmo2", "glm",
                 "glm4", "qwen2_moe", "qwen3_moe")
# Families whose MoE blocks (router, experts, PEFT's LoRA on their 3-D weights) run as transformers computes them,
# after the lean attention; the memory planners count their layers as transformers' layers (an upper bound)
MOE = ("qwen2_moe", "qwen3_moe")
INTERLEAVED = ("glm", "glm4")  # RoPE that turns channel pairs (x0, x1), (x2, x3)... (GLM's), not the two halves
# Families whose softcapped layers stay on transformers' layers, layer by layer (the planner, which reads no layer,
# counts them all as transformers' layers: an upper bound)
PER_LAYER = ("gemma2",)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Group:
    """Projections that share one input: their LoRA scales, dropout p, and the seed offset of the first
    (projection i draws its mask from offset + i * step)."""

    scales: tuple
    p: float
    offset: int
    eps: float = 1e-6  # of the RMSNorm in front, if any
    style: str = ""  # that RMSNorm's (rms_norm): "" Llama's, "float" OLMo 2's, "gemma" Gemma's
    step: int = STEP  # 0 for the row blocks of one fused Linear (Phi-3's qkv_proj): one input, one mask, one A


_triton = kernels.runs_on


# ---------------------------------------------------------------------------------------------
# The pieces, each with a Triton path (CUDA) and a torch path (anywhere)


def lora_a(x, a, g: Group):
    """x [T, K], a [P, R, K] -> [T, P*R]: dropout_i(x) A_i^T for each projection i, side by side."""
    P, R, K = a.shape
    if g.p == 0:
        return x @ a.reshape(P * R, K).to(x.dtype).t()
    if _triton(x):
        return kernels.lora_a(x, a, g.p, pass_seed(x, g.offset), g.step)
    return torch.cat([(x * keep_mask(x, g.p, pass_seed(x, g.offset + i * g.step))) @ a[i].to(x.dtype).t()
                      for i in range(P)], 1)


def lora_a_grad(x, gb, P: int, g: Group):
    """x [T, K], gb [T, P*R] -> float32 [P, R, K]: gb_i^T dropout_i(x)."""
    T, K = x.shape
    R = gb.shape[1] // P
    if g.p == 0:
        return (gb.t() @ x).float().view(P, R, K)
    if _triton(x):
        return kernels.lora_a_grad(x, gb, P, g.p, pass_seed(x, g.offset), g.step)
    return torch.stack([(gb[:, i * R:(i + 1) * R].t() @ (x * keep_mask(x, g.p, pass_seed(x, g.offset + i * g.step)))).float()
                        for i in range(P)])


def lora_dx_add(dx, gb, a, g: Group):
    """dx [T, K] += sum_i dropout_i(gb_i A_i), in place."""
    P, R, K = a.shape
    if g.p == 0:
        return dx.addmm_(gb, a.reshape(P * R, K).to(dx.dtype))
    if _triton(dx):
        return kernels.lora_dx_add(dx, gb, a, g.p, pass_seed(dx, g.offset), g.step)
    for i in range(P):
        dx.add_((gb[:, i * R:(i + 1) * R] @ a[i].to(dx.dtype)) * keep_mask(dx, g.p, pass_seed(dx, g.offset + i * g.step)))
    return dx


def rms_norm(x, w, eps: float, style: str = ""):
    """(transformers' RMSNorm of x [T, N], float32 1/rms per row). style "": Llama's, the normalised x rounded to
    x's dtype, then times w (the Triton kernel's); "float": OLMo 2's, w times the float32 normalised x, rounded
    once; "gemma": Gemma's, the same with (1 + w). The last two run in torch on every device."""
    if _triton(x) and not style:
        return kernels.rms_norm(x, w, eps)
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    if style:
        return (xf * rstd[:, None] * _norm_scale(w, style)).to(x.dtype), rstd
    return (w * (xf * rstd[:, None]).to(x.dtype)).to(x.dtype), rstd


def _norm_scale(w, style: str):
    return 1.0 + w.float() if style == "gemma" else w.float()


def rms_norm_backward(dy, x, w, rstd, style: str = ""):
    if _triton(x) and not style:
        return kernels.rms_norm_backward(dy, x, w, rstd)
    normed = x.float() * rstd[:, None]
    dn = dy.float() * _norm_scale(w, style)
    return (rstd[:, None] * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x.dtype)


def rope(x, cos, sin, backward: bool = False, interleaved: bool = False):
    """Rotate-half rotary embedding of x [T, heads, d] by cos/sin [T, r] (backward: its transpose). Partial
    rotary (Phi-4-mini's and GLM-4's partial_rotary_factor: r < d) turns the first r channels of each head, passes
    the rest. interleaved (GLM-4's): pair i is channels (2i, 2i + 1), turned by the first half of cos/sin."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((_rotate(x[..., :r].contiguous(), cos, sin, backward, interleaved), x[..., r:]), -1)
    return _rotate(x, cos, sin, backward, interleaved)


def _rotate(x, cos, sin, backward: bool, interleaved: bool):
    d = x.shape[-1]
    if _triton(x) and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0:
        return kernels.rope(x, cos, sin, backward, interleaved)
    if interleaved:
        return _rotate_pairs(x, cos, sin, backward)
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if backward:
        xs = x * s
        return x * c + torch.cat((xs[..., d // 2:], -xs[..., :d // 2]), -1)
    return x * c + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * s


def _rotate_pairs(x, cos, sin, backward: bool):
    """GLM's rotation of each pair (x0, x1) by the angle of cos/sin's first half, as its apply_rotary_pos_emb
    (cos[..., :r // 2].repeat_interleave(2)) computes it."""
    d = x.shape[-1]
    c, s = cos[:, None, :d // 2].to(x.dtype), sin[:, None, :d // 2].to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    if backward:
        return torch.stack((x0 * c + x1 * s, x1 * c - x0 * s), -1).flatten(-2)
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), -1).flatten(-2)


def gated(gate, up, act: str):
    """act(gate) * up: SiLU (SwiGLU; a Triton kernel on CUDA) or tanh-approximated GELU (Gemma's GeGLU; torch)."""
    if act == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if _triton(gate):
        return kernels.swiglu(gate, up)[0]
    return F.silu(gate) * up


def gated_backward(gate, up, grad_c, act: str):
    """Gradients of gate and up; may be written over gate and up (tensors not needed again)."""
    if act == "gelu_tanh":  # aten's own GELU derivative: the one autograd takes through transformers' layer
        return torch.ops.aten.gelu_backward(grad_c * up, gate, approximate="tanh"), grad_c * F.gelu(gate, approximate="tanh")
    if _triton(gate):
        return kernels.swiglu_backward(gate, up, grad_c)
    sig = torch.sigmoid(gate)
    return grad_c * up * sig * (1 + gate * (1 - sig)), grad_c * gate * sig


def _project(y, h, weight, bias, b, scale, i, rank):
    """Projection i of a group: y W^T + bias + scale * H_i B^T. The r-wide term comes first and the frozen matmul
    adds into it, which cuBLAS does as it writes its output: one pass over the [T, N] output fewer than adding the
    r-wide term afterwards."""
    h_i, b_t = h[:, i * rank:(i + 1) * rank], (b * scale).to(weight.dtype).t()
    out = torch.mm(h_i, b_t) if bias is None else torch.addmm(bias.to(weight.dtype), h_i, b_t)
    return out.addmm_(y, weight.t())


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
            y, rstd = rms_norm(x, norm_weight, g.eps, g.style) if norm_weight is not None else (x, None)
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
            y = rms_norm(x, norm_weight, g.eps, g.style)[0].to(dtype) if norm_weight is not None else x.to(dtype)
            grads = [gr.to(dtype) for gr in grads]
            dy, grad_a, grad_b = _group_backward(y, grads, h, a, weights, bs, g, ctx.needs_input_grad[0])
            del y
            dx = None
            if dy is not None:
                dx = rms_norm_backward(dy, x, norm_weight, rstd, g.style) if norm_weight is not None else dy
        out = [None if dx is None else dx.to(x.dtype), None, None]
        for i in range(n):
            out += [None, None, grad_a[i], grad_b[i]]
        return tuple(out)


class Mlp(torch.autograd.Function):
    """[RMSNorm ->] gate/up (LoRA) -> act(gate) * up -> down (LoRA), for h [T, hidden]. Keeps h, 1/rms,
    gate and up (unless `recompute` says to make them again in backward) and the r-wide H's; the
    [T, intermediate] product act(gate) * up is recomputed, never kept. `act`: "silu" or "gelu_tanh"."""

    @staticmethod
    def forward(ctx, h, norm_weight, gu: Group, down: Group, recompute: int, act: str,
                wg, bg, ag, b_g, wu, bu, au, b_u, wd, bd, ad, b_d):
        dtype = wg.dtype
        with torch.autocast(h.device.type, enabled=False):
            y = rms_norm(h, norm_weight, gu.eps, gu.style)[0].to(dtype) if norm_weight is not None else h.to(dtype)
            a_gu = torch.stack((ag, au))
            r = a_gu.shape[1]
            h_gu = lora_a(y, a_gu, gu)
            gate = _project(y, h_gu, wg, bg, b_g, gu.scales[0], 0, r)
            up = _project(y, h_gu, wu, bu, b_u, gu.scales[1], 1, r)
            del y
            c = gated(gate, up, act)
            a_d = ad[None]
            h_d = lora_a(c, a_d, down)
            out = _project(c, h_d, wd, bd, b_d, down.scales[0], 0, r)
            del c
        ctx.save_for_backward(h, norm_weight, h_gu, h_d, gate if recompute < 2 else None, up if recompute < 1 else None,
                              wg, bg, wu, bu, wd, a_gu, a_d, b_g, b_u, b_d)
        ctx.gu, ctx.down, ctx.act = gu, down, act
        return out

    @staticmethod
    def backward(ctx, grad):
        h, norm_weight, h_gu, h_d, gate, up, wg, bg, wu, bu, wd, a_gu, a_d, b_g, b_u, b_d = ctx.saved_tensors
        gu, down = ctx.gu, ctx.down
        dtype = wg.dtype
        r = a_gu.shape[1]
        with torch.autocast(h.device.type, enabled=False):
            y, rstd = rms_norm(h, norm_weight, gu.eps, gu.style) if norm_weight is not None else (h, None)
            y = y.to(dtype)
            if gate is None:
                gate = _project(y, h_gu, wg, bg, b_g, gu.scales[0], 0, r)
            if up is None:
                up = _project(y, h_gu, wu, bu, b_u, gu.scales[1], 1, r)
            c = gated(gate, up, ctx.act)
            gy = grad.to(dtype)
            grad_c, grad_ad, grad_bd = _group_backward(c, [gy], h_d, a_d, [wd], [b_d], down, True)
            del c
            grad_gate, grad_up = gated_backward(gate, up, grad_c, ctx.act)
            del grad_c, gate, up
            dy, grad_agu, grad_bgu = _group_backward(y, [grad_gate, grad_up], h_gu, a_gu, [wg, wu], [b_g, b_u], gu,
                                                     ctx.needs_input_grad[0])
            del y, grad_gate, grad_up
            if dy is not None and norm_weight is not None:
                dy = rms_norm_backward(dy, h, norm_weight, rstd, gu.style)
            dh = dy.to(h.dtype) if dy is not None else None
        return (dh, None, None, None, None, None, None, None, grad_agu[0], grad_bgu[0], None, None, grad_agu[1], grad_bgu[1],
                None, None, grad_ad[0], grad_bd[0])


class Norm(torch.autograd.Function):
    """RMSNorm over the last dimension of x [..., d], with the base model's (frozen) weight: each head of q or k
    (Qwen3's and Gemma 3's q_norm / k_norm), or Gemma's norms after attention and after the MLP. Keeps the input
    and 1/rms of each row."""

    @staticmethod
    def forward(ctx, x, w, eps: float, style: str = ""):
        flat = x.reshape(-1, x.shape[-1])
        y, rstd = rms_norm(flat, w, eps, style)
        ctx.save_for_backward(flat, w, rstd)
        ctx.style = style
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        flat, w, rstd = ctx.saved_tensors
        dx = rms_norm_backward(dy.reshape(flat.shape).contiguous(), flat, w, rstd, ctx.style)
        return dx.view(dy.shape), None, None, None


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved: bool = False):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return rope(q, cos, sin, interleaved=interleaved), rope(k, cos, sin, interleaved=interleaved)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        i = ctx.interleaved
        return rope(gq, cos, sin, True, i), rope(gk, cos, sin, True, i), None, None, None


# ---------------------------------------------------------------------------------------------
# The layer


def _norm_args(norm):
    """(weight, eps, style) of an RMSNorm (style: see rms_norm; Gemma's weight starts at zero, scales by 1 + w)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    name = type(norm).__name__
    return norm.weight, eps, "gemma" if name.startswith("Gemma") else "float" if name == "Olmo2RMSNorm" else ""


def _activation(mlp) -> str | None:
    """"silu" (Llama, Qwen, Phi-3), "gelu_tanh" (Gemma's GeGLU), or None: an activation the lean MLP lacks."""
    name = type(getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))).__name__
    return {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}.get(name)


def _inputs(layer):
    """The LoRA modules of the layer's four groups (q/k/v, o, gate/up, down), each a list of (module, row
    blocks): row blocks split one fused Linear (Phi-3's qkv_proj and gate_up_proj) into the projections it
    holds, None for a Linear of its own. An MoE block has no lean groups (empty lists)."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "qkv_proj"):
        q, kv = attn.config.num_attention_heads * attn.head_dim, attn.config.num_key_value_heads * attn.head_dim
        qkv = [(attn.qkv_proj, (q, kv, kv))]
    else:
        qkv = [(attn.q_proj, None), (attn.k_proj, None), (attn.v_proj, None)]
    if _moe(mlp):
        return qkv, [(attn.o_proj, None)], [], []
    if hasattr(mlp, "gate_up_proj"):  # (gate first, as Phi3MLP chunks it)
        gate_up = [(mlp.gate_up_proj, (mlp.config.intermediate_size,) * 2)]
    else:
        gate_up = [(mlp.gate_proj, None), (mlp.up_proj, None)]
    return qkv, [(attn.o_proj, None)], gate_up, [(mlp.down_proj, None)]


def _moe(mlp) -> bool:
    """An MoE block (Qwen2-MoE's, Qwen3-MoE's: a router and experts, maybe a shared expert)."""
    return hasattr(mlp, "experts")


def _group(entries, norm=None):
    """(Group, flat params) of LoRA projections that share an input (after `norm`, if any), or None (not
    all plain LoRA, or different ranks or dropout). A fused Linear gives one projection per row block:
    row slices of its weight and of PEFT's lora_B (views: gradients reach the parameters), its one lora_A
    for each, and one dropout mask (step 0), as PEFT applies one adapter to the fused module."""
    parts = [lora_parts(m) for m, _ in entries]
    if any(p is None for p in parts) or len({p[2].shape[0] for p in parts}) != 1 or len({p[5] for p in parts}) != 1:
        return None
    projections = []
    for (_, blocks), (w, b, a, bb, scale, _) in zip(entries, parts):
        if blocks is None:
            projections.append((w, b, a, bb, scale))
            continue
        biases = b.split(blocks) if b is not None else (None,) * len(blocks)
        projections += [(wi, bi, a, bbi, scale) for wi, bi, bbi in zip(w.split(blocks), biases, bb.split(blocks))]
    _, eps, style = _norm_args(norm) if norm is not None else (None, 1e-6, "")
    fused = entries[0][1] is not None
    g = Group(tuple(float(p[4]) for p in projections), parts[0][5], entries[0][0]._tunesmith_seed, eps, style,
              0 if fused else STEP)
    return g, [t for (w, b, a, bb, _) in projections for t in (w, b, a, bb)]


def _norm_places(layer) -> tuple:
    """The layer's norms: (before attention, after it, before the MLP, after it), None where it has none. Llama's
    two are before; Gemma 2/3 and GLM-4 have all four (GLM-4's before the MLP is its post_attention_layernorm);
    OLMo 2 only the two after (on the attention's and the MLP's outputs)."""
    before = getattr(layer, "input_layernorm", None)
    if hasattr(layer, "post_self_attn_layernorm"):
        return before, layer.post_self_attn_layernorm, layer.post_attention_layernorm, layer.post_mlp_layernorm
    if hasattr(layer, "pre_feedforward_layernorm"):
        return before, layer.post_attention_layernorm, layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
    if hasattr(layer, "post_feedforward_layernorm"):
        return before, layer.post_attention_layernorm, None, layer.post_feedforward_layernorm
    return before, None, layer.post_attention_layernorm, None


def _weight(norm):
    return None if norm is None else norm.weight


def layer_forward(layer, hidden_states, *args, **kwargs):
    """A packed row through the lean layer in training; anything else through transformers' own forward."""
    plain = layer._tunesmith_plain_layer
    emb, bounds = kwargs.get("position_embeddings"), kwargs.get("cu_seq_lens_q")
    if args or emb is None or bounds is None or hidden_states.shape[0] != 1 or not (
            layer.training and torch.is_grad_enabled()):
        return plain(hidden_states, *args, **kwargs)
    attn, mlp = layer.self_attn, layer.mlp
    attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = _norm_places(layer)
    qkv_in, o_in, gate_up_in, down_in = _inputs(layer)
    qkv, o = _group(qkv_in, attn_norm), _group(o_in)
    mlp_groups = [] if _moe(mlp) else [_group(gate_up_in, mlp_norm), _group(down_in)]
    if None in (qkv, o, *mlp_groups):  # an adapter disabled, merged or unloaded
        return plain(hidden_states, *args, **kwargs)
    x = hidden_states[0]
    T = x.shape[0]
    heads, kv_heads, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q, k, v = Projections.apply(x, _weight(attn_norm), qkv[0], *qkv[1])
    per_head = hasattr(attn, "q_norm") and attn.q_norm.weight.numel() == d
    if hasattr(attn, "q_norm") and not per_head:  # OLMo 2: over all of q, all of k
        q, k = Norm.apply(q, *_norm_args(attn.q_norm)), Norm.apply(k, *_norm_args(attn.k_norm))
    q, k = q.view(T, heads, d), k.view(T, kv_heads, d)
    if per_head:  # Qwen3, Gemma 3
        q, k = Norm.apply(q, *_norm_args(attn.q_norm)), Norm.apply(k, *_norm_args(attn.k_norm))
    cos, sin = emb
    q, k = Rope.apply(q, k, cos[0], sin[0], attn.config.model_type in INTERLEAVED)
    out = attention.varlen_attention(q, k, v.view(T, kv_heads, d), bounds, kwargs.get("max_length_q"), attn.scaling,
                                     sliding_window(attn))
    (o_out,) = Projections.apply(out.reshape(T, heads * d), None, o[0], *o[1])
    if attn_out_norm is not None:
        o_out = Norm.apply(o_out, *_norm_args(attn_out_norm))
    residual = getattr(layer, "residual_multiplier", 1.0)  # Granite scales each branch before it joins the residual
    h = x + o_out * residual if residual != 1.0 else x + o_out
    if not mlp_groups:  # an MoE block: router and experts as transformers computes them, after its own norm
        m = mlp(mlp_norm(h)[None])[0]
    else:
        (gu, gu_params), (down, down_params) = mlp_groups
        level = getattr(layer, "_tunesmith_recompute", 0)
        m = Mlp.apply(h, _weight(mlp_norm), gu, down, level, _activation(mlp), *gu_params, *down_params)
    if mlp_out_norm is not None:
        m = Norm.apply(m, *_norm_args(mlp_out_norm))
    return (h + m * residual if residual != 1.0 else h + m)[None]


def _norms(layer) -> list:
    attn = layer.self_attn
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
             "post_self_attn_layernorm", "post_mlp_layernorm")
    return [getattr(layer, n) for n in names if hasattr(layer, n)] + [getattr(attn, n) for n in ("q_norm", "k_norm")
                                                                      if hasattr(attn, n)]


def _known_norm_places(layer) -> bool:
    """Llama's two norms before, Gemma's or GLM-4's four, or OLMo 2's two after (_norm_places)."""
    before, pre_mlp, post_mlp, glm_attn, glm_mlp = (hasattr(layer, n) for n in (
        "input_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm", "post_self_attn_layernorm",
        "post_mlp_layernorm"))
    if glm_attn or glm_mlp:
        return before and glm_attn and glm_mlp and not (pre_mlp or post_mlp)
    return (before and pre_mlp == post_mlp) or (not before and post_mlp and not pre_mlp)


def sliding_window(attn) -> int | None:
    """The tokens a sliding-window layer attends to (itself included), or None: Gemma's and Qwen's sliding layers
    carry their own; Mistral's attention reads its config's; Qwen2-MoE's full layers carry none, as its config's
    layer_types say."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    types = getattr(attn.config, "layer_types", None)
    if types and types[attn.layer_idx] != "sliding_attention":
        return None
    return getattr(attn.config, "sliding_window", None) or None


def fallback_reason(layer) -> str | None:
    """Why this decoder layer (base model, before LoRA) stays on transformers' layer, or None: it runs lean.
    Lean: a llama/qwen2-style layer (Phi-3's fused projections, Gemma's four (1 + w) norms and GeGLU, OLMo 2's
    norms after attention and MLP only, GLM-4's four norms and interleaved RoPE, an MoE block after the attention,
    too), RMSNorms (q/k norms too, per head or over all heads), causal attention without dropout or logit softcapping
    (which the flash kernels lack), full or over a sliding window (Mistral's, Gemma's and Qwen's sliding layers)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or getattr(attn, "config", None) is None:
        return "not a decoder layer of the lean kind"
    config = attn.config
    if getattr(config, "model_type", "") not in ARCHITECTURES:
        return f"the lean ones take {', '.join(ARCHITECTURES)}"
    if getattr(attn, "attn_logit_softcapping", None):
        return f"attention logits softcapped at {attn.attn_logit_softcapping:g}"
    if any(getattr(config, n, 0) for n in ("attention_dropout", "resid_pdrop")) or not getattr(attn, "is_causal", True):
        return "dropout in attention or on the residual, or bidirectional attention"
    norms = _norms(layer)
    shape_ok = (all(type(n).__name__.endswith("RMSNorm") and _norm_args(n)[1] is not None for n in norms)
                and hasattr(attn, "q_norm") == hasattr(attn, "k_norm")
                and hasattr(layer, "post_attention_layernorm") and _known_norm_places(layer)
                and (hasattr(attn, "qkv_proj") or all(hasattr(attn, n) for n in PROJECTIONS[:3])) and hasattr(attn, "o_proj")
                and (_moe(mlp) or _activation(mlp) is not None and hasattr(mlp, "down_proj")
                     and (hasattr(mlp, "gate_up_proj") or all(hasattr(mlp, n) for n in PROJECTIONS[4:6]))))
    return None if shape_ok else "a layer layout the lean layer does not know"


def supported(layer) -> bool:
    return fallback_reason(layer) is None


def lean_note(count: int, reasons: list, moe: bool = False) -> str:
    """The start-up line's words: how many layers run lean and, where others stay on transformers' layers, which
    and why (`reasons`: fallback_reason of each layer); `moe`: their MoE blocks are transformers' (MOE)."""
    why: dict[str, list] = {}
    for i, reason in enumerate(reasons):
        if reason:
            why.setdefault(reason, []).append(str(i))
    blocks = " with transformers' MoE blocks" if moe else ""
    if not why:
        return f"lean decoder layers ({count}){blocks}"
    rest = "; ".join(f"transformers' for {'layer ' + ', '.join(ix) if len(ix) <= 6 else f'{len(ix)} layers'}: {reason}"
                     for reason, ix in why.items())
    return f"lean decoder layers ({count} of {len(reasons)}; {rest}){blocks}"


def use_lean_layers(model) -> int:
    """Route the decoder layers whose projections all carry LoRA (after lora_linear.use_lean_lora) through
    layer_forward; returns how many run lean, those routed by an earlier call on the same base model included
    (a second adapter on it in one process: the planner must count them)."""
    count = 0
    for layer in checkpointing.decoder_layers(model):
        if not supported(layer):
            continue
        mods = [m for group in _inputs(layer) for m, _ in group]
        if not all(is_lora_linear(m) and hasattr(m, "_tunesmith_seed") for m in mods):
            continue
        if not hasattr(layer, "_tunesmith_plain_layer"):
            layer._tunesmith_plain_layer = layer.forward
            layer.forward = functools.partial(layer_forward, layer)
        count += 1
    return count
