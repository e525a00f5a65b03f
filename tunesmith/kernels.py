"""Two small Triton kernels for the lean LoRA layers (CUDA only; lean_lora.py has the plain-torch
path for everything else and is tested against these under Triton's CPU interpreter).

- `dropout(x, p, seed, add_to=None)`: x * keep / (1 - p) (+ add_to). The mask comes from
  Philox(seed, element index), so asking again with the same seed gives the same mask: it is
  never stored, and backward applies it to the gradient with the same call. A seed is a pair
  (int64 tensor of one element on the device, int offset): the tensor is read by the kernel, so a
  CUDA graph that replays the kernels draws new masks whenever the tensor is refilled.
- `swiglu(gate, up, p, seed)`: c = silu(gate) * up and, when p > 0, dropout(c), in one pass.
  `swiglu_backward(gate, up, grad_c)`: the gradients of gate and up, written over gate and up.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 2048
CHUNK = 2**30  # elements per launch: Philox offsets stay within int32


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def dropout_kernel(x_ptr, out_ptr, add_ptr, n, seed_ptr, offset, p, scale, HAS_ADD: tl.constexpr,
                       BLOCK: tl.constexpr):
        seed = tl.load(seed_ptr) + offset
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(tl.rand(seed, offs) > p, x * scale, 0.0)
        if HAS_ADD:
            y += tl.load(add_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def swiglu_kernel(g_ptr, u_ptr, c_ptr, d_ptr, n, seed_ptr, offset, p, scale, DROP: tl.constexpr,
                      BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        c = g * tl.sigmoid(g) * u
        tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=inside)
        if DROP:
            seed = tl.load(seed_ptr) + offset
            d = tl.where(tl.rand(seed, offs) > p, c * scale, 0.0)
            tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def swiglu_backward_kernel(g_ptr, u_ptr, dc_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dc = tl.load(dc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(g_ptr + offs, (dc * u * sig * (1.0 + g * (1.0 - sig))).to(g_ptr.dtype.element_ty), mask=inside)
        tl.store(u_ptr + offs, (dc * silu).to(u_ptr.dtype.element_ty), mask=inside)

    return dropout_kernel, swiglu_kernel, swiglu_backward_kernel


def _chunks(n: int):
    """(start, end, index) of each launch; every launch's Philox stream gets its own seed."""
    for i, start in enumerate(range(0, n, CHUNK)):
        yield start, min(n, start + CHUNK), i


def _grid(n: int):
    return ((n + BLOCK - 1) // BLOCK,)


def dropout(x: torch.Tensor, p: float, seed: tuple, add_to: torch.Tensor | None = None) -> torch.Tensor:
    kernel = _kernels()[0]
    seed_tensor, offset = seed
    x = x.contiguous()
    out = torch.empty_like(x) if add_to is None else add_to
    flat_x, flat_out = x.view(-1), out.view(-1)
    for s, e, i in _chunks(x.numel()):
        kernel[_grid(e - s)](flat_x[s:e], flat_out[s:e], flat_out[s:e], e - s, seed_tensor, offset + i, p, 1.0 / (1.0 - p),
                             HAS_ADD=add_to is not None, BLOCK=BLOCK)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, p: float = 0.0, seed: tuple | None = None):
    """(silu(gate) * up, its dropout or None)."""
    kernel = _kernels()[1]
    seed_tensor, offset = seed if seed is not None else (gate, 0)  # (not read when p is 0)
    c = torch.empty_like(gate)
    dropped = torch.empty_like(gate) if p > 0 else c
    g, u, fc, fd = gate.view(-1), up.view(-1), c.view(-1), dropped.view(-1)
    for s, e, i in _chunks(gate.numel()):
        kernel[_grid(e - s)](g[s:e], u[s:e], fc[s:e], fd[s:e], e - s, seed_tensor, offset + i, p, 1.0 / (1.0 - p) if p < 1 else 0.0,
                             DROP=p > 0, BLOCK=BLOCK)
    return c, (dropped if p > 0 else None)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad_c: torch.Tensor):
    """Gradients of gate and up for grad_c, written over gate and up (which are then returned)."""
    kernel = _kernels()[2]
    g, u, dc = gate.view(-1), up.view(-1), grad_c.contiguous().view(-1)
    for s, e, _ in _chunks(gate.numel()):
        kernel[_grid(e - s)](g[s:e], u[s:e], dc[s:e], e - s, BLOCK=BLOCK)
    return gate, up
