"""``visattn.halo_attention`` (HaloNet's blocked attention, timm's ``HaloAttn`` arithmetic) against a float64 brute
force written here from timm's facts: query ``(y, x)`` of block ``(y // qb0, x // qb1)`` attends every position of
the ``(b + 2h)`` window starting at ``block * b - h``, zero keys and values outside the map (in the softmax), logit
``scale * q . k + q . rel_h[j0 - i0 + win0 - 1] + q . rel_w[j1 - i1 + win1 - 1]``. That index rule is itself
checked against timm's ``PosEmbedRel`` (the relative-to-absolute pad-and-reshape trick) in float64."""

from __future__ import annotations

import pytest
import torch

import visattn
from visattn import functional

# (batch, key map, query map, heads, dim_qk, dim_v, block, halo)
CASES = [
    (2, (8, 8), (8, 8), 2, 8, 8, (4, 4), (1, 1)),  # stride 1
    (1, (8, 8), (4, 4), 2, 8, 4, (4, 4), (2, 2)),  # timm's strided queries: 2x2 queries per 4x4 key block
    (1, (6, 4), (6, 4), 1, 4, 6, (3, 2), (1, 0)),  # non-square blocks, no halo in one dimension
    (1, (4, 4), (4, 4), 1, 4, 4, (2, 2), (3, 3)),  # halo wider than a block: windows reach two blocks out
]


def oracle(q, k, v, block, halo, rel_h, rel_w, scale):
    """float64 brute force, one query at a time (heads-last tensors)."""
    batch, qh, qw, heads, _ = q.shape
    height, width = k.shape[1:3]
    (b0, b1), (h0, h1) = block, halo
    qb0, qb1 = qh // (height // b0), qw // (width // b1)
    win0, win1 = b0 + 2 * h0, b1 + 2 * h1
    kp = torch.zeros(batch, height + 2 * h0, width + 2 * h1, heads, k.shape[-1], dtype=k.dtype)
    vp = torch.zeros(batch, height + 2 * h0, width + 2 * h1, heads, v.shape[-1], dtype=v.dtype)
    kp[:, h0:h0 + height, h1:h1 + width] = k  # padded coordinates: window of block B starts at B * b
    vp[:, h0:h0 + height, h1:h1 + width] = v
    rows = []
    for y in range(qh):
        cols = []
        for x in range(qw):
            by, iy, bx, ix = y // qb0, y % qb0, x // qb1, x % qb1
            kw = kp[:, by * b0: by * b0 + win0, bx * b1: bx * b1 + win1]  # [B, win0, win1, heads, D]
            vw = vp[:, by * b0: by * b0 + win0, bx * b1: bx * b1 + win1]
            qv = q[:, y, x]  # [B, heads, D]
            logits = torch.einsum("bhd,buvhd->bhuv", qv, kw) * scale
            if rel_h is not None:
                th = rel_h[win0 - 1 - iy: 2 * win0 - 1 - iy]  # row j0 - iy + win0 - 1 for j0 = 0..win0-1
                tw = rel_w[win1 - 1 - ix: 2 * win1 - 1 - ix]
                logits = logits + torch.einsum("bhd,ud->bhu", qv, th)[..., :, None] \
                    + torch.einsum("bhd,vd->bhv", qv, tw)[..., None, :]
            attn = torch.softmax(logits.flatten(-2), -1).view_as(logits)
            cols.append(torch.einsum("bhuv,buvhd->bhd", attn, vw))
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows, 1)


def _inputs(case, dtype=torch.float64, rel=True, seed=0):
    batch, kmap, qmap, heads, dqk, dv, block, halo = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, *qmap, heads, dqk, generator=g, dtype=dtype)
    k = torch.randn(batch, *kmap, heads, dqk, generator=g, dtype=dtype)
    v = torch.randn(batch, *kmap, heads, dv, generator=g, dtype=dtype)
    tables = (None, None)
    if rel:
        tables = tuple(torch.randn(2 * (b + 2 * h) - 1, dqk, generator=g, dtype=dtype) * 0.5
                       for b, h in zip(block, halo, strict=True))
    return q, k, v, block, halo, *tables


