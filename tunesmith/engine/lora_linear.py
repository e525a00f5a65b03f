"""Lean LoRA layers: the same maths as PEFT's LoRA Linear, in one autograd function per projection.

PEFT's `lora.Linear` runs six modules and a dozen small ops per projection and, with dropout,
keeps a dropped copy of its input for every projection (three for q/k/v, two for gate/up). Here:

    y = x W^T + b + s * (drop(x) A^T) B^T           one autograd node, three matmuls forward

- Nothing but `x` (shared by q/k/v and by gate/up: autograd stores one tensor once) and the
  r-wide `x A^T` is kept for backward. The dropout mask is never stored: it comes from a seed
  made of the forward pass's seed (`begin_forward`, once per forward+backward) plus the
  projection's own number, and is drawn again from it in backward. A checkpointed layer's
  recomputed forward therefore draws the same masks, and on CUDA the forward seed lives in a
  device tensor that a CUDA graph refills on each replay.
- The MLP's down projection takes `gate` and `up` and computes `silu(gate) * up` itself, keeping
  only gate and up: the [tokens, intermediate] product is recomputed in backward, never stored.
- The adapter's parameters stay PEFT's (`lora_A`/`lora_B` float32 masters), so checkpoints are
  ordinary PEFT adapters; matmuls run in the base model's dtype, as autocast would run them.

`use_lean_lora(model)` swaps the forward of every plain LoRA Linear (one adapter, no DoRA, an
nn.Linear base) and of every gated MLP; anything else keeps PEFT's own forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import kernels

_generators: dict[torch.device, torch.Generator] = {}


def keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout mask for `seed`, scaled by 1/(1-p); the same tensor every time it is asked for."""
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen).div_(1.0 - p)


_triton = kernels.runs_on


_forward_seed: dict = {}  # device -> int (torch path) or int64 tensor of one element (Triton path)
# On CUDA the pass seed walks a Weyl sequence on the device (an odd step, modulo 2^31): no host sync, a new
# value on each CUDA graph replay, and no use of torch's CUDA generator, whose state a failed graph capture
# leaves half-registered ("Offset increment outside graph capture"). The kernels hash the seed, so
# neighbouring values give unrelated masks; its start comes from the CPU generator (--seed).
SEED_STEP = 0x1E3779B1
SEED_MOD = 2**31


def begin_forward(device) -> None:
    """New dropout masks for the next forward pass and the backward that follows it."""
    device = torch.device(device)
    if device.type == "cuda" and kernels.available():
        seed = _forward_seed.get(device)
        if seed is None:
            seed = _forward_seed[device] = torch.randint(0, SEED_MOD, (1,), dtype=torch.int64).to(device)
        seed.add_(SEED_STEP).remainder_(SEED_MOD)
    else:
        _forward_seed[device] = int(torch.randint(0, 2**30, (), dtype=torch.int64))


def seed_state(device):
    """The device seed tensor (None before the first pass or off the Triton path): cuda_graphs.py saves and puts
    it back around a capture, so a captured run draws the masks an eager run draws."""
    seed = _forward_seed.get(torch.device(device))
    return seed if isinstance(seed, torch.Tensor) else None


def pass_seed(t: torch.Tensor, offset: int):
    """The dropout seed of this pass for the projection at `offset`: (device seed, offset) for the Triton
    kernels, an int for the torch path."""
    seed = _forward_seed.get(t.device)
    if _triton(t):
        if seed is None:
            begin_forward(t.device)
            seed = _forward_seed[t.device]
        return seed, offset
    return (seed or 0) + offset


def _dropout(t: torch.Tensor, p: float, offset: int) -> torch.Tensor:
    """dropout(t) with the mask of this pass and projection (t itself when p is 0)."""
    if p == 0:
        return t
    if _triton(t):
        return kernels.dropout(t, p, pass_seed(t, offset))
    return t * keep_mask(t, p, pass_seed(t, offset))


def _add_dropout(out: torch.Tensor, t: torch.Tensor, p: float, offset: int) -> torch.Tensor:
    """out += dropout(t), in place, with the mask of this pass and projection."""
    if p == 0:
        return out.add_(t)
    if _triton(t):
        return kernels.dropout(t, p, pass_seed(t, offset), add_to=out)
    return out.add_(t * keep_mask(t, p, pass_seed(t, offset)))


def _lora_forward(x2, dropped, weight, bias, a, b, scale):
    """[n, in] -> [n, out] and the r-wide dropout(x) A^T that backward needs."""
    y = F.linear(x2, weight, bias)
    h = dropped @ a.t()
    y.addmm_(h, b.t(), alpha=scale)
    return y, h


def _lora_backward(ctx, g2, x2, h, weight, a, b, need_x: bool, need_a: bool, need_b: bool, dropped=None):
    """Gradients of x, A and B (those asked for) for the output gradient g2 [n, out]."""
    scale, p, seed = ctx.scale, ctx.p, ctx.seed
    gb = (g2 @ b) * scale  # [n, r]
    grad_a = grad_b = grad_x = None
    if need_a:
        if dropped is None:
            dropped = _dropout(x2, p, seed)
        grad_a = (gb.t() @ dropped).to(ctx.a_dtype)
        del dropped
    if need_b:
        grad_b = ((g2.t() @ h) * scale).to(ctx.b_dtype)
    if need_x:
        grad_x = _add_dropout(g2 @ weight, gb @ a, p, seed)
    return grad_x, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, p, seed):
        dtype = weight.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a_c, b_c = a.to(dtype), b.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            y, h = _lora_forward(x2, _dropout(x2, p, seed), weight, bias, a_c, b_c, scale)
        ctx.save_for_backward(x2, h, weight, a_c, b_c)
        ctx.scale, ctx.p, ctx.seed, ctx.a_dtype, ctx.b_dtype = scale, p, seed, a.dtype, b.dtype
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, weight, a_c, b_c = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        with torch.autocast(g2.device.type, enabled=False):
            need = ctx.needs_input_grad
            grad_x, grad_a, grad_b = _lora_backward(ctx, g2, x2, h, weight, a_c, b_c, need[0], need[3], need[4])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


class SwigluLoraDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) with LoRA; keeps gate and up, recomputes their product."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, a, b, scale, p, seed):
        dtype = weight.dtype
        shape = gate.shape
        g2, u2 = gate.reshape(-1, shape[-1]).to(dtype), up.reshape(-1, shape[-1]).to(dtype)
        a_c, b_c = a.to(dtype), b.to(dtype)
        with torch.autocast(gate.device.type, enabled=False):
            c, dropped = _swiglu(g2, u2, p, seed)
            bias = None if bias is None else bias.to(dtype)
            y, h = _lora_forward(c, dropped, weight, bias, a_c, b_c, scale)
        del c, dropped
        ctx.save_for_backward(g2, u2, h, weight, a_c, b_c)
        ctx.scale, ctx.p, ctx.seed, ctx.a_dtype, ctx.b_dtype = scale, p, seed, a.dtype, b.dtype
        ctx.shape, ctx.in_dtype = shape, gate.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g2, u2, h, weight, a_c, b_c = ctx.saved_tensors
        gy = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        with torch.autocast(gy.device.type, enabled=False):
            c, dropped = _swiglu(g2, u2, ctx.p, ctx.seed)
            need = ctx.needs_input_grad
            grad_c, grad_a, grad_b = _lora_backward(ctx, gy, c, h, weight, a_c, b_c, True, need[4], need[5], dropped)
            del c, dropped
            grad_gate, grad_up = _swiglu_backward(g2, u2, grad_c)
        shape, dtype = ctx.shape, ctx.in_dtype
        return (grad_gate.view(shape).to(dtype), grad_up.view(shape).to(dtype), None, None, grad_a, grad_b,
                None, None, None)


def _swiglu(gate, up, p, seed):
    """(silu(gate) * up, the same after dropout)."""
    if _triton(gate):
        c, dropped = kernels.swiglu(gate, up, p, pass_seed(gate, seed) if p > 0 else None)
        return c, (c if dropped is None else dropped)
    c = F.silu(gate) * up
    return c, _dropout(c, p, seed)


def _swiglu_backward(gate, up, grad_c):
    """Gradients of gate and up; may overwrite gate and up (saved tensors that are not needed again)."""
    if _triton(gate):
        return kernels.swiglu_backward(gate, up, grad_c)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_up = grad_c * silu
    grad_gate = grad_c.mul_(up).mul_(sig * (1 + gate * (1 - sig)))
    return grad_gate, grad_up


def lora_parts(module):
    """(weight, bias, A, B, scale, p) of a plain single-adapter LoRA Linear, or None."""
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", True):
        return None
    active = getattr(module, "active_adapters", [])
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}) or not hasattr(module, "lora_A"):
        return None
    name = active[0]
    base = module.base_layer
    if type(base) is not torch.nn.Linear or name not in module.lora_A:
        return None
    dropout = module.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    if not module.training:
        p = 0.0
    return base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], p


def lora_linear(module, x):
    parts = lora_parts(module)
    if parts is None:
        return module._tunesmith_peft_forward(x)
    weight, bias, a, b, scale, p = parts
    return LoraLinear.apply(x, weight, bias, a, b, float(scale), p, module._tunesmith_seed)


def gated_mlp(mlp, x):
    if not _has_lora_projections(mlp):
        return mlp._tunesmith_plain_mlp(x)  # the adapter was unloaded
    gate, up = lora_linear(mlp.gate_proj, x), lora_linear(mlp.up_proj, x)
    parts = lora_parts(mlp.down_proj)
    if parts is None:
        return mlp.down_proj(mlp.act_fn(gate) * up)
    weight, bias, a, b, scale, p = parts
    return SwigluLoraDown.apply(gate, up, weight, bias, a, b, float(scale), p, mlp.down_proj._tunesmith_seed)


def is_lora_linear(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and type(module.base_layer) is torch.nn.Linear


def _has_lora_projections(mlp) -> bool:
    """A gated MLP (gate_proj, up_proj, down_proj) whose three projections carry LoRA on nn.Linear."""
    return all(is_lora_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))


def all_lean(model) -> bool:
    """Every LoRA projection of the model is on the lean path (so none draws from torch's RNG)."""
    loras = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    return bool(loras) and all(hasattr(m, "_tunesmith_peft_forward") for m in loras)


def use_lean_lora(model) -> int:
    """Swap in the lean forwards; returns how many LoRA projections now use them."""
    count = 0
    for module in model.modules():
        if is_lora_linear(module) and not hasattr(module, "_tunesmith_peft_forward"):
            module._tunesmith_peft_forward = module.forward
            module._tunesmith_seed = (count + 1) * 65_537  # this projection's offset from the pass's seed
            module.forward = lambda x, *args, _m=module, **kwargs: (
                lora_linear(_m, x) if not args and not kwargs else _m._tunesmith_peft_forward(x, *args, **kwargs))
            count += 1
    for module in model.modules():
        silu = type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        if _has_lora_projections(module) and silu and not getattr(module.forward, "_tunesmith_lean", False):
            module._tunesmith_plain_mlp = module.forward  # (whatever it is now: HF's, or a kernel library's)
            module.forward = functools.partial(gated_mlp, module)
            module.forward._tunesmith_lean = True
    return count
