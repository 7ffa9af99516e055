"""``torch.compile(fullgraph=True)`` through the public API and the nn modules on the CPU (the reference path):
no graph break, no recompile on a second call with the same shapes, forward and gradients equal to eager; and a
strict ``torch.export`` of a small NAT-like module. The default run keeps two small compiles (``aot_eager``); the
broader set (every op and module on its own, inductor) is marked slow. The CUDA twin is
tests/test_functional_compile_gpu.py."""

import pytest
import torch
from compile_check import check_fullgraph

import visattn
from visattn import nn as vnn


def _leaf(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_()


def _every_op(q2, q1, q3, rpb, extra, agents):
    """Every public op once, the NATTEN positional order included; returns a tuple of outputs."""
    out2 = visattn.na2d(q2, q2 * 0.5, q2, 3, 1, 2, rpb=rpb, additional_keys=extra, additional_values=extra)
    out1, lse1 = visattn.na1d(q1, q1, q1 * 2, 3, 2, 1, True, return_lse=True)
    out3 = visattn.na3d(q3, q3, q3, (2, 3, 3), 1, (1, 1, 2))
    win = visattn.window_attention(q2, q2, q2, (3, 4), (1, 2))
    agent = visattn.agent_attention(q2, q2, q2, agents)
    routed = visattn.bilevel_routing_attention(q2, q2, q2, 2, 2)
    sta = visattn.sliding_tile_attention(q3, q3 * 0.5, q3, (1, 2, 3), (3, 1, 1), additional_keys=extra,
                                         additional_values=extra)
    radial = visattn.radial_attention(q3, q3, q3 * 0.5, 4, 0.5, additional_keys=extra, additional_values=extra)
    vmoba = visattn.vmoba_attention(q3, q3 * 0.5, q3, (2, 3), additional_keys=extra, additional_values=extra)
    return out2, out1, lse1, out3, win, agent, routed, sta, radial, vmoba


def _every_op_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    return [_leaf(gen, 1, 6, 8, 2, 8), _leaf(gen, 1, 9, 2, 8), _leaf(gen, 1, 3, 4, 6, 2, 8),
            _leaf(gen, 2, 5, 5), _leaf(gen, 1, 3, 2, 8), _leaf(gen, 1, 4, 2, 8)]


def test_every_public_op_compiles_fullgraph_once():
    check_fullgraph(_every_op, _every_op_inputs)


class _TinyBlocks(torch.nn.Module):
    """Attention modules in a row on a [B, H, W, C] map (all four with ``every_module``)."""

    def __init__(self, dim=16, every_module=False):
        super().__init__()
        self.na = vnn.NeighborhoodAttention2D(dim, 2, 3, 1, 2, rel_pos_bias=True)
        self.window = vnn.WindowAttention(dim, (4, 4), 2, shift_size=2)
        self.rest = torch.nn.Sequential(vnn.AgentAttention(dim, (8, 8), 2, agent_num=4),
                                        vnn.BiLevelRoutingAttention(dim, 2, n_win=2, topk=2)) if every_module else None

    def forward(self, x):
        x = self.window(self.na(x))
        return x if self.rest is None else self.rest(x)


@pytest.mark.parametrize("every_module", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_nn_modules_compile_fullgraph_once(every_module):
    torch.manual_seed(0)
    blocks = _TinyBlocks(every_module=every_module)

    def make(seed):
        return [torch.randn(2, 8, 8, 16, generator=torch.Generator().manual_seed(seed)).requires_grad_()]

    check_fullgraph(blocks, make, params=list(blocks.parameters()), atol=1e-4, rtol=1e-4)


class _NatLike(torch.nn.Module):
    """A NAT stage in miniature: LayerNorm -> NeighborhoodAttention2D (+rpb) -> residual -> MLP."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = vnn.NeighborhoodAttention2D(dim, 2, 3, dilation=2, rel_pos_bias=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def test_torch_export_strict_nat_like_module():
    torch.manual_seed(0)
    module = _NatLike().eval()
    x = torch.randn(2, 8, 9, 16)
    exported = torch.export.export(module, (x,), strict=True)
    other = torch.randn(2, 8, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), module(other), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ slow: broader
OPS = {
    "na1d": (lambda q, r1: visattn.na1d(q, q, q, 5, 1, 2, rpb=r1), lambda g: [_leaf(g, 2, 20, 2, 8),
                                                                             _leaf(g, 2, 9)]),
    "na2d-lse": (lambda q: visattn.na2d(q, q, q, 3, 2, return_lse=True), lambda g: [_leaf(g, 1, 7, 9, 2, 8)]),
    "na3d-causal": (lambda q: visattn.na3d(q, q, q, 2, is_causal=(True, False, False)),
                    lambda g: [_leaf(g, 1, 3, 4, 5, 2, 8)]),
    "window-3d": (lambda q, r: visattn.window_attention(q, q, q, (2, 2, 3), (1, 0, 1), rpb=r),
                  lambda g: [_leaf(g, 1, 4, 4, 6, 2, 8), _leaf(g, 2, 3, 3, 5)]),
    "agent-bias": (lambda q, a, b: visattn.agent_attention(q, q, q, a, agent_bias=b),
                   lambda g: [_leaf(g, 1, 5, 5, 2, 8), _leaf(g, 1, 4, 2, 8), _leaf(g, 1, 2, 4, 25)]),
    "routing-padded": (lambda q: visattn.bilevel_routing_attention(q, q, q, 3, 2),
                       lambda g: [_leaf(g, 1, 7, 8, 2, 8)]),
    "halo-rel": (lambda q, rh, rw: visattn.halo_attention(q, q, q, (2, 4), (1, 1), rh, rw),
                 lambda g: [_leaf(g, 1, 4, 8, 2, 8), _leaf(g, 7, 8), _leaf(g, 11, 8)]),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_compiles_fullgraph(name, backend):
    fn, make = OPS[name]
    check_fullgraph(fn, lambda seed: make(torch.Generator().manual_seed(seed)), backend=backend, atol=1e-4,
                    rtol=1e-4)


MODULES = {
    "na1d-causal": (lambda: vnn.NeighborhoodAttention1D(16, 2, 4, 2, 1, True), (2, 12, 16)),
    "na3d-rpb": (lambda: vnn.NeighborhoodAttention3D(16, 2, 3, rel_pos_bias=True), (1, 3, 4, 5, 16)),
    "window-padded": (lambda: vnn.WindowAttention(16, 4, 2, shift_size=1), (1, 7, 9, 16)),
    "agent-tokens": (lambda: vnn.AgentAttention(16, 6, 2, agent_num=9), (2, 36, 16)),
    "routing-autopad": (lambda: vnn.BiLevelRoutingAttention(16, 2, 3, topk=3, auto_pad=True), (1, 7, 8, 16)),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_compiles_fullgraph(name, backend):
    build, shape = MODULES[name]
    torch.manual_seed(0)
    module = build()

    def make(seed):
        return [torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()]

    check_fullgraph(module, make, backend=backend, params=list(module.parameters()), atol=1e-4, rtol=1e-4)
