"""The Triton kernels of the fast path: the lean LoRA layers and the fused loss (CUDA only; lora_linear.py and
decoder_layer.py have the plain-torch path for everything else, tested against these under Triton's CPU interpreter).

- `dropout(x, p, seed, add_to=None)`: x * keep / (1 - p) (+ add_to). The mask comes from
  Philox(seed, element index), so asking again with the same seed gives the same mask: it is
  never stored, and backward applies it to the gradient with the same call. A seed is a pair
  (int64 tensor of one element on the device, int offset): the tensor is read by the kernel, so a
  CUDA graph that replays the kernels draws new masks whenever the tensor is refilled.
- `swiglu(gate, up, p, seed)`: c = silu(gate) * up and, when p > 0, dropout(c), in one pass.
  `swiglu_backward(gate, up, grad_c)`: the gradients of gate and up, written over gate and up.
- `cross_entropy_(logits, targets, grad)`: each row's cross-entropy and, with grad, softmax - one-hot written over
  the logits (fused_loss's chunks).

For the lean decoder layer (decoder_layer.py), the LoRA side of P projections that share an input x
[T, K] (q/k/v, gate/up), with projection i's dropout mask drawn from an integer hash of (seed +
offset + i * step, t * K + k) and never stored (the kernels live in triton_lora.py):
- `lora_a(x, a, p, seed, step)`: H[:, i*R:(i+1)*R] = dropout_i(x) A_i^T, one pass over x per i.
- `lora_a_grad(x, gb, p, seed, step)`: grad A_i = gb_i^T dropout_i(x), float32 [P, R, K].
- `lora_dx_add(dx, gb, a, p, seed, step)`: dx += sum_i dropout_i(gb_i A_i), in place.
- `keep_mask(T, K, p, seed, offset)`: the mask itself (for tests).
And `rms_norm(x, w, eps)` / `rms_norm_backward(dy, x, w, rstd)` (transformers' RMSNorm: the
normalised x rounded to x's dtype, then times the weight), `rope(x, cos, sin, backward=False, interleaved=False)`
(rotate-half, or GLM's interleaved, rotary embedding of x [T, heads, d] with cos/sin [T, d]; backward rotates back).
"""

from __future__ import annotations

import functools

import torch

