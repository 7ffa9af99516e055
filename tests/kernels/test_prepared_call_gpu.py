"""Replayed eager calls (``ops.PreparedCall``) on the GPU, against the float64 oracle: repeated calls with new values
on the small-map and tiled paths, forward and every gradient (q, k, v, rpb); no-grad replays back to back (the
scratch LSE); and a view whose data pointer is 16-byte misaligned after an aligned call of the same shape, which
must not replay the aligned plan (Triton specialises compiled kernels on pointer alignment). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from oracle import na_oracle

import visattn
from visattn import functional

pytestmark = pytest.mark.gpu

# bf16 inputs against float64, max error over max magnitude; gradients (the bias one sums over the map) twice that
ATOL = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("side,heads", [(7, 4), (14, 4), (28, 2)])  # small-map and tiled paths
def test_replays_match_the_oracle(side, heads):
    gen = torch.Generator(device="cuda").manual_seed(side)
    rpb = torch.randn(heads, 13, 13, device="cuda", generator=gen) * 0.5
    for _ in range(3):
        qkv = torch.randn(2, side, side, 3, heads, 32, device="cuda", dtype=torch.bfloat16, generator=gen)
        leaf = qkv.clone().requires_grad_(True)
        table = rpb.clone().requires_grad_(True)
        g = torch.randn(2, side, side, heads, 32, device="cuda", dtype=torch.bfloat16, generator=gen)
        q, k, v = leaf.unbind(-3)
        out = visattn.na2d(q, k, v, 7, rpb=table)
        got = torch.autograd.grad(out, (leaf, table), g)
        ref_leaf = qkv.double().requires_grad_(True)
        ref_table = rpb.double().requires_grad_(True)
        rq, rk, rv = ref_leaf.unbind(-3)
        ref = na_oracle(rq, rk, rv, 7, rpb=ref_table)
        want = torch.autograd.grad(ref, (ref_leaf, ref_table), g.double())
        assert _rel(out, ref) < ATOL
        for a, b in zip(got, want, strict=True):
            assert _rel(a, b) < 2 * ATOL
        with torch.no_grad():
            q, k, v = qkv.unbind(-3)
            assert _rel(visattn.na2d(q, k, v, 7, rpb=rpb), ref.detach()) < ATOL


def test_a_misaligned_view_is_not_replayed_on_the_aligned_plan():
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 14, 14, 4, 32)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    with torch.no_grad():
        visattn.na2d(q, k, v, 7)
        before = len(functional._VALIDATED)
        flat = torch.randn(q.numel() + 1, device="cuda", dtype=torch.bfloat16, generator=gen)
        q_odd = flat[1:].view(shape)  # 2 bytes past a 16-byte boundary
        out = visattn.na2d(q_odd, k, v, 7)
    assert len(functional._VALIDATED) == before + 1
    ref = na_oracle(q_odd.double(), k.double(), v.double(), 7)
    assert _rel(out, ref) < ATOL
