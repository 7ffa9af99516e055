"""The dense-with-mask schedule (one SDPA call with an exact additive mask) against the float64 oracle of
tests/oracle.py: forward and every gradient, rpb included."""

from __future__ import annotations

import pytest
import torch
from oracle import na_oracle, window_oracle

from visattn import dense_schedule

CASES = [
    ((7, 7), (7, 7), (1, 1), (1, 1), (False, False), False, (0, 0), True),
    ((14, 14), (7, 7), (1, 1), (1, 1), (False, False), False, (0, 0), True),
    ((14, 12), (3, 5), (2, 2), (1, 1), (True, False), False, (0, 0), True),
    ((10, 9), (4, 3), (1, 1), (2, 3), (False, True), False, (0, 0), False),
    ((14, 14), (7, 7), (1, 1), (1, 1), (False, False), True, (3, 3), True),
    ((6, 8, 4), (3, 3, 2), (1, 1, 2), (1, 1, 1), (True, False, False), False, (0, 0, 0), True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-{'win' if c[5] else 'na'}")
def test_matches_float64_oracle(case):
    spatial, kernel, dilation, stride, causal, window, shift, use_rpb = case
    gen = torch.Generator().manual_seed(0)
    batch, heads, dim = 2, 3, 8
    q, k, v = (torch.randn(batch, *spatial, heads, dim, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    rpb = (torch.randn(heads, *(2 * s - 1 for s in kernel), generator=gen, dtype=torch.float64).requires_grad_()
           if use_rpb else None)
    out = dense_schedule.local_attention(q, k, v, kernel, dilation, stride, causal, rpb, 0.3, window=window,
                                         shift=shift)
    if window:
        ref = window_oracle(q, k, v, kernel, shift, rpb=rpb, scale=0.3)
    else:
        ref = na_oracle(q, k, v, kernel, stride, dilation, causal, scale=0.3, rpb=rpb)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (q, k, v, rpb) if t is not None]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_worth_it_rule():
    assert dense_schedule.worth_it((7, 7), (7, 7), (1, 1), extra=False)
    assert dense_schedule.worth_it((14, 14), (7, 7), (1, 1), extra=False)
    assert not dense_schedule.worth_it((56, 56), (7, 7), (1, 1), extra=False)
    assert not dense_schedule.worth_it((14, 14), (7, 7), (1, 1), extra=True)


@pytest.mark.parametrize("spatial,regions,topk", [((8, 8), (2, 2), 2), ((7, 5), (2, 2), 3), ((12, 12), (3, 3), 9),
                                                  ((9, 6), (3, 2), 1)])
def test_routed_gather_matches_float64_oracle(spatial, regions, topk, monkeypatch):
    """BiFormer's gather formulation (the CPU path of ``auto``), padded maps and region chunks included, against
    the gather-free float64 oracle: values and gradients; ``auto`` on the CPU takes it."""
    from oracle import bra_oracle

    import visattn
    from visattn import reference

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, *spatial, 2, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * topk * 4 * 2 * 8 * 2)  # force several region chunks
    out = dense_schedule.routed_gather_attention(q, k, v, regions, topk, 0.4)
    ref, _ = bra_oracle(q, k, v, regions, topk, scale=0.4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    calls = []
    monkeypatch.setattr(dense_schedule, "routed_gather_attention",
                        lambda *a: calls.append(1) or reference.bilevel_routing(*a))
    visattn.bilevel_routing_attention(q, k, v, regions, topk, scale=0.4)
    visattn.bilevel_routing_attention(q, k, v, regions, topk, scale=0.4, backend="reference")
    assert calls == [1]


def test_tables_cached_under_inference_mode_serve_a_later_backward():
    """The CPU fast paths cache their mask / pooling tables; a table first built inside torch.inference_mode (an
    inference benchmark) must still be usable when a later training call saves it for backward."""
    import visattn
    from visattn.nn import agent as agent_module

    dense_schedule._CACHE.clear()
    agent_module._POOL_CACHE.clear()
    q = torch.randn(1, 7, 7, 2, 8)
    with torch.inference_mode():
        visattn.na2d(q, q, q, 7)
        visattn.window_attention(q, q, q, 7, shift=3)
        agent_module.pool_agents(q, 3)
    leaf = q.clone().requires_grad_()
    loss = visattn.na2d(leaf, leaf, leaf, 7).sum() + visattn.window_attention(leaf, leaf, leaf, 7, shift=3).sum()
    loss = loss + agent_module.pool_agents(leaf, 3).sum()
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