BLOCK = 2048  # columns a program of the element-wise kernels (dropout, swiglu) takes at most
WARPS = 4
CHUNK = 2**30  # elements per launch at most: Philox offsets stay within int32


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on(t: torch.Tensor) -> bool:
    """These kernels run on this tensor: it lives on a CUDA device, and Triton is there to build them."""
    return t.is_cuda and available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # One program per row and BLOCK columns of a [rows, N] tensor. N is a compile-time constant (a layer's width),
    # so the column mask is known to cover whole vectors and loads and stores are vectorised; rows, which change
    # with every batch, are the grid and never recompile. A mask's Philox index is the element's place in its
    # launch, row * N + column.

    @triton.jit(do_not_specialize=["offset"])  # (see triton_lora.py)
    def dropout_kernel(x_ptr, out_ptr, add_ptr, seed_ptr, offset, p, scale, N: tl.constexpr, HAS_ADD: tl.constexpr,
                       BLOCK: tl.constexpr):
        seed = tl.load(seed_ptr) + offset
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < N
        offs = tl.program_id(0) * N + cols
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(tl.rand(seed, offs) > p, x * scale, 0.0)
        if HAS_ADD:
            y += tl.load(add_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["offset"])  # (see triton_lora.py)
    def swiglu_kernel(g_ptr, u_ptr, c_ptr, d_ptr, seed_ptr, offset, p, scale, N: tl.constexpr, DROP: tl.constexpr,
                      BLOCK: tl.constexpr):
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < N
        offs = tl.program_id(0) * N + cols
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        c = g * tl.sigmoid(g) * u
        tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=inside)
        if DROP:
            seed = tl.load(seed_ptr) + offset
            d = tl.where(tl.rand(seed, offs) > p, c * scale, 0.0)
            tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def swiglu_backward_kernel(g_ptr, u_ptr, dc_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < N
        offs = tl.program_id(0) * N + cols
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dc = tl.load(dc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(g_ptr + offs, (dc * u * sig * (1.0 + g * (1.0 - sig))).to(g_ptr.dtype.element_ty), mask=inside)
        tl.store(u_ptr + offs, (dc * silu).to(u_ptr.dtype.element_ty), mask=inside)

    return dropout_kernel, swiglu_kernel, swiglu_backward_kernel


@functools.cache
def _loss_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, V, GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One row of logits: its loss (0 without a target), and with GRAD softmax - one-hot written over it."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * V
        target = tl.load(targets_ptr + row)
        top = -float("inf")
        total = 0.0
        for v0 in range(0, V, BLOCK):  # running max and sum of exp(x - max)
            cols = v0 + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top = new_top
        lse = top + tl.log(total)
        valid = target >= 0
        picked = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if GRAD:
            for v0 in range(0, V, BLOCK):
                cols = v0 + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, tl.where(valid, g, 0.0).to(logits_ptr.dtype.element_ty), mask=cols < V)

    return cross_entropy_kernel


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """Float32 cross-entropy of each row of logits [R, V] (0 where the target is negative); with `grad`, the
    loss's gradient in the logits, softmax - one-hot (0 on rows without a target), written over them."""
    R, V = logits.shape
    losses = torch.empty(R, dtype=torch.float32, device=logits.device)
    _loss_kernel()[(R,)](logits, targets, losses, V, GRAD=grad, BLOCK=min(8192, next_pow2(V)), num_warps=16)
    return losses


@functools.cache
def _lora_kernels():
    from . import triton_lora as k  # (imports Triton: only when a kernel is first asked for)

    return k.lora_a_kernel, k.lora_a_grad_kernel, k.lora_dx_kernel, k.mask_kernel, k.rms_norm_kernel, \
        k.rms_norm_backward_kernel, k.rope_kernel


def _launches(t: torch.Tensor):
    """(rows, columns, grid, index) of each launch over t as [rows, N] (N its last dimension): whole rows, fewer
    than CHUNK elements a launch, so that Philox indices stay within int32; each launch gets its own seed."""
    N = t.shape[-1] if t.dim() else 1
    rows = t.numel() // N if N else 0
    per_launch = max(1, CHUNK // N) if N else 1
    block = min(BLOCK, next_pow2(N))
    for i, r0 in enumerate(range(0, rows, per_launch)):
        r1 = min(rows, r0 + per_launch)
        yield slice(r0 * N, r1 * N), N, (r1 - r0, -(-N // block)), block, i


def dropout(x: torch.Tensor, p: float, seed: tuple, add_to: torch.Tensor | None = None) -> torch.Tensor:
    kernel = _kernels()[0]
    seed_tensor, offset = seed
    x = x.contiguous()
    out = torch.empty_like(x) if add_to is None else add_to
    flat_x, flat_out = x.view(-1), out.view(-1)
    for part, N, grid, block, i in _launches(x):
        kernel[grid](flat_x[part], flat_out[part], flat_out[part], seed_tensor, offset + i, p, 1.0 / (1.0 - p),
                     N=N, HAS_ADD=add_to is not None, BLOCK=block, num_warps=WARPS)
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, p: float = 0.0, seed: tuple | None = None):
    """(silu(gate) * up, its dropout or None)."""
    kernel = _kernels()[1]
    seed_tensor, offset = seed if seed is not None else (gate, 0)  # (not read when p is 0)
    c = torch.empty_like(gate)
    dropped = torch.empty_like(gate) if p > 0 else c
    g, u, fc, fd = gate.view(-1), up.view(-1), c.view(-1), dropped.view(-1)
    for part, N, grid, block, i in _launches(gate):
        kernel[grid](g[part], u[part], fc[part], fd[part], seed_tensor, offset + i, p,
                     1.0 / (1.0 - p) if p < 1 else 0.0, N=N, DROP=p > 0, BLOCK=block, num_warps=WARPS)
    return c, (dropped if p > 0 else None)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad_c: torch.Tensor):
    """Gradients of gate and up for grad_c, written over gate and up (which are then returned)."""
    kernel = _kernels()[2]
    g, u, dc = gate.view(-1), up.view(-1), grad_c.contiguous().view(-1)
    for part, N, grid, block, _ in _launches(gate):
        kernel[grid](g[part], u[part], dc[part], N=N, BLOCK=block, num_warps=WARPS)
    return gate, up


def next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _rank_pad(r: int) -> int:
    return max(16, next_pow2(r))  # tl.dot wants every dimension >= 16


def _launch_seed(p: float, seed, like):
    """(seed tensor, offset, whether to drop) for a launch; with p = 0 nothing is drawn and `like`
    stands in for the seed tensor (never read)."""
    if p > 0:
        return seed[0], seed[1], True
    return like, 0, False


def _threshold(p: float) -> int:
    return int(round(p * 2**24))  # keep when the hash's top 24 bits are >= this


SMS = 132  # streaming multiprocessors of an H100: split work so that each gets a few programs


def lora_a(x, a, p: float, seed, step: int):
    """x [T, K], a [P, R, K] (any float dtype) -> [T, P*R] in x's dtype: dropout_i(x) A_i^T side by side."""
    import torch

    T, K = x.shape
    P, R, _ = a.shape
    BT, BK = 64, 64
    t_blocks = (T + BT - 1) // BT
    splits = max(1, min((K + 511) // 512, (4 * SMS + t_blocks * P - 1) // (t_blocks * P)))
    per_split = ((K + splits - 1) // splits + BK - 1) // BK * BK
    splits = (K + per_split - 1) // per_split
    partial = torch.empty(splits, T, P * R, dtype=torch.float32, device=x.device)
    seed_t, offset, drop = _launch_seed(p, seed, x)
    _lora_kernels()[0][(t_blocks, P, splits)](x, a, partial, T, K, per_split, seed_t, offset, step, _threshold(p),
                                              1.0 / (1.0 - p), R=R, RP=_rank_pad(R), P=P, DROP=drop, BT=BT, BK=BK)
    return (partial[0] if splits == 1 else partial.sum(0)).to(x.dtype)


def lora_a_grad(x, gb, P: int, p: float, seed, step: int):
    """x [T, K], gb [T, P*R] -> float32 [P, R, K]: gb_i^T dropout_i(x) for each i."""
    import torch

    T, K = x.shape
    R = gb.shape[1] // P
    BT, BK = 64, 128
    k_blocks = (K + BK - 1) // BK
    splits = max(1, min((T + 255) // 256, (4 * SMS + k_blocks * P - 1) // (k_blocks * P)))
    rows = ((T + splits - 1) // splits + BT - 1) // BT * BT
    splits = (T + rows - 1) // rows if T else 1
    partial = torch.empty(splits, P, R, K, dtype=torch.float32, device=x.device)
    seed_t, offset, drop = _launch_seed(p, seed, x)
    _lora_kernels()[1][(k_blocks, P, splits)](x, gb, partial, T, K, rows, seed_t, offset, step, _threshold(p),
                                              1.0 / (1.0 - p), R=R, RP=_rank_pad(R), P=P, DROP=drop, BT=BT, BK=BK)
    return partial[0] if splits == 1 else partial.sum(0)


def lora_dx_add(dx, gb, a, p: float, seed, step: int):
    """dx [T, K] += sum_i dropout_i(gb_i A_i), in place; gb [T, P*R], a [P, R, K]."""
    T, K = dx.shape
    P, R, _ = a.shape
    BT, BK = 64, 128
    seed_t, offset, drop = _launch_seed(p, seed, dx)
    _lora_kernels()[2][((T + BT - 1) // BT, (K + BK - 1) // BK)](dx, gb, a, T, K, seed_t, offset, step, _threshold(p),
                                                                 1.0 / (1.0 - p), R=R, RP=_rank_pad(R), P=P,
                                                                 DROP=drop, BT=BT, BK=BK)
    return dx


def keep_mask(T: int, K: int, p: float, seed, device):
    """The keep mask (1.0 / 0.0) that the kernels above draw for (seed tensor, offset)."""
    import torch

    out = torch.empty(T, K, dtype=torch.float32, device=device)
    _lora_kernels()[3][((T + 31) // 32, (K + 63) // 64)](out, T, K, seed[0], seed[1], _threshold(p), BT=32, BK=64)
    return out


def rms_norm(x, w, eps: float):
    """(y, rstd) of transformers' RMSNorm for x [T, N]: y = w * (x * rstd).to(x.dtype); rstd float32 [T]."""
    import torch

    T, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(T, dtype=torch.float32, device=x.device)
    block, rows = _norm_tile(N)
    _lora_kernels()[4][((T + rows - 1) // rows,)](x, w, y, rstd, T, N, eps, BLOCK=block, ROWS=rows)
    return y, rstd


def rms_norm_backward(dy, x, w, rstd):
    import torch

    T, N = x.shape
    dx = torch.empty_like(x)
    block, rows = _norm_tile(N)
    _lora_kernels()[5][((T + rows - 1) // rows,)](dy.contiguous(), x, w, rstd, dx, T, N, BLOCK=block, ROWS=rows)
    return dx


def _norm_tile(n: int) -> tuple[int, int]:
    """(columns, rows) of one norm program: a hidden-size row alone, short rows (q/k heads) 2048 elements at once."""
    block = next_pow2(n)
    return block, max(1, min(64, 2048 // block))


def rope(x, cos, sin, backward: bool = False, interleaved: bool = False):
    """Rotary embedding (rotate-half, or GLM's interleaved pairs) of x [T, H, D] by cos/sin [T, D]; a new tensor."""
    import torch

    T, H, D = x.shape
    out = torch.empty_like(x)
    _lora_kernels()[6][(T,)](x.contiguous(), cos.contiguous(), sin.contiguous(), out, H, D=D, HB=next_pow2(H),
                             BACKWARD=backward, INTERLEAVED=interleaved)
    return out
