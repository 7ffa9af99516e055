"""window_attention vs timm's Swin block on the same weights, and 3-D (Video-Swin style) window attention vs the
oracle and vs an explicit roll + partition-label + roll-back formulation."""

import itertools

import pytest
import torch
from oracle import as_tuple, assert_fwd_bwd_match, dense_attention, window_oracle

import visattn

swin = pytest.importorskip("timm.models.swin_transformer")


def swin_table_to_visattn(table, window):
    """SEMANTICS.md: Swin's [(2w0-1)(2w1-1), heads] query-minus-key table -> visattn's key-minus-query rpb."""
    w0, w1 = window
    return table.view(2 * w0 - 1, 2 * w1 - 1, -1).permute(2, 0, 1).flip(1, 2)


def make_block(dim, resolution, heads, window, shift, seed):
    torch.manual_seed(seed)
    block = swin.SwinTransformerBlock(dim, input_resolution=resolution, num_heads=heads, window_size=window,
                                      shift_size=shift).double().eval()
    assert block.window_size == as_tuple(window, 2) and block.shift_size == as_tuple(shift, 2)
    with torch.no_grad():  # timm's init (std 0.02) would hide a wrong table conversion: use O(1) biases
        block.attn.relative_position_bias_table.normal_(0, 1.0)
    return block


def visattn_attn_branch(block, x):
    """The block's attention branch (what ``block._attn`` computes) through visattn.window_attention."""
    B, H, W, C = x.shape
    attn = block.attn
    heads = attn.num_heads
    qkv = attn.qkv(x).view(B, H, W, 3, heads, -1)
    q, k, v = qkv.unbind(-3)  # non-contiguous views, no copy
    rpb = swin_table_to_visattn(attn.relative_position_bias_table, block.window_size)
    out = visattn.window_attention(q, k, v, block.window_size, shift=block.shift_size, rpb=rpb, scale=attn.scale,
                                   backend="reference")
    return attn.proj(out.reshape(B, H, W, -1))


SWIN_CASES = [
    # dim, (H, W), heads, window, shift
    (16, (8, 8), 2, 4, 0),
    (16, (8, 8), 2, 4, 2),
    (24, (12, 12), 3, 4, 0),
    (24, (12, 12), 3, 4, 2),
    (16, (12, 12), 2, 6, 3),
    (16, (8, 12), 4, (4, 6), (2, 3)),
    (8, (12, 8), 1, (3, 4), (1, 2)),
]


