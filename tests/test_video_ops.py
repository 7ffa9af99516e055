"""Video sparse attentions (issue 23) on the CPU: sliding-tile attention against STA's own mask definition, Radial
Attention's block mask against a step-by-step transcription of the released builder, the op against float64 dense
masked attention (forward and gradients), argument errors and dispatch.

Oracles: ``visattn.bench.dense.sliding_tile_mask`` (FastVideo's flex-attention mask: the query tile's window centre
clamped to ``[k//2, tiles-1-k//2]``) and ``visattn.bench.dense.radial_release_mask`` (the released
``gen_log_mask_shrinked``: dense per-frame-pair masks, padded, shrunk, OR-ed); neither shares code with the ops.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import visattn
from visattn.bench import dense
from visattn.geometry import radial_block_mask

F64 = torch.float64


def _qkv(*shape, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*shape, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(*shape[:-1], dv or shape[-1], generator=gen, dtype=F64)
    return q, k, v


def _extra(batch, n, heads, d, dv, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, heads, d, generator=gen, dtype=F64), torch.randn(batch, n, heads, dv, generator=gen,
                                                                                 dtype=F64)


# ------------------------------------------------------------------------------------------------ sliding tile
STA_CASES = [
    # video, tile, window (tiles)
    ((4, 6, 8), (2, 2, 4), (1, 3, 1)),
    ((4, 6, 8), (2, 3, 2), (2, 2, 3)),  # even windows: one tile more (STA's |centre - u| <= k // 2)
    ((2, 4, 4), (1, 2, 2), (5, 9, 3)),  # windows wider than the video: all of it
    ((6, 4, 6), (2, 1, 2), (3, 3, 3)),  # windows clamped at every border
    ((4, 6, 8), (4, 6, 8), (1, 1, 1)),  # one tile: dense
]


@pytest.mark.parametrize(("video", "tile", "window"), STA_CASES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sliding_tile_matches_sta_mask(video, tile, window, backend):
    q, k, v = _qkv(2, *video, 2, 8, dv=6)
    out = visattn.sliding_tile_attention(q, k, v, tile, window, backend=backend)
    ref = dense.sliding_tile(q, k, v, tile, window)
    assert (out - ref).abs().max() < 1e-12


def test_sliding_tile_mask_is_not_trivial():
    mask = dense.sliding_tile_mask((6, 4, 6), (2, 1, 2), (3, 3, 3))
    assert 0.1 < mask.double().mean() < 0.8


def test_sliding_tile_text_tokens_lse_and_gradients():
    q, k, v = _qkv(1, 4, 4, 6, 2, 8, seed=3)
    ek, ev = _extra(1, 3, 2, 8, 8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ek, ev)]
    out, lse = visattn.sliding_tile_attention(*leaves[:3], (2, 2, 2), (1, 2, 3), additional_keys=leaves[3],
                                              additional_values=leaves[4], return_lse=True)
    l64 = [t.clone().requires_grad_() for t in (q, k, v, ek, ev)]
    ref = dense.sliding_tile(*l64[:3], (2, 2, 2), (1, 2, 3), None, *l64[3:])
    assert (out - ref).abs().max() < 1e-12
    # LSE from the mask directly
    mask = dense.sliding_tile_mask((4, 4, 6), (2, 2, 2), (1, 2, 3))
    flat = q.reshape(1, -1, 2, 8).transpose(1, 2)
    logits = (flat @ k.reshape(1, -1, 2, 8).transpose(1, 2).transpose(-1, -2) * 8**-0.5).masked_fill(~mask, -torch.inf)
    logits = torch.cat([logits, flat @ ek.transpose(1, 2).transpose(-1, -2) * 8**-0.5], dim=-1)
    assert (lse - torch.logsumexp(logits, -1).transpose(1, 2).reshape(1, 4, 4, 6, 2)).abs().max() < 1e-12
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, l64, grad), strict=True):
        assert (a - b).abs().max() < 1e-11


# ------------------------------------------------------------------------------------------------ radial mask
@pytest.mark.parametrize("attention_sink", [True, False])
def test_radial_mask_matches_release_transcription(attention_sink):
    checked = 0
    for frames, per, block, decay in itertools.product((1, 2, 3, 5, 9), (3, 7, 16, 33), (4, 8, 16), (1.0, 0.2, 1.7)):
        want = dense.radial_release_mask(frames, per, block, decay, attention_sink)
        assert torch.equal(radial_block_mask(frames, per, block, decay, attention_sink), want), (frames, per, block)
        checked += bool(want.any()) and not bool(want.all())
    assert checked > 20  # most grids give a mask that is neither empty nor dense


def test_radial_mask_release_block_size():
    """The release's own block (128) and split threshold (its hard-coded 128) on a 10-frame, 256-token grid."""
    for sink, decay in ((True, 0.2), (False, 0.95)):
        want = dense.radial_release_mask(10, 256, 128, decay, sink, threshold=128)
        got = visattn.radial_attention_mask(10, 256, 128, decay, sink)
        assert torch.equal(got, want)
        assert 0.3 < got.double().mean() < 0.9


