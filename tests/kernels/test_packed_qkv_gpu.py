"""The packed-qkv path (``functional._na_packed``: one autograd node on a fused projection's ``qkv``, gradient
written packed by the backward kernels) on a CUDA GPU: output and packed gradient against the float64 oracle, and
bitwise equal to the same kernels on the three unbound views (contiguous dq, dk, dv, stacked by autograd), for
random 1-D/2-D/3-D problems with and without a trained bias, and shifted windows; a compiled module takes the packed
custom ops. Skipped without CUDA."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _problem(rng: random.Random):
    rank = rng.choice([1, 2, 3])
    kernel = tuple(rng.choice([3, 5, 7]) if rank < 3 else rng.choice([3, 5]) for _ in range(rank))
    dil = tuple(rng.choice([1, 1, 2]) for _ in range(rank))
    spatial = tuple(k * d + rng.randrange(0, 12 if rank < 3 else 4) for k, d in zip(kernel, dil, strict=True))
    return rank, spatial, rng.choice([1, 2, 4]), rng.choice([16, 32, 64]), kernel, dil, \
        rng.choice([torch.float16, torch.bfloat16]), rank < 3 and rng.random() < 0.6


@pytest.mark.parametrize("seed", range(12))
def test_packed_qkv_matches_oracle_and_the_unpacked_kernels(seed):
    import oracle

    from visattn import functional

    rng = random.Random(seed)
    rank, spatial, heads, d, kernel, dil, dtype, bias = _problem(rng)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(2, *spatial, 3, heads, d, device="cuda", generator=gen).to(dtype)
    rpb = None
    if bias:
        rpb = torch.randn(heads, *(2 * k - 1 for k in kernel), device="cuda", generator=gen) * 0.3
    g = torch.randn(2, *spatial, heads, d, device="cuda", generator=gen).to(dtype)

    leaf = qkv.clone().requires_grad_(True)
    table = None if rpb is None else rpb.clone().requires_grad_(True)
    out = functional._na_packed(rank, leaf, kernel, 1, dil, False, None, table, "triton")
    assert type(out.grad_fn).__name__ == "_PackedLocalAttentionBackward"
    got = torch.autograd.grad(out, [leaf] + ([table] if bias else []), g)

    views_leaf = qkv.clone().requires_grad_(True)
    views_table = None if rpb is None else rpb.clone().requires_grad_(True)
    na = (functional.na1d, functional.na2d, functional.na3d)[rank - 1]
    out_views = na(*views_leaf.unbind(-3), kernel, dilation=dil, rpb=views_table, backend="triton")
    want_views = torch.autograd.grad(out_views, [views_leaf] + ([views_table] if bias else []), g)
    assert torch.equal(out, out_views)
    for a, b in zip(got, want_views, strict=True):
        assert torch.equal(a, b)

    ref_leaf = qkv.double().requires_grad_(True)
    ref_table = None if rpb is None else rpb.double().requires_grad_(True)
    ref = oracle.na_oracle(*ref_leaf.unbind(-3), kernel, 1, dil, False, scale=d**-0.5, rpb=ref_table)
    want = torch.autograd.grad(ref, [ref_leaf] + ([ref_table] if bias else []), g.double())
    for name, a, b in zip(("out", "dqkv", "drpb"), (out, *got), (ref, *want), strict=False):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-2, (name, err, rank, spatial, heads, d, kernel, dil, dtype, bias)


@pytest.mark.parametrize("seed", range(6))
def test_packed_windows_match_oracle_and_the_unpacked_kernels(seed):
    """Shifted Swin / Video-Swin windows on the packed path: bitwise the views' kernels, and the float64 oracle."""
    import oracle

    from visattn import functional

    rng = random.Random(100 + seed)
    rank = rng.choice([2, 3])
    window = tuple(rng.choice([2, 4, 7]) if rank == 2 else rng.choice([2, 4]) for _ in range(rank))
    shift = tuple(rng.randrange(w) for w in window)
    spatial = tuple(w * rng.choice([1, 2, 3]) for w in window)
    heads, d, dtype, bias = rng.choice([1, 3]), rng.choice([16, 32, 64]), rng.choice([torch.float16,
                                                                                      torch.bfloat16]), seed % 2 == 0
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(2, *spatial, 3, heads, d, device="cuda", generator=gen).to(dtype)
    rpb = torch.randn(heads, *(2 * w - 1 for w in window), device="cuda", generator=gen) * 0.3 if bias else None
    g = torch.randn(2, *spatial, heads, d, device="cuda", generator=gen).to(dtype)
    runs = []
    for packed in (True, False):
        leaf = qkv.clone().requires_grad_(True)
        table = None if rpb is None else rpb.clone().requires_grad_(True)
        if packed:
            out = functional._window_packed(leaf, window, shift, table, None, "triton")
            assert type(out.grad_fn).__name__ == "_PackedLocalAttentionBackward"
        else:
            out = functional.window_attention(*leaf.unbind(-3), window, shift, rpb=table, backend="triton")
        runs.append((out, torch.autograd.grad(out, [leaf] + ([table] if bias else []), g)))
    (out, got), (out_views, want_views) = runs
    assert torch.equal(out, out_views)
    for a, b in zip(got, want_views, strict=True):
        assert torch.equal(a, b)
    ref_leaf = qkv.double().requires_grad_(True)
    ref_table = None if rpb is None else rpb.double().requires_grad_(True)
    ref = oracle.window_oracle(*ref_leaf.unbind(-3), window, shift, rpb=ref_table)
    want = torch.autograd.grad(ref, [ref_leaf] + ([ref_table] if bias else []), g.double())
    for name, a, b in zip(("out", "dqkv", "drpb"), (out, *got), (ref, *want), strict=False):
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 2e-2, (name, err, spatial, window, shift, heads, d, dtype, bias)


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_module_takes_the_packed_ops_and_matches_eager(bias, monkeypatch):
    """A NeighborhoodAttention2D block compiled with Inductor (fullgraph) runs the packed custom ops (its backward
    writes one packed gradient: ``ops.backward`` gets ``grads``) and gives the eager packed call's output and
    parameter gradients (tolerance of one bf16 rounding)."""
    import copy

    import visattn
    from visattn.kernels import ops

    packed_backwards = []
    plain_backward = ops.backward

    def spy(*args, **kwargs):  # grads: keyword or the 15th positional argument
        packed_backwards.append(kwargs.get("grads", args[14] if len(args) > 14 else None) is not None)
        return plain_backward(*args, **kwargs)

    monkeypatch.setattr(ops, "backward", spy)
    torch.manual_seed(0)
    module = visattn.nn.NeighborhoodAttention2D(64, 2, 7, rel_pos_bias=bias).cuda()
    twin = copy.deepcopy(module)
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(4, 14, 14, 64, device="cuda")
    g = torch.randn(4, 14, 14, 64, device="cuda")
    results = []
    for mod in (module, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mod(x)
        results.append((y.float(), torch.autograd.grad(y, list(mod.parameters()), g.to(y.dtype))))
    assert packed_backwards == [True, True]  # eager, then compiled: both packed
    (y_e, g_e), (y_c, g_c) = results
    assert torch.allclose(y_c, y_e, atol=2e-2, rtol=2e-2)
    for a, b in zip(g_c, g_e, strict=True):
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < 2e-2
