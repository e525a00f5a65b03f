"""Triton kernels of the lean decoder layer (wrapped, documented and tested through kernels.py).

Imported on first use only (it imports Triton). The dropout mask of projection i is
keep(seed + offset + i * step, t * K + k): a cheap integer hash (lowbias32) of the element's counter
and the hashed seed, compared with p: drawn inside every kernel that needs it, never stored.
"""

import triton
import triton.language as tl


@triton.jit
def _hash(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def keep(seed, rows, cols, K, threshold):
    """The keep mask of a [rows, cols] tile for an int seed; threshold = p * 2^24."""
    s = _hash(seed.to(tl.uint32))
    counters = rows[:, None].to(tl.uint32) * K + cols[None, :].to(tl.uint32)
    return (_hash((counters ^ s) * 0x9E3779B1 + s) >> 8).to(tl.int32) >= threshold


@triton.jit
def dropped_tile(x_ptr, rows, cols, row_end, col_end, K, seed, threshold, DROP: tl.constexpr):
    """x[rows, cols] of a row-major [*, K] tensor, zero outside rows < row_end and cols < col_end, with the
    dropout mask of `seed` applied when DROP."""
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                mask=(rows[:, None] < row_end) & (cols[None, :] < col_end), other=0.0)
    if DROP:
        x = tl.where(keep(seed, rows, cols, K, threshold), x, 0.0)
    return x


# Row counts and seeds change from pass to pass: Triton would build one more variant of each kernel for
# every new combination of their divisibility by 16 (seconds on a user's first run, and again for each
# padded CUDA-graph row), so those arguments are not specialized on.
@triton.jit(do_not_specialize=["T", "offset", "step"])
def lora_a_kernel(x_ptr, a_ptr, out_ptr, T, K, k_per_split, seed_ptr, offset, step, threshold, keep_scale,
                  R: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, DROP: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr):
    """out[split, t, i*R + r] = keep_scale * sum over this split's k of keep_i(t, k) x[t, k] A_i[r, k]."""
    i = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ranks = tl.arange(0, RP)
    acc = tl.zeros([BT, RP], dtype=tl.float32)
    seed = tl.load(seed_ptr) + offset + i * step
    start = split * k_per_split
    end = tl.minimum(start + k_per_split, K)
    for k0 in range(start, end, BK):
        cols = k0 + tl.arange(0, BK)
        x = dropped_tile(x_ptr, rows, cols, T, end, K, seed, threshold, DROP)
        a = tl.load(a_ptr + (i * R + ranks[None, :]) * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < end),
                    other=0.0)
        acc += tl.dot(x, a.to(x.dtype))
    out = out_ptr + (split * T + rows[:, None]).to(tl.int64) * (P * R) + i * R + ranks[None, :]
    tl.store(out, acc * keep_scale, mask=(rows[:, None] < T) & (ranks[None, :] < R))


@triton.jit(do_not_specialize=["T", "offset", "step"])
def lora_a_grad_kernel(x_ptr, g_ptr, out_ptr, T, K, rows_per_split, seed_ptr, offset, step, threshold, keep_scale,
                       R: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, DROP: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr):
    """out[split, i, r, k] = keep_scale * sum over this split's t of g[t, i*R + r] keep_i(t, k) x[t, k]."""
    i = tl.program_id(1)
    split = tl.program_id(2)
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, RP)
    acc = tl.zeros([RP, BK], dtype=tl.float32)
    seed = tl.load(seed_ptr) + offset + i * step
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, T)
    for t0 in range(start, end, BT):
        rows = t0 + tl.arange(0, BT)
        x = dropped_tile(x_ptr, rows, cols, end, K, K, seed, threshold, DROP)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * (P * R) + i * R + ranks[None, :],
                    mask=(rows[:, None] < end) & (ranks[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(g.to(x.dtype)), x)
    out = out_ptr + ((split * P + i) * R + ranks[:, None]) * K + cols[None, :]
    tl.store(out, acc * keep_scale, mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["T", "offset", "step"])
def lora_dx_kernel(dx_ptr, g_ptr, a_ptr, T, K, seed_ptr, offset, step, threshold, keep_scale, R: tl.constexpr,
                   RP: tl.constexpr, P: tl.constexpr, DROP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    """dx[t, k] += keep_scale * sum_i keep_i(t, k) sum_r g[t, i*R + r] A_i[r, k]."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, RP)
    inside = (rows[:, None] < T) & (cols[None, :] < K)
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for i in tl.static_range(P):
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * (P * R) + i * R + ranks[None, :],
                    mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
        a = tl.load(a_ptr + (i * R + ranks[:, None]) * K + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        part = tl.dot(g, a.to(g.dtype))
        if DROP:
            part = tl.where(keep(tl.load(seed_ptr) + offset + i * step, rows, cols, K, threshold), part, 0.0)
        acc += part
    dx = tl.load(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], (dx + acc * keep_scale).to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["T", "offset"])
def mask_kernel(out_ptr, T, K, seed_ptr, offset, threshold, BT: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = keep(tl.load(seed_ptr) + offset, rows, cols, K, threshold)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], m.to(tl.float32), mask=(rows[:, None] < T) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["T"])  # (a packed row's length varies: one build for all)
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, T, N, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # ROWS rows per program: a short row (a q/k head of 128) alone would leave most of the program idle
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < T) & (cols[None, :] < N)
    at = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + at, (normed * w[None, :]).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + rows, rstd, mask=rows < T)


@triton.jit(do_not_specialize=["T"])
def rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, T, N, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < T) & (cols[None, :] < N)
    at = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < T, other=0.0)
    normed = x * rstd[:, None]
    dn = dy * w[None, :]
    dx = rstd[:, None] * (dn - normed * (tl.sum(dn * normed, axis=1) / N)[:, None])
    tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, D: tl.constexpr, HB: tl.constexpr, BACKWARD: tl.constexpr,
                INTERLEAVED: tl.constexpr):
    # pair i: channels (i, i + D/2), or (2i, 2i + 1) INTERLEAVED (GLM's: both by the angle of cos/sin's first half)
    t = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HB)
    half = tl.arange(0, D // 2)
    first = 2 * half if INTERLEAVED else half
    other = 1 if INTERLEAVED else D // 2
    second_angle = half if INTERLEAVED else D // 2 + half
    inside = heads[:, None] < H
    base = x_ptr + t * H * D + heads[:, None] * D + first[None, :]
    x1 = tl.load(base, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(base + other, mask=inside, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * D + half).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * D + second_angle).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * D + half).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * D + second_angle).to(tl.float32)[None, :]
    if BACKWARD:  # the transpose of the rotation
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out = out_ptr + t * H * D + heads[:, None] * D + first[None, :]
    tl.store(out, y1.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(out + other, y2.to(out_ptr.dtype.element_ty), mask=inside)
