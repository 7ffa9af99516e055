"""The fused Triton HaloNet kernels (visattn/kernels/halo.py, forward and backward) under TRITON_INTERPRET=1,
against the float64 brute force of tests/test_functional_halo.py (timm's arithmetic): output and the gradients of
q, k, v and both relative tables. Cases: stride 1, strided query blocks, non-square blocks with no halo in one
dimension, a halo wider than a block, halonet's block 8 / halo 3 (a 14-wide window walked in two chunks of rows),
strided (non-contiguous) q/k/v views of one fused projection, float16.

Triton picks interpreter or compiler when a kernel module is imported, so the cases run in a child process
(tests/interpreted.py)."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted

# (batch, key map, query map, heads, dim_qk, dim_v, block, halo, dtype, fused views)
CASES = [
    (2, (8, 8), (8, 8), 2, 8, 8, (4, 4), (1, 1), "float32", False),
    (1, (8, 8), (4, 4), 2, 8, 4, (4, 4), (2, 2), "float32", True),
    (1, (6, 4), (6, 4), 1, 4, 6, (3, 2), (1, 0), "float32", False),
    (1, (4, 4), (4, 4), 1, 4, 4, (2, 2), (3, 3), "float32", False),
    (1, (16, 8), (16, 8), 1, 16, 16, (8, 8), (3, 3), "float32", True),
    (1, (8, 8), (8, 8), 2, 16, 16, (4, 4), (2, 2), "float16", False),
]
TOL = {"float32": 2e-5, "float16": 5e-3}


def run_case() -> list[dict]:
    import torch
    from test_functional_halo import oracle

    import visattn

    results = []
    for batch, kmap, qmap, heads, dqk, dv, block, halo, dtype, fused in CASES:
        for rel in (True, False):
            g = torch.Generator().manual_seed(0)
            dt = getattr(torch, dtype)
            if fused:  # q, k, v as channel slices of one projection: strided, not contiguous
                qkv = torch.randn(batch, *kmap, heads, 2 * dqk + dv, generator=g)
                q = qkv[:, ::kmap[0] // qmap[0], ::kmap[1] // qmap[1], :, :dqk]
                k, v = qkv[..., dqk:2 * dqk], qkv[..., 2 * dqk:]
            else:
                q = torch.randn(batch, *qmap, heads, dqk, generator=g)
                k = torch.randn(batch, *kmap, heads, dqk, generator=g)
                v = torch.randn(batch, *kmap, heads, dv, generator=g)
            tables = [torch.randn(2 * (b + 2 * h) - 1, dqk, generator=g) * 0.5
                      for b, h in zip(block, halo, strict=True)]
            tensors = [q, k, v, *tables] if rel else [q, k, v]
            low = [t.to(dt).detach().requires_grad_(True) for t in tensors]
            high = [t.double().detach().requires_grad_(True) for t in tensors]
            tab_low = low[3:] if rel else [None, None]
            tab_high = high[3:] if rel else [None, None]
            got = visattn.halo_attention(*low[:3], block, halo, *tab_low, scale=0.3, backend="triton")
            want = oracle(*high[:3], block, halo, *tab_high, 0.3)
            weight = torch.randn(want.shape, generator=g, dtype=torch.float64)
            g_got = torch.autograd.grad((got.double() * weight).sum(), low)
            g_want = torch.autograd.grad((want * weight).sum(), high)
            errs = {"out": ((got.double() - want).abs().max() / want.abs().max().clamp(min=1)).item()}
            for name, a, b in zip(("q", "k", "v", "rel_h", "rel_w"), g_got, g_want, strict=False):
                errs[name] = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1)).item()
            results.append({"case": f"{kmap}->{qmap} b{block} h{halo} {dtype} rel={rel} fused={fused}",
                            "dtype": dtype, "errs": errs, "grads": len(g_got)})
    return results


@pytest.mark.slow
def test_halo_kernels_match_float64_oracle_under_interpreter():
    results = run_case_interpreted(__file__)
    assert len(results) == 2 * len(CASES)
    for r in results:
        assert r["grads"] == (5 if "rel=True" in r["case"] else 3)
        bad = {k: e for k, e in r["errs"].items() if not e <= TOL[r["dtype"]]}
        assert not bad, f"{r['case']}: {bad}"