def test_radial_mask_partial_block_is_dense():
    mask = visattn.radial_attention_mask(3, 15, 16)  # 45 tokens: blocks 0, 1 and the partial block 2
    assert mask.shape == (3, 3) and mask[2].all() and mask[:, 2].all()
    copy = visattn.radial_attention_mask(3, 15, 16)
    copy[0, 0] = not copy[0, 0]  # a fresh copy: the cached mask is untouched
    assert torch.equal(visattn.radial_attention_mask(3, 15, 16), mask)


# ------------------------------------------------------------------------------------------------ radial op
RADIAL_CASES = [
    # video, block, decay, sink, extra tokens
    ((6, 4, 4), 4, 0.5, True, 0),
    ((6, 4, 4), 4, 0.5, False, 3),
    ((3, 3, 5), 16, 1.0, False, 2),  # a partial last block
    ((9, 2, 8), 8, 0.2, True, 0),
]


@pytest.mark.parametrize(("video", "block", "decay", "sink", "n_extra"), RADIAL_CASES)
def test_radial_matches_dense_oracle(video, block, decay, sink, n_extra):
    q, k, v = _qkv(2, *video, 2, 8, dv=6, seed=block)
    extra = _extra(2, n_extra, 2, 8, 6) if n_extra else (None, None)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *extra) if t is not None]
    more = leaves[3:] or [None, None]
    out = visattn.radial_attention(*leaves[:3], block, decay, sink, additional_keys=more[0],
                                   additional_values=more[1])
    l64 = [t.clone().requires_grad_() for t in (q, k, v, *extra) if t is not None]
    ref = dense.radial(*l64[:3], block, decay, sink, None, *(l64[3:] or [None, None]))
    assert (out - ref).abs().max() < 1e-12
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, l64, grad), strict=True):
        assert (a - b).abs().max() < 1e-11


def test_radial_float32_and_strided_inputs():
    qkv = torch.randn(1, 6, 4, 4, 3, 2, 8)
    q, k, v = qkv.unbind(-3)
    out = visattn.radial_attention(q, k, v, 4, 0.5)
    ref = dense.radial(q.double(), k.double(), v.double(), 4, 0.5)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.double() - ref).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ vmoba
VMOBA_CASES = [
    # video, chunk, select_mode, topk, threshold, threshold_type
    ((4, 4, 6), 1, "threshold", 3, 0.25, "query_head"),  # 1-D: whole frames
    ((4, 4, 6), (2, 3), "threshold", 3, 0.6, "head_global"),  # 2-D: patches over all frames
    ((4, 4, 6), (2, 2, 3), "threshold", 3, 0.25, "overall"),  # 3-D cubes
    ((7, 2, 3), 2, "topk", 2, 0.25, "query_head"),  # 7 frames in chunks of 2: a shorter last chunk
]


