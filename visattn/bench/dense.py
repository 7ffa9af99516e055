"""Brute-force dense attention with explicit boolean masks, written straight from docs/SEMANTICS.md.

A second, independent formulation of every op (pairwise conditions over all (query, key) pairs instead of the
reference's neighbor tables), used by ``visattn smoke`` as its oracle. Float64, O(N²): small inputs only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def na_mask_1d(length: int, kernel: int, dilation: int, stride: int, causal: bool) -> Tensor:
    """[L, L] bool: may query i attend key j in one dimension."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    same_group = (i % dilation) == (j % dilation)
    qi, kj = i // dilation, j // dilation
    group_len = -(-(length - i % dilation) // dilation)
    if causal:
        lead = torch.minimum(qi // stride * stride + stride - 1, group_len - 1)
        inside = (kj <= qi) & (lead - kj < kernel)
    else:
        left, right = kernel // 2, kernel // 2 - (kernel % 2 == 0)
        lead = torch.minimum(qi // stride * stride + stride // 2, group_len - 1)
        centre = lead.clamp(min=left).minimum(group_len - 1 - right)
        inside = (kj >= centre - left) & (kj <= centre + right)
    return same_group & inside


def window_mask_1d(length: int, window: int, shift: int) -> Tensor:
    win = torch.div(torch.arange(length) - shift, window, rounding_mode="floor")
    return win[:, None] == win[None, :]


def _outer_and(masks: Sequence[Tensor]) -> Tensor:
    """Combine per-dimension [L_d, L_d] masks into the [N, N] mask of the row-major flattened grid."""
    full = masks[0]
    for m in masks[1:]:
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(full.shape[0] * m.shape[0], -1)
    return full


def _rel_bias(rpb: Tensor, spatial: Sequence[int], divisors: Sequence[int], sizes: Sequence[int]) -> Tensor:
    """[heads, N, N] bias ``rpb[h, (kj - qi) + s - 1, ...]`` with coordinates divided by ``divisors``."""
    grids = torch.meshgrid(*[torch.arange(n) for n in spatial], indexing="ij")
    coords = [g.reshape(-1) // d for g, d in zip(grids, divisors, strict=False)]
    offs = [(c[None, :] - c[:, None] + s - 1).clamp(0, 2 * s - 2) for c, s in zip(coords, sizes, strict=False)]
    return rpb[(slice(None), *offs)]


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None, scale: float,
                    extra_k: Tensor | None = None, extra_v: Tensor | None = None) -> Tensor:
    """Float64 masked softmax attention over flattened tokens; q,k,v [B, *sp, H, D], mask [N, N]."""
    batch, heads = q.shape[0], q.shape[-2]
    def flat(t):
        return t.double().reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)
    logits = flat(q) @ flat(k).transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.double()
    logits = logits.masked_fill(~mask, float("-inf"))
    values = flat(v)
    if extra_k is not None:
        logits = torch.cat([logits, flat(q) @ flat(extra_k).transpose(-1, -2) * scale], dim=-1)
        values = torch.cat([values, flat(extra_v)], dim=-2)
    out = torch.softmax(logits, dim=-1) @ values
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


def na(q, k, v, kernel_size, dilation, stride, is_causal, rpb=None, scale=None, extra_k=None, extra_v=None):
    spatial = q.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _outer_and([na_mask_1d(*a) for a in zip(spatial, kernel_size, dilation, stride, is_causal, strict=False)])
    bias = None if rpb is None else _rel_bias(rpb, spatial, dilation, kernel_size)
    return dense_attention(q, k, v, mask, bias, scale, extra_k, extra_v)


def window(q, k, v, window_size, shift, rpb=None, scale=None):
    spatial = q.shape[1:-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = _outer_and([window_mask_1d(*a) for a in zip(spatial, window_size, shift, strict=False)])
    bias = None if rpb is None else _rel_bias(rpb, spatial, [1] * len(spatial), window_size)
    return dense_attention(q, k, v, mask, bias, scale)


def agent(q, k, v, agents, agent_bias=None, query_bias=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads = q.shape[0], q.shape[-2]
    def flat(t):
        return t.double().reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)
    a_logits = flat(agents) @ flat(k).transpose(-1, -2) * scale + (0 if agent_bias is None else agent_bias.double())
    summary = torch.softmax(a_logits, -1) @ flat(v)
    q_logits = flat(q) @ flat(agents).transpose(-1, -2) * scale + (0 if query_bias is None else query_bias.double())
    out = torch.softmax(q_logits, -1) @ summary
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


def bilevel_routing(q, k, v, regions, topk, scale=None):
    """Dense-mask BRA: key j is visible to query i iff j's region is among the top-k routed of i's region."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, height, width = q.shape[:3]
    sh, sw = regions
    ph, pw = -(-height // sh) * sh, -(-width // sw) * sw
    def pad(t):
        return torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, pw - width, 0, ph - height))
    qp, kp, vp = pad(q), pad(k), pad(v)
    rh, rw = ph // sh, pw // sw
    rows, cols = torch.meshgrid(torch.arange(ph), torch.arange(pw), indexing="ij")
    region_of = ((rows // rh) * sw + cols // rw).reshape(-1)  # [N]
    n_regions = sh * sw
    onehot = torch.nn.functional.one_hot(region_of, n_regions).double()  # [N, R]
    def means(t):
        return (onehot.T @ t.reshape(batch, ph * pw, -1)) / onehot.sum(0)[:, None]
    affinity = means(qp) @ means(kp).transpose(-1, -2)  # [B, R, R]
    routed = torch.zeros(batch, n_regions, n_regions, dtype=torch.bool)
    routed.scatter_(2, affinity.topk(topk, dim=-1).indices, True)
    outs = []
    for b in range(batch):
        mask = routed[b][region_of][:, region_of]  # [N, N]
        outs.append(dense_attention(qp[b : b + 1], kp[b : b + 1], vp[b : b + 1], mask, None, scale))
    return torch.cat(outs)[:, :height, :width]


def halo(q, k, v, block_size, halo_size, rel_h=None, rel_w=None, scale=None):
    """Dense HaloNet attention over the zero-padded key map: key j (padded coordinates) is visible to query i iff
    it lies in the ``b + 2h`` window of i's block; the relative logits ``q_i . (rel_h[.] + rel_w[.])`` are a
    per-(query, key) bias indexed by window position minus position in the query block."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, qw = q.shape[1:3]
    height, width = k.shape[1:3]
    (b0, b1), (h0, h1) = block_size, halo_size
    qb = (qh // (height // b0), qw // (width // b1))
    wins = (b0 + 2 * h0, b1 + 2 * h1)
    def pad(t):
        return torch.nn.functional.pad(t.double(), (0, 0, 0, 0, h1, h1, h0, h0))
    kp, vp = pad(k), pad(v)
    dims = []  # per dimension: [queries, padded keys] visibility and table row
    for qlen, klen, b, w, n in zip((qh, qw), (height, width), (b0, b1), wins, qb, strict=True):
        i = torch.arange(qlen)[:, None]
        j = torch.arange(klen + w - b)[None, :] - (i // n) * b  # position in the query block's window
        dims.append(((j >= 0) & (j < w), (j - i % n + w - 1).clamp(0, 2 * w - 2)))
    mask = _outer_and([d[0] for d in dims])
    bias = None
    if rel_h is not None:
        qd = q.double()
        rows = torch.einsum("bxyhd,xjd->bhxyj", qd, rel_h.double()[dims[0][1]])
        cols = torch.einsum("bxyhd,yjd->bhxyj", qd, rel_w.double()[dims[1][1]])
        bias = (rows[..., :, None] + cols[..., None, :]).reshape(q.shape[0], q.shape[-2], qh * qw, -1)
    return dense_attention(q, kp, vp, mask, bias, scale)


# The dense oracle of each op, by its canonical key (``visattn.functional.OP_SPECS``; a test checks they match).
PEERS = {"na": na, "window": window, "agent": agent, "bilevel_routing": bilevel_routing, "halo": halo}


def max_abs_error(out: Tensor, oracle: Tensor) -> float:
    return float((out.double().cpu() - oracle.cpu()).abs().max())

