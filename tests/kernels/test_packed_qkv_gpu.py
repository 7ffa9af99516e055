"""The packed-qkv path (``functional._na_packed``: one autograd node on a fused projection's ``qkv``, gradient
written packed by the backward kernels) on a CUDA GPU: output and packed gradient against the float64 oracle, and
bitwise equal to the same kernels on the three unbound views (contiguous dq, dk, dv, stacked by autograd), for
random 1-D/2-D/3-D problems with and without a trained bias. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _problem(rng: random.Random):
    rank = rng.choice([1, 2, 3])
    kernel = tuple(rng.choice([3, 5, 7]) if rank < 3 else rng.choice([3, 5]) for _ in range(rank))
    dil = tuple(rng.choice([1, 1, 2]) for _ in range(rank))
    spatial = tuple(k * d + rng.randrange(0, 12 if rank < 3 else 4) for k, d in zip(kernel, dil, strict=True))
    return rank, spatial, rng.choice([1, 2, 4]), rng.choice([16, 32, 64]), kernel, dil, \
        rng.choice([torch.float16, torch.bfloat16]), rank < 3 and rng.random() < 0.6


@pytest.mark.parametrize("seed", range(12))
def test_packed_qkv_matches_oracle_and_the_unpacked_kernels(seed):
    import oracle

    from visattn import functional

    rng = random.Random(seed)
    rank, spatial, heads, d, kernel, dil, dtype, bias = _problem(rng)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(2, *spatial, 3, heads, d, device="cuda", generator=gen).to(dtype)
    rpb = None
    if bias:
        rpb = torch.randn(heads, *(2 * k - 1 for k in kernel), device="cuda", generator=gen) * 0.3
    g = torch.randn(2, *spatial, heads, d, device="cuda", generator=gen).to(dtype)

    leaf = qkv.clone().requires_grad_(True)
    table = None if rpb is None else rpb.clone().requires_grad_(True)
    out = functional._na_packed(rank, leaf, kernel, 1, dil, False, None, table, "triton")
    assert type(out.grad_fn).__name__ == "_PackedLocalAttentionBackward"
    got = torch.autograd.grad(out, [leaf] + ([table] if bias else []), g)

    views_leaf = qkv.clone().requires_grad_(True)
    views_table = None if rpb is None else rpb.clone().requires_grad_(True)
    na = (functional.na1d, functional.na2d, functional.na3d)[rank - 1]
    out_views = na(*views_leaf.unbind(-3), kernel, dilation=dil, rpb=views_table, backend="triton")
    want_views = torch.autograd.grad(out_views, [views_leaf] + ([views_table] if bias else []), g)
    assert torch.equal(out, out_views)
    for a, b in zip(got, want_views, strict=True):
        assert torch.equal(a, b)

    ref_leaf = qkv.double().requires_grad_(True)
    ref_table = None if rpb is None else rpb.double().requires_grad_(True)
    ref = oracle.na_oracle(*ref_leaf.unbind(-3), kernel, 1, dil, False, scale=d**-0.5, rpb=ref_table)
    want = torch.autograd.grad(ref, [ref_leaf] + ([ref_table] if bias else []), g.double())
    for name, a, b in zip(("out", "dqkv", "drpb"), (out, *got), (ref, *want), strict=False):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-2, (name, err, rank, spatial, heads, d, kernel, dil, dtype, bias)