@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("dim,res,heads,window,shift", SWIN_CASES)
def test_window_attention_matches_timm_swin(dim, res, heads, window, shift, fused_attn):
    block = make_block(dim, res, heads, window, shift, seed=dim + sum(res))
    block.attn.fused_attn = fused_attn  # both of timm's paths (manual softmax and SDPA)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *res, dim, generator=g, dtype=torch.float64)
    want = block._attn(x)
    got = visattn_attn_branch(block, x)
    # Swin masks with -100 instead of -inf: exp(-100) is far below float64 tolerance for O(1) logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)

    # gradients w.r.t. the input and every parameter of the attention (qkv, table, proj) agree too
    cot = torch.randn(want.shape, generator=g, dtype=torch.float64)
    params = [x.requires_grad_(True)] + list(block.attn.parameters())
    g_timm = torch.autograd.grad(block._attn(x), params, cot)
    g_ours = torch.autograd.grad(visattn_attn_branch(block, x), params, cot)
    for a, b in zip(g_ours, g_timm, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_whole_swin_block_forward_with_visattn_branch():
    """Swap the block's attention branch for visattn's and compare the whole block's output."""
    block = make_block(16, (8, 8), 2, 4, 2, seed=5)
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = block(x)
    block._attn = lambda t: visattn_attn_branch(block, t)  # instance attribute shadows the method
    torch.testing.assert_close(block(x), want, atol=1e-10, rtol=1e-8)


def test_visattn_nn_table_converter_if_present():
    nn = pytest.importorskip("visattn.nn")
    conv = getattr(nn, "swin_rpb_to_visattn", None)
    if conv is None:
        pytest.skip("visattn.nn.swin_rpb_to_visattn not present yet")
    table = torch.randn(7 * 5, 3, dtype=torch.float64)
    try:
        got = conv(table, (4, 3))
    except TypeError:
        got = conv(table, window_size=(4, 3))
    torch.testing.assert_close(got, swin_table_to_visattn(table, (4, 3)))


# ------------------------------------------------------------------------------------------------------------
# 3-D window attention
# ------------------------------------------------------------------------------------------------------------


def rolled_window_attention(q, k, v, window, shift, rpb=None, scale=None):
    """Video-Swin's recipe written out: roll by -shift, split each dimension into Swin's three shift regions
    ([0, L-w), [L-w, L-t), [L-t, L)), attend within (same window, same region label), roll back by +shift."""
    nd = q.dim() - 3
    shape = q.shape[1:1 + nd]
    window, shift = as_tuple(window, nd), as_tuple(shift, nd)
    dims = tuple(range(1, 1 + nd))
    rq, rk, rv = (torch.roll(t, shifts=tuple(-s for s in shift), dims=dims) for t in (q, k, v))

    def label(p, L, w, t):
        if t == 0:
            return p // w, 0
        region = 0 if p < L - w else (1 if p < L - t else 2)
        return p // w, region

    coords = list(itertools.product(*[range(n) for n in shape]))
    keys = [tuple(label(c[d], shape[d], window[d], shift[d]) for d in range(nd)) for c in coords]
    N = len(coords)
    mask = torch.tensor([[keys[a] == keys[b] for b in range(N)] for a in range(N)])
    bias = None
    if rpb is not None:  # offsets in rolled coordinates equal the original ones inside one region
        idx = [[tuple(coords[b][d] - coords[a][d] + window[d] - 1 for d in range(nd)) if mask[a, b] else None
                for b in range(N)] for a in range(N)]
        bias = torch.zeros(rpb.shape[0], N, N, dtype=torch.float64)
        for a in range(N):
            for b in range(N):
                if idx[a][b] is not None:
                    bias[:, a, b] = rpb[(slice(None),) + idx[a][b]]
    B = q.shape[0]
    out = dense_attention(rq.reshape(B, N, *q.shape[-2:]), rk.reshape(B, N, *k.shape[-2:]),
                          rv.reshape(B, N, *v.shape[-2:]), mask=mask, bias=bias, scale=scale)
    out = out.reshape(B, *shape, *out.shape[2:])
    return torch.roll(out, shifts=shift, dims=dims)


WINDOW_3D = [((4, 4, 4), (2, 2, 2), (1, 1, 1)), ((4, 6, 6), (2, 3, 3), (0, 1, 2)), ((6, 4, 4), (3, 4, 2), (2, 3, 1)),
             ((2, 6, 4), (2, 3, 4), (0, 0, 0)), ((6, 6, 6), (3, 3, 3), (1, 2, 0))]


@pytest.mark.parametrize("shape,window,shift", WINDOW_3D)
def test_window3d_reference_vs_oracle_and_rolled(shape, window, shift):
    g = torch.Generator().manual_seed(sum(shape) + sum(shift))
    heads, D = 2, 4
    qkv = torch.randn(1, *shape, 3, heads, D, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(-3)
    rpb = torch.randn(heads, *[2 * w - 1 for w in window], generator=g, dtype=torch.float64, requires_grad=True)
    # the oracle's floor((x - t) / w) rule equals the roll + region-label formulation
    torch.testing.assert_close(window_oracle(q, k, v, window, shift, rpb=rpb),
                               rolled_window_attention(q, k, v, window, shift, rpb=rpb), atol=1e-12, rtol=1e-10)
    assert_fwd_bwd_match(
        lambda: visattn.window_attention(q, k, v, window, shift=shift, rpb=rpb, backend="reference"),
        lambda: window_oracle(q, k, v, window, shift, rpb=rpb),
        [qkv, rpb], gen=g, what=f"window3d {shape} {window} {shift}",
    )
