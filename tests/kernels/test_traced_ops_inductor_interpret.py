"""The engine's traced ops compiled by Inductor itself (not ``aot_eager``), under TRITON_INTERPRET=1 on the CPU:
Inductor's C++ code calls the opaque ops ``visattn::local_attention_fwd/bwd`` and the packed pair as fallback
kernels, and their autograd is the ``autograd.Function`` dynamo traces. A NeighborhoodAttention2D block with a
trained bias (on the small-map path and, small maps switched off, on the tiled one with its expanded bias), one
without, a shifted WindowAttention (the packed ops) and ``na2d`` with ``return_lse`` (the views' ops, the LSE
differentiated) must give the eager results, outputs and every gradient. Needs a C++ compiler (Inductor's CPU
backend). Runs in a child process (tests/interpreted.py)."""

from __future__ import annotations

import shutil

import pytest
from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: per case the largest difference between the Inductor-compiled and the eager call."""
    import copy

    import torch

    import visattn
    from visattn.kernels import ops

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    result: dict = {}
    modules = {
        "na_bias": visattn.nn.NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True, backend="triton"),
        "na": visattn.nn.NeighborhoodAttention2D(32, 2, 3, dilation=2, rel_pos_bias=False, backend="triton"),
        "window_shifted": visattn.nn.WindowAttention(32, 4, 2, shift_size=2, backend="triton"),
    }
    modules["na_bias_tiled"] = modules["na_bias"]  # again with small maps off: the tiled path, bias tiles
    for name, module in modules.items():
        ops.SMALL_MAP = name != "na_bias_tiled"
        twin = copy.deepcopy(module)
        compiled = torch.compile(twin, fullgraph=True)
        x = torch.randn(2, 8, 8, 32, generator=gen)
        g = torch.randn(2, 8, 8, 32, generator=gen)
        y_e = module(x)
        g_e = torch.autograd.grad(y_e, list(module.parameters()), g)
        y_c = compiled(x)
        g_c = torch.autograd.grad(y_c, list(twin.parameters()), g)
        result[name] = max([float((y_c - y_e).abs().max())]
                           + [float((a - b).abs().max()) for a, b in zip(g_c, g_e, strict=True)])
    ops.SMALL_MAP = True

    def lse_call(q, k, v):
        return visattn.na2d(q, k, v, 3, backend="triton", return_lse=True)

    base = [torch.randn(1, 6, 7, 2, 16, generator=gen) for _ in range(3)]
    weights = (torch.randn(1, 6, 7, 2, 16, generator=gen), torch.randn(1, 6, 7, 2, generator=gen))
    grads = []
    for fn in (torch.compile(lse_call, fullgraph=True), lse_call):
        leaves = [t.clone().requires_grad_(True) for t in base]
        out, lse = fn(*leaves)
        grads.append([out.detach(), lse.detach(), *torch.autograd.grad(
            (out * weights[0]).sum() + (lse * weights[1]).sum(), leaves)])
    result["na2d_lse"] = max(float((a - b).abs().max()) for a, b in zip(*grads, strict=True))
    return result


@pytest.mark.interpret
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor's CPU backend needs a C++ compiler")
def test_inductor_compiled_traced_ops_match_eager():
    res = run_case_interpreted(__file__)
    assert set(res) == {"na_bias", "na_bias_tiled", "na", "window_shifted", "na2d_lse"}
    for name, err in res.items():
        assert err < 1e-4, (name, err)
