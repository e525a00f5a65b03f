"""Patches on transformers' model: Liger's fused kernels (RMSNorm, SwiGLU, RoPE) where installed and on CUDA,
and mixed precision for the adapter (half-precision matmuls on the activations, float32 master weights)."""

from __future__ import annotations

import torch
from ..console import log


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

        log(f"Liger kernels not applied ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return []
    return ["rms_norm", "rope"] + (["swiglu"] if swiglu else [])
