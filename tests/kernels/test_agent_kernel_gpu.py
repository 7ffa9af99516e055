"""GPU sweep of the fused Triton agent-attention kernels against the float64 oracle (forward and every gradient:
q, k, v, agents, both biases), over random shapes, dtypes, bias broadcasts and strided layouts."""

import math
import random

import pytest
import torch
from oracle import agent_oracle

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative: ||x - ref|| / ||ref||


def _rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


# (dtype, spatial, heads, D, Dv, agents): the tile extremes (agents padded to 256, head dims to 128)
EXTREMES = [
    (torch.float16, (87,), 2, 64, 32, 256),
    (torch.bfloat16, (30, 30), 3, 32, 32, 256),
    (torch.float32, (300,), 2, 16, 16, 256),
    (torch.bfloat16, (20, 20), 2, 128, 128, 128),
    (torch.float16, (87,), 2, 72, 32, 49),
    (torch.float16, (87,), 2, 72, 32, 16),
    (torch.float32, (17, 19), 2, 128, 128, 100),
    (torch.bfloat16, (56, 56), 3, 32, 32, 9),
]


def _tile(n_agents: int, head_dim: int) -> int:
    """The kernels' padded agent tile (elements), computed independently of the kernel module."""
    pad = lambda n: max(16, 2 ** math.ceil(math.log2(n)))  # noqa: E731
    return pad(n_agents) * pad(head_dim)


def test_oversized_agent_tiles_are_refused_before_launch():
    from visattn import functional

    q = torch.randn(1, 9, 9, 2, 72, device="cuda", dtype=torch.float16)
    agents = torch.randn(1, 256, 2, 72, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="agent tile"):
        functional.agent_attention(q, q, q, agents, backend="triton")
    assert functional.which_backend("agent_attention", q, q, q, agents) == "sdpa"  # auto falls back


@pytest.mark.parametrize("case", range(len(EXTREMES)))
def test_tile_extremes(case):
    dtype, spatial, heads, d, dv, n_agents = EXTREMES[case]
    assert _tile(n_agents, max(d, dv)) <= 128 * 128
    _check_problem(random.Random(case), dtype, spatial, 2, heads, d, dv, n_agents)


@pytest.mark.parametrize("seed", range(36))
def test_random_problems(seed):
    rng = random.Random(seed)
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    rank = rng.choice([1, 2, 2, 3])
    spatial = tuple(rng.randint(1, {1: 700, 2: 40, 3: 9}[rank]) for _ in range(rank))
    batch, heads = rng.randint(1, 3), rng.randint(1, 4)
    d = rng.choice([16, 32, 64, 128, 24, 72])
    dv = rng.choice([d, d, 32])
    n_agents = rng.choice([a for a in (1, 9, 16, 49, 64, 100, 256) if _tile(a, max(d, dv)) <= 128 * 128])
    _check_problem(rng, dtype, spatial, batch, heads, d, dv, n_agents)


def _check_problem(rng, dtype, spatial, batch, heads, d, dv, n_agents):
    from visattn.kernels.agent_attn import agent_attention

    n = 1
    for size in spatial:
        n *= size
    if rng.random() < 0.5:  # strided views of one fused qkv tensor
        qkv = torch.randn(batch, *spatial, 3, heads, max(d, dv), device="cuda", dtype=dtype)
        q, k, v = qkv[..., 0, :, :d], qkv[..., 1, :, :d], qkv[..., 2, :, :dv]
    else:
        q, k = (torch.randn(batch, *spatial, heads, d, device="cuda", dtype=dtype) for _ in range(2))
        v = torch.randn(batch, *spatial, heads, dv, device="cuda", dtype=dtype)
    agents = torch.randn(batch, n_agents, heads, d, device="cuda", dtype=dtype)

    def bias(shape):
        kind = rng.choice([None, "broadcast", "full"])
        if kind is None:
            return None
        return torch.randn((batch if kind == "full" else 1, *shape), device="cuda", dtype=dtype)

    agent_bias, query_bias = bias((heads, n_agents, n)), bias((heads, n, n_agents))
    inputs = [q, k, v, agents, agent_bias, query_bias]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    torch.full((1 << 26,), float("nan"), device="cuda")  # poison the allocator: unwritten outputs show as NaN
    out = agent_attention(*leaves, d**-0.5)
    grad = torch.randn_like(out)
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, used, grad)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = agent_oracle(*leaves64, scale=d**-0.5)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves64 if t is not None], grad.double())
    info = (f"{dtype} B{batch} {spatial} h{heads} d{d}/{dv} agents {n_agents} "
            f"biases {[None if b is None else tuple(b.shape) for b in (agent_bias, query_bias)]}")
    assert not torch.isnan(out).any(), info
    assert _rel(out, ref) < TOL[dtype], info
    for index, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert not torch.isnan(g).any(), f"{info} grad {index}"
        assert _rel(g, r) < 2 * TOL[dtype], f"{info} grad {index}: {_rel(g, r)}"
