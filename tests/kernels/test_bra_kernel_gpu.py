"""GPU sweep of the Triton bi-level routing kernels against the float64 reference (fwd and grads)."""

import random

import pytest
import torch

from visattn import reference

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative: ||out - ref|| / ||ref||


def _poison_allocator():
    """Fill the caching allocator's free blocks with NaN so an unwritten output element shows up as NaN."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("seed", range(40))
def test_random_problems(seed):
    from visattn.kernels.routing import bilevel_routing

    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    regions = (rng.randint(1, 7), rng.randint(1, 7))
    height = regions[0] * rng.randint(1, 9) - rng.choice([0, 0, 1]) if regions[0] > 1 else rng.randint(1, 9)
    width = regions[1] * rng.randint(1, 9) - rng.choice([0, 0, 1]) if regions[1] > 1 else rng.randint(1, 9)
    height, width = max(height, regions[0]), max(width, regions[1])
    n_regions = regions[0] * regions[1]
    topk = rng.randint(1, n_regions)
    batch, heads = rng.randint(1, 3), rng.randint(1, 4)
    d = rng.choice([16, 32, 64, 128, 24, 72])
    dv = rng.choice([d, d, 32])
    qkv = torch.randn(batch, height, width, 3, heads, max(d, dv), device="cuda", dtype=dtype)
    q, k, v = (qkv[..., i, :, :n] for i, n in enumerate((d, d, dv)))  # strided views of a fused qkv
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    _poison_allocator()
    out = bilevel_routing(q, k, v, regions, topk, d**-0.5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    # float32 reference: its routing sees exactly the values the kernel path routes on (no near-tie flips).
    q64, k64, v64 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference.bilevel_routing(q64, k64, v64, regions, topk, d**-0.5)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.float())
    info = f"{dtype} {batch}x{height}x{width} h{heads} d{d}/{dv} regions {regions} topk {topk}"
    assert not torch.isnan(out).any(), info
    assert _rel(out, ref) < TOL[dtype], info
    for g, r in zip(grads, ref_grads, strict=False):
        assert not torch.isnan(g).any(), info
        assert _rel(g, r) < 2 * TOL[dtype], info
