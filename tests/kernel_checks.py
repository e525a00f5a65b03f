"""Checks of tunesmith.engine.kernels against plain torch, on whatever device is given (CUDA, or the CPU
under TRITON_INTERPRET=1). Run by tests/test_fast.py on the CPU and by bench/ on a GPU.

    python tests/kernel_checks.py cpu|cuda
"""

import sys

import torch

from tunesmith.engine import kernels


def run(device: str) -> None:
    dropout_and_swiglu(device)
    saved = kernels.CHUNK
    kernels.CHUNK = 2500  # two rows of 1000 a launch: several launches, each with its own seed
    try:
        dropout_and_swiglu(device)
    finally:
        kernels.CHUNK = saved
    lean_layers(device)
    cross_entropy(device)
    lora_kernels(device)
    norm_and_rope(device)
    expert_matmuls(device)
    if device.startswith("cuda"):
        flash_windows(device)
    print(f"kernel checks passed on {device}")


def dropout_and_swiglu(device: str) -> None:
    """dropout's masks (the same for the same seed, new for another seed or another row), swiglu and its backward."""
    torch.manual_seed(0)
    x = torch.randn(3, 1000, device=device)
    p = 0.3

    def seed(n):
        return torch.tensor([n], device=device), 0

    mask = kernels.dropout(torch.ones_like(x), p, seed(77))  # keep / (1 - p), or 0
    assert not torch.equal(mask[0], mask[2]) and not torch.equal(mask[0], mask[1])  # no row repeats another's mask
    kept = (mask != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept
    assert torch.allclose(mask[mask != 0], torch.full_like(mask[mask != 0], 1 / (1 - p)))
    torch.testing.assert_close(kernels.dropout(x, p, seed(77)), x * mask)  # the same mask again
    assert not torch.equal(kernels.dropout(torch.ones_like(x), p, seed(78)), mask)  # another seed, another mask
    out = torch.randn_like(x)
    expect = out + x * mask
    torch.testing.assert_close(kernels.dropout(x, p, seed(77), add_to=out), expect)

    gate, up = torch.randn(2, 5000, device=device), torch.randn(2, 5000, device=device)
    c, dropped = kernels.swiglu(gate, up, p, seed(5))
    torch.testing.assert_close(c, torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(dropped, c * kernels.dropout(torch.ones_like(c), p, seed(5)))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    grad_c = torch.randn_like(c)
    (torch.nn.functional.silu(g) * u).backward(grad_c)
    grad_gate, grad_up = kernels.swiglu_backward(gate.clone(), up.clone(), grad_c)
    torch.testing.assert_close(grad_gate, g.grad)
    torch.testing.assert_close(grad_up, u.grad)


def cross_entropy(device: str) -> None:
    """kernels.cross_entropy_ (the fused loss's kernel): each row's loss as F.cross_entropy gives it, 0 for rows
    without a target, and softmax - one-hot written over the logits, over a vocabulary of several blocks."""
    vocab = 20_000  # three blocks of 8192, the last one partial
    logits = (torch.randn(6, vocab, device=device) * 4).bfloat16()
    targets = torch.tensor([3, -100, vocab - 1, 0, 12_345, -100], device=device)
    expect = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # 0 where ignored
    probs = logits.float().softmax(-1)
    rows = torch.arange(6, device=device)[targets >= 0]
    probs[rows, targets[targets >= 0]] -= 1.0
    probs[targets < 0] = 0.0
    losses = kernels.cross_entropy_(logits, targets, grad=False)
    torch.testing.assert_close(losses, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(losses[targets < 0], torch.zeros(2, device=device))
    grad = logits.clone()
    torch.testing.assert_close(kernels.cross_entropy_(grad, targets, grad=True), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), probs.bfloat16().float(), rtol=2**-7, atol=1e-6)  # one bf16 rounding
    assert (grad[targets >= 0].float().sum(-1).abs() < 0.05).all()  # a softmax less one: each row sums to ~0


def expert_matmuls(device: str) -> None:
    """engine/moe_lora.project: the grouped matmuls over tokens sorted by expert (bf16, some experts given no token)
    give what one expert at a time gives, forward and backward, base weight and LoRA factors."""
    from tunesmith.engine import moe_lora

    experts, out, inp, rank = 8, 96, 64, 16
    counts = torch.tensor([5, 0, 17, 1, 0, 30, 9, 2], device=device)
    weight = (torch.randn(experts, out, inp, device=device) / 8).bfloat16()
    lhs = (torch.randn(experts, out, rank, device=device) / 4).bfloat16()
    rhs = (torch.randn(experts, rank, inp, device=device) / 4).bfloat16()
    x = torch.randn(int(counts.sum()), inp, device=device).bfloat16()
    grad = torch.randn(x.shape[0], out, device=device).bfloat16()
    results = []
    for grouped in (True, False):
        assert moe_lora._grouped(x, weight, (lhs, rhs, 2.0))
        leaves = [t.clone().requires_grad_() for t in (x, lhs, rhs)]
        original = moe_lora._grouped
        moe_lora._grouped = original if grouped else (lambda *a: False)
        try:
            y = moe_lora.project(leaves[0], weight, (leaves[1], leaves[2], 2.0), counts)
        finally:
            moe_lora._grouped = original
        y.backward(grad)
        results.append([y.float()] + [t.grad.float() for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def lora_kernels(device: str) -> None:
    """lora_a / lora_a_grad / lora_dx_add against torch with the masks the kernels draw (keep_mask)."""
    torch.manual_seed(2)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 2e-2, "atol": 5e-2}
    T, K, P, R, p, step = 70, 200, 3, 8, 0.25, 65_537
    seed_t = torch.tensor([99], device=device)
    x = torch.randn(T, K, device=device, dtype=dtype)
    a = torch.randn(P, R, K, device=device)
    masks = [kernels.keep_mask(T, K, p, (seed_t, 11 + i * step), device) for i in range(P)]
    kept = torch.stack(masks).mean().item()
    assert abs(kept - (1 - p)) < 0.03, kept
    a_used = a.to(dtype).float()  # (the kernels multiply in x's precision)
    a = a_used if device == "cpu" else a
    assert all(not torch.equal(masks[0], m) for m in masks[1:])  # each projection its own mask
    agree = (masks[0] == masks[1]).float().mean().item()  # independent masks agree on p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.03, agree
    dropped = [(x.float() * m / (1 - p)) for m in masks]
    expect = torch.cat([d @ a_used[i].t() for i, d in enumerate(dropped)], 1)
    torch.testing.assert_close(kernels.lora_a(x, a, p, (seed_t, 11), step).float(), expect, **tol)
    gb = torch.randn(T, P * R, device=device, dtype=dtype)
    expect = torch.stack([gb[:, i * R:(i + 1) * R].float().t() @ d for i, d in enumerate(dropped)])
    torch.testing.assert_close(kernels.lora_a_grad(x, gb, P, p, (seed_t, 11), step), expect, **tol)
    dx = torch.randn(T, K, device=device, dtype=dtype)
    expect = dx.float() + sum((gb[:, i * R:(i + 1) * R].float() @ a_used[i]) * masks[i] / (1 - p) for i in range(P))
    torch.testing.assert_close(kernels.lora_dx_add(dx.clone(), gb, a, p, (seed_t, 11), step).float(), expect, **tol)
    # no dropout: the same kernels without masks
    torch.testing.assert_close(kernels.lora_a(x, a, 0.0, None, step).float(),
                               torch.cat([x.float() @ a_used[i].t() for i in range(P)], 1), **tol)


def norm_and_rope(device: str) -> None:
    """rms_norm / rope kernels against transformers' formulas and autograd."""
    torch.manual_seed(3)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = {"rtol": 1e-4, "atol": 1e-4} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}
    for rows, n in ((9, 96), (77, 128), (5, 3584)):  # a hidden row; q/k heads, many to a program, a part-filled last
        x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
        xf = x.float()
        ref = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        dy = torch.randn_like(ref)
        (ref_dx,) = torch.autograd.grad(ref, x, dy)
        y, rstd = kernels.rms_norm(x.detach(), w, 1e-6)
        torch.testing.assert_close(y.float(), ref.float(), **tol)
        torch.testing.assert_close(rstd, torch.rsqrt(xf.detach().pow(2).mean(-1) + 1e-6), **tol)
        torch.testing.assert_close(kernels.rms_norm_backward(dy, x.detach(), w, rstd).float(), ref_dx.float(), **tol)
    T, H, D = 7, 3, 16
    q = torch.randn(T, H, D, device=device, dtype=dtype, requires_grad=True)
    angles = torch.randn(T, D // 2, device=device)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    ref = q * cos[:, None] + torch.cat((-q[..., D // 2:], q[..., :D // 2]), -1) * sin[:, None]
    g = torch.randn_like(ref)
    (ref_dq,) = torch.autograd.grad(ref, q, g)
    torch.testing.assert_close(kernels.rope(q.detach(), cos, sin).float(), ref.float(), **tol)
    torch.testing.assert_close(kernels.rope(g, cos, sin, backward=True).float(), ref_dq.float(), **tol)
    # GLM's interleaved pairs (its apply_rotary_pos_emb: the first half of cos/sin, each angle twice)
    c2, s2 = (t[:, None, :D // 2].repeat_interleave(2, -1) for t in (cos, sin))
    ref = q * c2 + torch.stack((-q[..., 1::2], q[..., 0::2]), -1).flatten(-2) * s2
    (ref_dq,) = torch.autograd.grad(ref, q, g)
    torch.testing.assert_close(kernels.rope(q.detach(), cos, sin, interleaved=True).float(), ref.float(), **tol)
    torch.testing.assert_close(kernels.rope(g, cos, sin, True, True).float(), ref_dq.float(), **tol)


def lean_layers(device: str) -> None:
    """LoraLinear and SwigluLoraDown (the kernels' users) against autograd on the same dropout masks."""
    from tunesmith.engine.lora_linear import LoraLinear, SwigluLoraDown, _dropout, begin_forward

    torch.manual_seed(1)
    p, seed, scale = 0.2, 4242, 0.7  # (seed: the projection's offset from the pass's seed)
    begin_forward(device)
    x = torch.randn(6, 64, device=device, requires_grad=True)
    w, bias = torch.randn(48, 64, device=device), torch.randn(48, device=device)
    a = torch.randn(4, 64, device=device, requires_grad=True)
    b = torch.randn(48, 4, device=device, requires_grad=True)
    grad = torch.randn(6, 48, device=device)
    mask = _dropout(torch.ones(6, 64, device=device), p, seed)
    reference = x @ w.t() + bias + scale * ((x * mask) @ a.t()) @ b.t()
    expect = torch.autograd.grad(reference, (x, a, b), grad)
    got = torch.autograd.grad(LoraLinear.apply(x, w, bias, a, b, scale, p, seed), (x, a, b), grad)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    gate, up = (torch.randn(6, 64, device=device, requires_grad=True) for _ in range(2))
    c = torch.nn.functional.silu(gate) * up
    mask = _dropout(torch.ones(6, 64, device=device), p, seed)
    reference = c @ w.t() + scale * ((c * mask) @ a.t()) @ b.t()
    expect = torch.autograd.grad(reference, (gate, up, a, b), grad)
    got = torch.autograd.grad(SwigluLoraDown.apply(gate, up, w, None, a, b, scale, p, seed), (gate, up, a, b), grad)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def flash_windows(device: str) -> None:
    """Flash attention over packed samples, causal and over a sliding window (Gemma's, Mistral's layers), against
    the per-sample masked SDPA in float32: output and the gradients of q, k and v, grouped-query heads."""
    from tunesmith.engine.attention import FlashVarlen, _per_sample_banded

    torch.manual_seed(2)
    lengths, heads, kv_heads, d = [300, 77, 1000], 8, 2, 128
    bounds = torch.tensor([0, 300, 377, 1377], dtype=torch.int32, device=device)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(T, heads, d, device=device, dtype=torch.bfloat16)
    for window in (None, 64, 299):
        out = FlashVarlen.apply(q, k, v, bounds, max(lengths), d ** -0.5, window)
        got = torch.autograd.grad(out, (q, k, v), grad)
        q32, k32, v32 = (t.detach().float().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        ref = _per_sample_banded(q32, k32, v32, bounds, d ** -0.5, window, None)[0].transpose(0, 1)
        expect = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        for g, e in zip(got, expect):
            torch.testing.assert_close(g.float(), e.transpose(1, 2)[0] if e.dim() == 4 else e, rtol=5e-2, atol=5e-2)


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "cuda")
