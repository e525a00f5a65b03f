"""How closely two float computations of the same maths must agree in the CPU equality tests.

Two paths that run the same kernels on the same inputs (a layer recomputed in backward, a mask drawn
again from its seed) must agree bit for bit: `assert_same_bits`. Two paths that run different kernels
(transformers' layer against the lean layer, a padded batch against a packed row) add the same terms
in another order. A float32 sum of k terms in another order moves by up to ~k·eps·Σ|terms|; after
cancellation that can be most of an entry near zero, so a tolerance relative to each entry (or a fixed
absolute one) depends on the host's BLAS blocking (issue 22: 1 of 512 entries off by 1.4e-6 on a slower
host). Measured on these tests the paths differ by at most ~6 eps of each tensor's largest entry; the
bound below is `ULPS` eps of it, while a wrong dropout mask or a wrong sample boundary moves a gradient
by 1e-2..1 of it, thousands of times more.
"""

import torch

ULPS = 256


def assert_same_bits(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: not bitwise equal (max diff {(got[name] - want[name]).abs().max().item():.3g})"


def summation_tolerance(want: torch.Tensor, ulps: int = ULPS) -> float:
    return ulps * torch.finfo(want.dtype).eps * want.abs().max().item()


def assert_close_up_to_summation_order(got: dict, want: dict, ulps: int = ULPS) -> None:
    """Every tensor within `ulps` eps of its own largest entry (see above)."""
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=summation_tolerance(want[name], ulps),
                                   msg=lambda m, name=name: f"{name}: {m}")