@pytest.mark.parametrize(("video", "chunk", "mode", "topk", "threshold", "threshold_type"), VMOBA_CASES)
def test_vmoba_matches_release_selection_oracle(video, chunk, mode, topk, threshold, threshold_type):
    q, k, v = _qkv(2, *video, 2, 8, dv=6, seed=5)
    ek, ev = _extra(2, 3, 2, 8, 6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ek, ev)]
    out = visattn.vmoba_attention(*leaves[:3], chunk, mode, topk, threshold, threshold_type,
                                  additional_keys=leaves[3], additional_values=leaves[4])
    l64 = [t.clone().requires_grad_() for t in (q, k, v, ek, ev)]
    ref, picked = dense.vmoba(*l64[:3], chunk, mode, topk, threshold, threshold_type, None, *l64[3:],
                              return_selection=True)
    assert 0.1 < picked < 0.9  # a real choice: neither every chunk nor only the own one
    assert (out - ref).abs().max() < 1e-12
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, l64, grad), strict=True):
        assert (a - b).abs().max() < 1e-11


def test_vmoba_top1_attends_densely_as_the_release():
    q, k, v = _qkv(1, 4, 2, 2, 1, 8, seed=2)
    out = visattn.vmoba_attention(q, k, v, 1, "topk", topk=1)
    ref = dense.dense_attention(q, k, v, torch.ones(16, 16, dtype=torch.bool), None, 8**-0.5)
    assert (out - ref).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------------ checks, dispatch
Q3 = torch.randn(1, 4, 4, 8, 2, 8)
EK = torch.randn(1, 3, 2, 8)


@pytest.mark.parametrize(("call", "exc", "name"), [
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, (3, 2, 2)), ValueError, "tile_size"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, (2, 2, 2), 0), ValueError, "kernel_tiles"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, (2, 2), 1), ValueError, "tile_size"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, 2.0, 1), TypeError, "tile_size"),
    (lambda: visattn.sliding_tile_attention(Q3[0], Q3[0], Q3[0], 2, 1), ValueError, "query"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, 2, 1, additional_keys=EK), ValueError, "additional_values"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, 2, 1, scale=0.0), ValueError, "scale"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, 2, 1, return_lse=1), TypeError, "return_lse"),
    (lambda: visattn.sliding_tile_attention(Q3, Q3, Q3, 2, 1, backend="flex"), ValueError, "backend"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 0), ValueError, "block_size"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4.0), TypeError, "block_size"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4, decay_factor=0), ValueError, "decay_factor"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4, decay_factor=float("nan")), ValueError, "decay_factor"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4, decay_factor="1"), TypeError, "decay_factor"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4, attention_sink=1), TypeError, "attention_sink"),
    (lambda: visattn.radial_attention(Q3[..., 0, :], Q3[..., 0, :], Q3[..., 0, :]), ValueError, "query"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3.double()), ValueError, "value"),
    (lambda: visattn.radial_attention(Q3, Q3, Q3, 4, additional_keys=EK, additional_values=EK[:, :2]), ValueError,
     "additional_keys"),
    (lambda: visattn.radial_attention_mask(0, 4), ValueError, "frames"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 0), ValueError, "chunk_size"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 5), ValueError, "chunk_size"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, (3, 3)), ValueError, "chunk_size"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, (1, 2, 2, 2)), ValueError, "chunk_size"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 1.5), TypeError, "chunk_size"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 1, "top"), ValueError, "select_mode"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 1, topk=0), ValueError, "topk"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 1, threshold=1.5), ValueError, "threshold"),
    (lambda: visattn.vmoba_attention(Q3, Q3, Q3, 1, threshold_type="block"), ValueError, "threshold_type"),
    (lambda: visattn.radial_attention_mask(2, 4, 4, -1.0), ValueError, "decay_factor"),
])
def test_bad_arguments_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


def test_dispatch_and_forced_triton_on_cpu():
    assert visattn.which_backend("sliding_tile_attention", Q3, Q3, Q3, 2, 1) == "reference"
    assert visattn.which_backend("sta", Q3, Q3, Q3, 2, 1) == "reference"
    assert visattn.which_backend("radial_attention", Q3, Q3, Q3, 4) == "reference"
    assert visattn.which_backend("vmoba", Q3, Q3, Q3, 2) == "reference"
    with pytest.raises(ValueError, match="triton"):
        visattn.radial_attention(Q3, Q3, Q3, 4, backend="triton")
    with pytest.raises(ValueError, match="triton"):
        visattn.sliding_tile_attention(Q3, Q3, Q3, 2, 1, backend="triton")
