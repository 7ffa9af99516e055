"""The tests' brute-force oracle: visattn.bench.dense (the one dense float64 formulation of every op, written from
docs/SEMANTICS.md, which imports torch only and so can judge any backend) under the names the tests use, plus the
test-only helpers (input makers, the forward + gradient comparison).

All tensors are heads-last, ``[B, *spatial, heads, head_dim]``, as in the public API.
"""

from __future__ import annotations

import functools

import torch

from visattn.bench.dense import agent as agent_oracle
from visattn.bench.dense import as_tuple, bilevel_routing, dense_attention, na_mask, na_mask_1d, window_mask
from visattn.bench.dense import na as na_oracle
from visattn.bench.dense import window as window_oracle

# ``bra_oracle(q, k, v, regions, topk, scale=None, routing=None) -> (out, routing_index [B, R, topk])``; ``routing``
# forces the routed regions (for a low-precision run that breaks a near-tie differently).
bra_oracle = functools.partial(bilevel_routing, return_routing=True)

__all__ = ["agent_oracle", "as_tuple", "assert_fwd_bwd_match", "bra_oracle", "dense_attention", "make_qkv",
           "na_mask", "na_mask_1d", "na_oracle", "window_mask", "window_oracle"]


# --------------------------------------------------------------------------------------------------------------
# Test helpers (input makers and the forward + gradient comparison)
# --------------------------------------------------------------------------------------------------------------


def make_qkv(batch, spatial, heads, head_dim, *, gen, dtype=torch.float64, fused=False, head_dim_v=None):
    """Random q, k, v leaves (requires_grad). ``fused=True`` gives non-contiguous views of one fused qkv tensor,
    the way a QKV Linear output is split: ``qkv.view(B, *sp, 3, heads, D).unbind(-3)``."""
    spatial = tuple(spatial)
    if fused:
        assert head_dim_v is None or head_dim_v == head_dim
        channels = 2 * heads * head_dim
        x = torch.randn(batch, *spatial, channels, generator=gen, dtype=dtype)
        lin = torch.nn.Linear(channels, 3 * heads * head_dim, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=dtype) / channels ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen, dtype=dtype) * 0.1)
        qkv = lin(x).detach().requires_grad_(True)  # the leaf whose views we pass
        q, k, v = qkv.view(batch, *spatial, 3, heads, head_dim).unbind(-3)
        assert not q.is_contiguous()
        return (q, k, v), qkv
    q = torch.randn(batch, *spatial, heads, head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    k = torch.randn(batch, *spatial, heads, head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    v = torch.randn(batch, *spatial, heads, head_dim_v or head_dim, generator=gen, dtype=dtype).requires_grad_(True)
    return (q, k, v), None


def assert_fwd_bwd_match(run_impl, run_oracle, leaves, *, gen, atol=1e-10, rtol=1e-8, what=""):
    """Run both callables (no arguments; they close over ``leaves``), compare outputs, then compare the gradients
    of every leaf under one random cotangent."""
    out = run_impl()
    expected = run_oracle()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} vs oracle {tuple(expected.shape)}"
    torch.testing.assert_close(out.to(torch.float64), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what} fwd: {m}")
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, cot.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(expected, leaves, cot, allow_unused=True)
    for idx, (g, w) in enumerate(zip(got, want, strict=False)):
        assert w is not None, f"{what}: oracle gives no gradient for leaf {idx}"
        assert g is not None, f"{what}: implementation gives no gradient for leaf {idx}"
        torch.testing.assert_close(g.to(torch.float64), w, atol=atol, rtol=rtol,
                                   msg=lambda m, idx=idx: f"{what} grad of leaf {idx}: {m}")
    return out
