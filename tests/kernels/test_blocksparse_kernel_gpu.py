"""GPU sweep of the block-sparse Triton kernels (Radial Attention, VMoBA) against the float64 reference on the same
device (forward and every gradient), at the release's 128-token blocks and at odd shapes; and sliding-tile attention
on the engine. The reference path is checked against the dense oracles on the CPU (tests/test_video_ops.py)."""

import random

import pytest
import torch

import visattn

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative: ||out - ref|| / ||ref||


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def _problem(rng, video, heads, d, dv, dtype, n_extra):
    batch = rng.randint(1, 2)
    qkv = torch.randn(batch, *video, 3, heads, max(d, dv), device="cuda", dtype=dtype)
    q, k, v = qkv[..., 0, :, :d], qkv[..., 1, :, :d], qkv[..., 2, :, :dv]  # strided views
    extra = [torch.randn(batch, n_extra, heads, c, device="cuda", dtype=dtype) for c in (d, dv)] if n_extra else []
    return [t.detach().requires_grad_() for t in (q, k, v, *extra)]


def _compare(run, leaves, dtype, ref_dtype=torch.float64):
    out = run(*leaves, "triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    l64 = [t.detach().to(ref_dtype).requires_grad_() for t in leaves]
    ref = run(*l64, "reference")
    ref_grads = torch.autograd.grad(ref, l64, grad.to(ref_dtype))
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < TOL[dtype]
    for g, r in zip(grads, ref_grads, strict=True):
        assert _rel(g, r) < 4 * TOL[dtype]


@pytest.mark.parametrize("seed", range(12))
def test_radial_random_problems(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    block = rng.choice([16, 64, 128])
    video = (rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 20))
    d = rng.choice([32, 64, 128, 72])
    leaves = _problem(rng, video, rng.randint(1, 3), d, rng.choice([d, 32]), dtype, rng.choice([0, 7]))
    decay, sink = rng.choice([0.2, 0.95, 1.0]), rng.random() < 0.5

    def run(q, k, v, *extra_and_backend):
        *extra, backend = extra_and_backend
        return visattn.radial_attention(q, k, v, block, decay, sink, None, *(extra or (None, None)),
                                        backend=backend)

    _compare(run, leaves, dtype)


@pytest.mark.parametrize("seed", range(12))
def test_vmoba_random_problems(seed):
    rng = random.Random(100 + seed)
    video = (rng.choice([2, 4, 6]), rng.choice([4, 8]), rng.choice([4, 8, 12]))
    chunk = rng.choice([1, 2, (2, 4), (2, 2, 4)])
    d = rng.choice([32, 64, 128])
    leaves = _problem(rng, video, rng.randint(1, 3), d, d, torch.float32, rng.choice([0, 5]))
    mode = rng.choice(["threshold", "topk"])

    def run(q, k, v, *extra_and_backend):
        *extra, backend = extra_and_backend
        return visattn.vmoba_attention(q, k, v, chunk, mode, 2, 0.25, "query_head", None,
                                       *(extra or (None, None)), backend=backend)

    # The chunk choice comes from float32 gates for float32/16-bit inputs and float64 ones for float64: a float64
    # reference could pick another chunk at a near-tie. Both sides run float32 (same gates, same choice).
    leaves = [t.detach().float().requires_grad_() for t in leaves]
    _compare(run, leaves, torch.float32, ref_dtype=torch.float32)


def test_sliding_tile_on_the_engine():
    rng = random.Random(0)
    leaves = _problem(rng, (6, 16, 16), 2, 64, 64, torch.bfloat16, 4)

    def run(q, k, v, ek, ev, backend):
        return visattn.sliding_tile_attention(q, k, v, (3, 4, 4), (1, 3, 3), additional_keys=ek,
                                              additional_values=ev, backend=backend)

    _compare(run, leaves, torch.bfloat16)
