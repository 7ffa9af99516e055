"""The fused neighborhood / window engine on a CUDA GPU: a reduced random sweep (visattn.bench.check) against the
reference in float32/float64, plus torch.compile(fullgraph=True) with inductor. Skipped without CUDA."""

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _problems(rank: int, count: int):
    from visattn.bench import check

    rng = random.Random(1234 + rank)
    out = []
    while len(out) < count:
        p = check.draw_problem(rank, rng, len(out))
        if _tokens(p) <= 8192:  # small problems: the full sweep (visattn.bench.check) covers large ones
            out.append(p)
    return out


def _tokens(p):
    n = 1
    for length in p["lengths"]:
        n *= length
    return n


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_random_problems_match_reference(rank):
    from visattn.bench import check

    # 10 per rank: each problem compiles its own tile variant (~4 s); the device sweep `visattn check` runs 1000s
    results = [check.run_problem(p) for p in _problems(rank, 10)]
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[:3]


def test_torch_compile_inductor_fullgraph():
    from visattn import kernels

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(64, 3 * 64)
            self.rpb = torch.nn.Parameter(torch.randn(2, 13, 13))

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 32)).unbind(-3)
            return kernels.na(q, k, v, (7, 7), (1, 1), (1, 1), (False, False), self.rpb, 32 ** -0.5, None, None)

    torch._dynamo.reset()
    block = Block().cuda()
    compiled = torch.compile(block, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            x = torch.randn(2, 20, 24, 64, device="cuda")
            out = compiled(x)
            out.sum().backward()
            grad = block.rpb.grad.clone()
            block.zero_grad()
            ref = block(x)
            ref.sum().backward()
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grad, block.rpb.grad, atol=1e-3, rtol=1e-4)
            block.zero_grad()


def test_same_geometry_inference_then_training_with_a_trained_bias():
    """One geometry launched with a bfloat16 output (no grad) and then a float32 one (a trained rpb keeps the output
    in float32): each launch plan's compiled kernel must match its output dtype."""
    import visattn
    from visattn import reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 14, 14, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rpb = (0.1 * torch.randn(4, 13, 13, device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
    want = reference.na(q.float(), k.float(), v.float(), (7, 7), (1, 1), (1, 1), (False, False), rpb.detach().float(),
                        32**-0.5, None, None)
    with torch.no_grad():
        inference = visattn.na2d(q, k, v, 7, rpb=rpb)
    training = visattn.na2d(q, k, v, 7, rpb=rpb)
    for out in (inference, training):
        assert (out.float() - want).norm() / want.norm() < 2e-2