def test_oracle_index_rule_is_timms_pos_embed_rel():
    """The oracle's ``j - i + win - 1`` rows reproduce timm's PosEmbedRel logits (float64, strided block too)."""
    pytest.importorskip("timm")
    from timm.layers.halo_attn import PosEmbedRel

    for query_block, win in ((4, 6), (2, 8), (8, 14)):
        torch.manual_seed(0)
        pe = PosEmbedRel(query_block, win, dim_head=4, scale=1.0).double()
        q = torch.randn(3, 2, query_block * query_block, 4, dtype=torch.float64)  # [B*heads, blocks, qb^2, D]
        want = pe(q).view(3, 2, query_block, query_block, win, win)
        i = torch.arange(query_block)
        j = torch.arange(win)
        idx = j[None, :] - i[:, None] + win - 1  # [qb, win]
        qs = q.view(3, 2, query_block, query_block, 4)
        lh = torch.einsum("nbijd,iud->nbiju", qs, pe.height_rel[idx])
        lw = torch.einsum("nbijd,jvd->nbijv", qs, pe.width_rel[idx])
        torch.testing.assert_close(lh[..., :, None] + lw[..., None, :], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rel", [True, False])
def test_reference_equals_oracle_forward_and_gradients(case, rel):
    args = _inputs(case, rel=rel)
    scale = 0.3
    tensors = [t for t in (args[0], args[1], args[2], args[5], args[6]) if t is not None]
    for t in tensors:
        t.requires_grad_(True)
    got = visattn.halo_attention(*args, scale=scale, backend="reference")
    want = oracle(*args, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(want)
    g_got = torch.autograd.grad((got * weight).sum(), tensors)
    g_want = torch.autograd.grad((want * weight).sum(), tensors)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_padded_keys_take_part_in_the_softmax():
    """A corner query of a map with a halo sees zero-padded keys: with q . k = 0 everywhere except nothing, the
    output is the mean over the whole window (padded values 0), not over the in-map keys only."""
    q = torch.zeros(1, 4, 4, 1, 2, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.ones(1, 4, 4, 1, 3, dtype=torch.float64)
    out = visattn.halo_attention(q, k, v, 2, 1, backend="reference")
    # query (0, 0): window rows/cols -1..2, in-map 3x3 of 16 slots
    torch.testing.assert_close(out[0, 0, 0, 0], torch.full((3,), 9 / 16, dtype=torch.float64))


def test_default_scale_and_float32():
    args = _inputs(CASES[0], dtype=torch.float32)
    got = visattn.halo_attention(*args)
    want = oracle(*(t.double() if isinstance(t, torch.Tensor) else t for t in args), 8 ** -0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_backend_choice_on_cpu():
    args = _inputs(CASES[0], dtype=torch.float32)
    assert functional.which_backend("halo_attention", *args) == "reference"
    assert functional.which_backend("halo", *args) == "reference"


@pytest.mark.parametrize("change, error, match", [
    (dict(query=torch.zeros(1, 8, 8, 2)), ValueError, "query must have 5 dims"),
    (dict(block_size=3), ValueError, "block_size must divide"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=2.0), TypeError, "block_size"),
    (dict(halo_size=-1), ValueError, "halo_size"),
    (dict(query=torch.zeros(1, 3, 8, 2, 8)), ValueError, "query must split"),
    (dict(query=torch.zeros(1, 16, 16, 2, 8)), ValueError, "query must split"),
    (dict(key=torch.zeros(1, 8, 8, 2, 4)), ValueError, "key must match query"),
    (dict(value=torch.zeros(1, 8, 4, 2, 8)), ValueError, "key and value must match"),
    (dict(rel_w=None), ValueError, "rel_h and rel_w must be given together"),
    (dict(rel_h=torch.zeros(12, 8)), ValueError, "rel_h must have shape"),
    (dict(rel_w=torch.zeros(11, 4)), ValueError, "rel_w must have shape"),
    (dict(rel_h=[0.0]), TypeError, "rel_h"),
    (dict(query=torch.zeros(1, 8, 8, 2, 8, dtype=torch.int64)), TypeError, "query"),
    (dict(value=torch.zeros(1, 8, 8, 2, 8, dtype=torch.float64)), ValueError, "value has dtype"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_argument_errors_name_the_argument(change, error, match):
    z = torch.zeros(1, 8, 8, 2, 8)
    kwargs = dict(query=z, key=z, value=z, block_size=4, halo_size=1, rel_h=torch.zeros(11, 8),
                  rel_w=torch.zeros(11, 8))
    kwargs.update(change)
    with pytest.raises(error, match=match):
        visattn.halo_attention(**kwargs)


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _inputs(CASES[0], dtype=torch.float32)
    with pytest.raises(ValueError):
        visattn.halo_attention(*args, backend="triton")


@pytest.mark.parametrize("case", CASES)
def test_dense_peer_equals_oracle(case):
    """``visattn.bench.dense.halo`` (the smoke test's peer) is a second float64 oracle: equal to the brute force."""
    from visattn.bench import dense

    q, k, v, block, halo, rel_h, rel_w = _inputs(case)
    torch.testing.assert_close(dense.halo(q, k, v, block, halo, rel_h, rel_w, 0.4),
                               oracle(q, k, v, block, halo, rel_h, rel_w, 0.4), rtol=1e-10, atol=1e-10)
