"""On CUDA: ``torch.compile(fullgraph=True)`` (inductor) through the public API and the nn modules on the fused
Triton path, forward and backward, one compiled frame and no recompile; and the fused path's ``return_lse``
against the exact reference. The CPU twin is tests/test_functional_compile.py. Skipped without CUDA."""

import pytest
import torch
from compile_check import check_fullgraph

import visattn
from visattn import nn as vnn

pytestmark = pytest.mark.gpu


def _leaf(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype).requires_grad_()


# name -> (function to compile, input maker, (op name, args) for which_backend, the backend auto must pick)
OPS = {
    "na1d-causal-rpb": (lambda q, r: visattn.na1d(q, q, q, 7, 1, 2, True, rpb=r),
                        lambda g: [_leaf(g, 2, 64, 2, 32), _leaf(g, 2, 13)],
                        lambda q, r: ("na1d", (q, q, q, 7, 1, 2, True)), "triton"),
    "na2d-stride-extra": (lambda q, e: visattn.na2d(q, q, q, 7, 2, additional_keys=e, additional_values=e),
                          lambda g: [_leaf(g, 2, 20, 24, 2, 32), _leaf(g, 2, 5, 2, 32)],
                          lambda q, e: ("na2d", (q, q, q, 7, 2, 1, False, None, e, e)), "triton"),
    "na3d": (lambda q: visattn.na3d(q, q, q, (3, 5, 5), 1, (1, 2, 1)), lambda g: [_leaf(g, 1, 6, 12, 10, 2, 32)],
             lambda q: ("na3d", (q, q, q, (3, 5, 5), 1, (1, 2, 1))), "triton"),
    "window-shifted-rpb": (lambda q, r: visattn.window_attention(q, q, q, 7, 3, rpb=r),
                           lambda g: [_leaf(g, 2, 14, 21, 2, 32), _leaf(g, 2, 13, 13)],
                           lambda q, r: ("window_attention", (q, q, q, 7, 3, r)), "triton"),
    "agent": (lambda q, a: visattn.agent_attention(q, q, q, a),
              lambda g: [_leaf(g, 2, 12, 12, 2, 32), _leaf(g, 2, 9, 2, 32)],
              lambda q, a: ("agent_attention", (q, q, q, a)), "triton"),
    "routing": (lambda q: visattn.bilevel_routing_attention(q, q, q, 4, 3), lambda g: [_leaf(g, 2, 16, 16, 2, 32)],
                lambda q: ("bilevel_routing_attention", (q, q, q, 4, 3)), "triton"),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_compiles_fullgraph_on_the_fused_path(name):
    fn, make, which, expected = OPS[name]
    op, args = which(*make(torch.Generator().manual_seed(0)))
    assert visattn.which_backend(op, *args) == expected
    check_fullgraph(fn, lambda seed: make(torch.Generator().manual_seed(seed)), backend="inductor", atol=2e-3,
                    rtol=2e-3)


class _Blocks(torch.nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.na = vnn.NeighborhoodAttention2D(dim, 2, 7, 1, 2, rel_pos_bias=True)
        self.window = vnn.WindowAttention(dim, 8, 2, shift_size=4)
        self.agent = vnn.AgentAttention(dim, 16, 2, agent_num=16)
        self.routing = vnn.BiLevelRoutingAttention(dim, 2, n_win=4, topk=3)

    def forward(self, x):
        return self.routing(self.agent(self.window(self.na(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nn_modules_compile_fullgraph_on_cuda(dtype):
    torch.manual_seed(0)
    blocks = _Blocks().to(device="cuda", dtype=dtype)

    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(2, 16, 16, 64, generator=gen).to(device="cuda", dtype=dtype).requires_grad_()]

    tol = 2e-3 if dtype == torch.float32 else 3e-2
    check_fullgraph(blocks, make, backend="inductor", params=list(blocks.parameters()), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_return_lse_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 20, 24, 2, 64, generator=gen).to(device="cuda", dtype=dtype) for _ in range(3))
    extra = torch.randn(2, 4, 2, 64, generator=gen).to(device="cuda", dtype=dtype)
    rpb = torch.randn(2, 13, 13, generator=gen).to(device="cuda", dtype=dtype)
    kw = dict(dilation=(1, 2), is_causal=(True, False), additional_keys=extra, additional_values=extra, rpb=rpb,
              return_lse=True)
    assert visattn.which_backend("na2d", q, k, v, 7, **kw) == "triton"
    out, lse = visattn.na2d(q, k, v, 7, **kw)
    ref_out, ref_lse = visattn.na2d(*(t.double() for t in (q, k, v)), 7, **{
        **kw, "additional_keys": extra.double(), "additional_values": extra.double(), "rpb": rpb.double(),
        "backend": "reference"})
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)


def test_return_lse_gradient_on_the_fused_kernel():
    """The fused backward propagates the LSE's gradient: auto stays on the kernel and out + lse gradients match
    the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 12, 12, 2, 32, device="cuda", generator=gen, requires_grad=True) for _ in range(3))
    assert visattn.which_backend("na2d", q, k, v, 5, return_lse=True) == "triton"
    out, lse = visattn.na2d(q, k, v, 5, return_lse=True)
    w = torch.randn(lse.shape, device="cuda", generator=gen)
    got = torch.autograd.grad(out.sum() + (lse * w).sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = visattn.na2d(*ref_in, 5, return_lse=True, backend="reference")
    want = torch.autograd.grad(ref_out.sum() + (ref_lse * w.double()).sum(), ref_in)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)