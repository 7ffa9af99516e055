"""The reference stays exact when it chunks queries (memory bound) and when autograd checkpoints chunks."""

import torch

import visattn
from visattn import reference


def _problem(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, 9, 11, 3, 2, 5, generator=gen, dtype=dtype)
    rpb = torch.randn(2, 7, 9, generator=gen, dtype=dtype)
    return [t.clone().requires_grad_() for t in (*qkv.unbind(3), rpb)]


def _run(q, k, v, rpb):
    return visattn.na2d(q, k, v, (4, 5), dilation=(2, 1), is_causal=(False, True), rpb=rpb, backend="reference")


def test_chunked_equals_unchunked_forward_and_grads(monkeypatch):
    inputs = _problem()
    whole = _run(*inputs)
    grads_whole = torch.autograd.grad(whole.square().sum(), inputs)

    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 20 * 2 * 5 * 7)  # ~7 queries per chunk: many chunks
    inputs2 = _problem()
    chunked = _run(*inputs2)
    grads_chunked = torch.autograd.grad(chunked.square().sum(), inputs2)

    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    for a, b in zip(grads_chunked, grads_whole, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_chunk_budget_bounds_gathered_keys(monkeypatch):
    """With a tiny budget the gathered key tensor per chunk never exceeds it (no N×N, no full gather)."""
    seen = []
    original = reference._attend_chunk

    def spy(q, k, v, index, *rest):
        seen.append(q.shape[0] * index.numel() * q.shape[2] * q.shape[3])
        return original(q, k, v, index, *rest)

    monkeypatch.setattr(reference, "_attend_chunk", spy)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4000)
    q, k, v, _ = _problem()
    with torch.no_grad():
        _run(q, k, v, None)
    assert len(seen) > 1 and max(seen) <= 4000
