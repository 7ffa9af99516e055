"""GPU sweep of the fused HaloNet kernels (visattn/kernels/halo.py, forward and backward) against the float64
reference path on the same device, at timm's HaloNet shapes (block 8, halo 2 / 3, query stride 1 and 2, head dims
16-64) and at odd ones; the reference path itself is checked against a brute-force oracle on the CPU
(tests/test_functional_halo.py), and the kernels under the interpreter (test_halo_kernel_interpret.py)."""

import random

import pytest
import torch

import visattn

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative: ||out - ref|| / ||ref||
TIMM_SHAPES = [  # (batch, key map, query stride, heads, dim_qk, dim_v, block, halo): halonet26t / sehalonet33ts
    (4, (64, 64), 1, 8, 16, 16, 8, 3),
    (4, (32, 32), 1, 8, 32, 32, 8, 2),
    (4, (32, 32), 2, 8, 64, 64, 8, 2),
    (4, (16, 16), 1, 8, 64, 64, 8, 3),
]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def _leaves(batch, kmap, stride, heads, dqk, dv, block, halo, dtype, fused, rel):
    if fused:  # q, k, v as channel slices of one projection (strided views), q strided in space as timm's
        qkv = torch.randn(batch, *kmap, heads, 2 * dqk + dv, device="cuda", dtype=dtype)
        q, k, v = qkv[:, ::stride, ::stride, :, :dqk], qkv[..., dqk:2 * dqk], qkv[..., 2 * dqk:]
    else:
        q = torch.randn(batch, kmap[0] // stride, kmap[1] // stride, heads, dqk, device="cuda", dtype=dtype)
        k = torch.randn(batch, *kmap, heads, dqk, device="cuda", dtype=dtype)
        v = torch.randn(batch, *kmap, heads, dv, device="cuda", dtype=dtype)
    tables = [torch.randn(2 * (b + 2 * h) - 1, dqk, device="cuda", dtype=dtype) * 0.3
              for b, h in zip(block, halo, strict=True)] if rel else []
    return [t.detach().requires_grad_() for t in (q, k, v, *tables)]


def _compare(leaves, block, halo, dtype):
    def run(tensors, backend):
        q, k, v, *tables = tensors
        return visattn.halo_attention(q, k, v, block, halo, *(tables or (None, None)), scale=q.shape[-1] ** -0.5,
                                      backend=backend)

    out = run(leaves, "triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = run(l64, "reference")
    ref_grads = torch.autograd.grad(ref, l64, grad.double())
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[dtype], _rel(out, ref)
    for name, g, r in zip(("q", "k", "v", "rel_h", "rel_w"), grads, ref_grads, strict=False):
        assert _rel(g, r) < 4 * TOL[dtype], (name, _rel(g, r))


@pytest.mark.parametrize("shape", TIMM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_timm_halonet_shapes(shape, dtype):
    batch, kmap, stride, heads, dqk, dv, block, halo = shape
    torch.manual_seed(0)
    leaves = _leaves(batch, kmap, stride, heads, dqk, dv, (block, block), (halo, halo), dtype, True, True)
    _compare(leaves, (block, block), (halo, halo), dtype)


@pytest.mark.parametrize("seed", range(16))
def test_random_problems(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    block = (rng.choice([2, 4, 7, 8]), rng.choice([2, 4, 8]))
    halo = (rng.randint(0, 4), rng.randint(0, 3))
    kmap = (block[0] * rng.randint(1, 5), block[1] * rng.randint(1, 5))
    stride = rng.choice([1, 2]) if block[0] % 2 == 0 and block[1] % 2 == 0 else 1
    dqk = rng.choice([8, 16, 32, 64, 40])
    leaves = _leaves(rng.randint(1, 3), kmap, stride, rng.randint(1, 4), dqk, rng.choice([dqk, 16]),
                     block, halo, dtype, rng.random() < 0.5, rng.random() < 0.7)
    _compare(leaves, block, halo, dtype)
