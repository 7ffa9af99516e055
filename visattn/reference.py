"""Exact pure-PyTorch attention for every visattn op: the CPU path and the test oracle's twin.

All local patterns (neighborhood and window attention) reduce to one representation: for each spatial dimension a
*neighbor table* — for every position, the (padded) list of key positions it may attend, a validity mask and the
rpb offset of each key. Queries are processed in chunks whose gathered keys stay under a fixed element budget, so
memory never grows like N×N; with autograd on, each chunk is checkpointed so only the inputs are kept.

Arguments arrive validated and normalised by ``visattn.functional`` (tuples per dimension, float scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from visattn.geometry import pad_to_regions, region_grid, route_regions, vmoba_layout, vmoba_select

# Gathered key elements (queries × keys × heads × head_dim) per chunk: bounds peak memory at ~1 GiB in fp32.
CHUNK_ELEMENTS = 1 << 28


class NeighborTable(NamedTuple):
    """Per-dimension key lists: ``index[i, a]`` is the a-th key of query i, valid where ``valid[i, a]``."""

    index: Tensor  # [L, K] int64 key positions (clamped into range where invalid)
    valid: Tensor  # [L, K] bool
    offset: Tensor  # [L, K] int64 row of the rpb table for this (query, key) pair


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def na_table(length: int, kernel: int, dilation: int, stride: int, causal: bool, device=None) -> NeighborTable:
    """Neighbor table of one dimension under NATTEN's rules (docs/SEMANTICS.md)."""
    i = torch.arange(length, device=device)
    group = i % dilation
    qi = i // dilation
    group_len = (length - group + dilation - 1) // dilation
    a = torch.arange(kernel, device=device)
    if causal:
        lead = torch.minimum((qi // stride) * stride + stride - 1, group_len - 1)
        first = lead - kernel + 1  # may be negative near the start: those slots are invalid
        kj = first[:, None] + a[None, :]
        valid = (kj >= 0) & (kj <= qi[:, None])
    else:
        left = kernel // 2
        right = kernel // 2 - (1 - kernel % 2)
        lead = torch.minimum((qi // stride) * stride + stride // 2, group_len - 1)
        centre = torch.maximum(torch.minimum(lead, group_len - 1 - right), torch.full_like(lead, left))
        kj = (centre - left)[:, None] + a[None, :]
        valid = torch.ones_like(kj, dtype=torch.bool)
    offset = kj - qi[:, None] + kernel - 1
    index = (kj.clamp(min=0) * dilation + group[:, None]).clamp(max=length - 1)
    return NeighborTable(index, valid, offset.clamp(min=0, max=2 * kernel - 2))


def window_table(length: int, window: int, shift: int, device=None) -> NeighborTable:
    """Neighbor table of one dimension for (shifted) windows: windows start at ``shift - window`` + multiples."""
    x = torch.arange(length, device=device)
    start = torch.div(x - shift, window, rounding_mode="floor") * window + shift
    j = start[:, None] + torch.arange(window, device=device)[None, :]
    valid = (j >= 0) & (j < length)
    offset = j - x[:, None] + window - 1
    return NeighborTable(j.clamp(0, length - 1), valid, offset.clamp(0, 2 * window - 2))


def _chunk_neighbors(tables: Sequence[NeighborTable], spatial: Sequence[int], rows: Tensor):
    """Flat key indices [C, K], validity [C, K] and per-dim rpb offsets for a chunk of flat query indices."""
    coords = []
    rest = rows
    for size in reversed(spatial):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    n = len(spatial)
    index = valid = None
    offsets = []
    for d, (table, c) in enumerate(zip(tables, coords, strict=True)):
        shape = [rows.shape[0]] + [1] * n
        shape[1 + d] = table.index.shape[1]
        idx_d = table.index[c].view(shape)
        val_d = table.valid[c].view(shape)
        offsets.append(table.offset[c].view(shape))
        index = idx_d if index is None else index * spatial[d] + idx_d
        valid = val_d if valid is None else valid & val_d
    def flat(t: Tensor) -> Tensor:
        return t.expand([rows.shape[0]] + [tb.index.shape[1] for tb in tables]).reshape(rows.shape[0], -1)

    return flat(index), flat(valid), [flat(o) for o in offsets]


def _attend_chunk(q, k, v, index, valid, bias, extra_k, extra_v, scale, with_lse=False):
    """Softmax attention of q [B, C, H, D] over gathered keys k[:, index] (+ extra tokens) in compute precision.

    With ``with_lse`` also the natural-log log-sum-exp of each query's logits, [B, C, H]."""
    ct = _compute_dtype(q.dtype)
    ks = k[:, index].to(ct)  # [B, C, K, H, D]
    # invalid slots hold clamped (real) positions: zero their values, so a nan/inf there cannot reach this query
    # through 0 * nan (their logits are masked to -inf below, after the product)
    vs = v[:, index].to(ct).masked_fill(~valid[None, :, :, None, None], 0)
    logits = torch.einsum("bchd,bckhd->bchk", q.to(ct), ks) * scale
    if bias is not None:
        logits = logits + bias.to(ct)
    logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
    if extra_k is not None:
        extra = torch.einsum("bchd,bnhd->bchn", q.to(ct), extra_k.to(ct)) * scale
        logits = torch.cat([logits, extra], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    n_local = index.shape[1]
    out = torch.einsum("bchk,bckhd->bchd", probs[..., :n_local], vs)
    if extra_k is not None:
        out = out + torch.einsum("bchn,bnhd->bchd", probs[..., n_local:], extra_v.to(ct))
    if with_lse:
        return out, torch.logsumexp(logits, dim=-1)
    return out


def _local_attention(q, k, v, tables, rpb, scale, extra_k=None, extra_v=None, with_lse=False):
    """Shared engine of the reference: chunked gather attention over per-dimension neighbor tables.

    Returns the output [B, *spatial, H, Dv] in q's dtype, and with ``with_lse`` also the log-sum-exp
    [B, *spatial, H] in compute precision (float32, float64 for float64 inputs)."""
    batch, *spatial, heads, dim = q.shape
    dim_v = v.shape[-1]
    n = 1
    for size in spatial:  # plain loops, not math.prod(<genexpr>): torch.compile traces this function
        n *= size
    neighbors = 1
    for table in tables:
        neighbors *= table.index.shape[1]
    qf, kf, vf = q.reshape(batch, n, heads, dim), k.reshape(batch, n, heads, dim), v.reshape(batch, n, heads, dim_v)
    per_query = max(1, batch * neighbors * heads * max(dim, dim_v))
    chunk = max(1, min(n, CHUNK_ELEMENTS // per_query))
    # Checkpointed chunks keep only the inputs for the backward. torch.export cannot trace the checkpoint higher-order
    # op, so an exported graph runs the chunks plainly (same values, more activation memory if trained).
    needs_grad = torch.is_grad_enabled() and not torch.compiler.is_exporting() and any(
        t is not None and t.requires_grad for t in (q, k, v, rpb, extra_k, extra_v)
    )
    outputs, lses = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=q.device)

        def run(qc, kf, vf, rpb, extra_k, extra_v, rows=rows):
            index, valid, offsets = _chunk_neighbors(tables, spatial, rows)
            bias = None
            if rpb is not None:
                bias = rpb[(slice(None), *offsets)].permute(1, 0, 2)  # [C, H, K]
            return _attend_chunk(qc, kf, vf, index, valid, bias, extra_k, extra_v, scale, with_lse)

        qc = qf[:, start : start + chunk]
        if needs_grad:
            result = checkpoint(run, qc, kf, vf, rpb, extra_k, extra_v, use_reentrant=False)
        else:
            result = run(qc, kf, vf, rpb, extra_k, extra_v)
        if with_lse:
            outputs.append(result[0])
            lses.append(result[1])
        else:
            outputs.append(result)
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    out = out.to(q.dtype).reshape(batch, *spatial, heads, dim_v)
    if not with_lse:
        return out
    lse = torch.cat(lses, dim=1) if len(lses) > 1 else lses[0]
    return out, lse.reshape(batch, *spatial, heads)


def na(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    is_causal: tuple[bool, ...],
    rpb: Tensor | None,
    scale: float,
    additional_keys: Tensor | None,
    additional_values: Tensor | None,
    return_lse: bool = False,
):
    """Neighborhood attention (NA/DiNA/GNA, 1-3 D) with optional rpb and extra global tokens.

    With ``return_lse`` returns ``(out, lse)``: the exact natural-log log-sum-exp ``[B, *spatial, heads]`` of each
    query's logits over its neighborhood and the extra tokens (NATTEN's layout), differentiable."""
    spatial = q.shape[1:-2]
    tables = [
        na_table(length, *params, device=q.device)
        for length, params in zip(spatial, zip(kernel_size, dilation, stride, is_causal, strict=True), strict=True)
    ]
    return _local_attention(q, k, v, tables, rpb, scale, additional_keys, additional_values, with_lse=return_lse)


def window(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window_size: tuple[int, ...],
    shift: tuple[int, ...],
    rpb: Tensor | None,
    scale: float,
) -> Tensor:
    """(Shifted) window attention: each query attends its own, possibly partial, window."""
    spatial = q.shape[1:-2]
    tables = [window_table(length, w, t, device=q.device)
              for length, w, t in zip(spatial, window_size, shift, strict=True)]
    return _local_attention(q, k, v, tables, rpb, scale)


def agent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    agent_bias: Tensor | None,
    query_bias: Tensor | None,
    scale: float,
) -> Tensor:
    """Agent attention: agents attend the keys, then queries attend the agents' summaries."""
    batch, *spatial, heads, dim = q.shape
    ct = _compute_dtype(q.dtype)

    def as_bhnd(t: Tensor) -> Tensor:
        return t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2).to(ct)

    qh, kh, vh, ah = as_bhnd(q), as_bhnd(k), as_bhnd(v), as_bhnd(agents)
    agent_logits = (ah @ kh.transpose(-1, -2)) * scale  # [B, H, A, N]
    if agent_bias is not None:
        agent_logits = agent_logits + agent_bias.to(ct)
    agent_values = torch.softmax(agent_logits, dim=-1) @ vh  # [B, H, A, Dv]
    query_logits = (qh @ ah.transpose(-1, -2)) * scale  # [B, H, N, A]
    if query_bias is not None:
        query_logits = query_logits + query_bias.to(ct)
    out = torch.softmax(query_logits, dim=-1) @ agent_values
    return out.transpose(1, 2).reshape(batch, *spatial, heads, v.shape[-1]).to(q.dtype)


def block_sparse(q: Tensor, k: Tensor, v: Tensor, key_blocks: Tensor, block_size: int, scale: float,
                 extra_k: Tensor | None = None, extra_v: Tensor | None = None) -> Tensor:
    """Block-sparse attention over flattened tokens, plus every extra token, in one softmax.

    ``q, k, v``: ``[B, N, heads, D]``. ``key_blocks``: a static block mask ``[ceil(N / block), ceil(N / block)]``
    (query ``i`` attends key ``j`` iff ``key_blocks[i // block, j // block]``; Radial Attention) or per-row choices
    ``[B, heads, N, ceil(N / block)]`` (query ``i`` of head ``h`` attends key ``j`` iff ``key_blocks[b, h, i,
    j // block]``; VMoBA). Masked softmax in compute precision, chunked over queries (each chunk checkpointed
    under autograd) so memory stays ``chunk x N``. A query with no key at all gets a zero output."""
    batch, n, heads, dim = q.shape
    dim_v = v.shape[-1]
    ct = _compute_dtype(q.dtype)
    mask = key_blocks.to(q.device)
    per_row = mask.dim() == 4
    token_block = torch.arange(n, device=q.device) // block_size
    n_extra = 0 if extra_k is None else extra_k.shape[1]
    rows_per_chunk = max(block_size, CHUNK_ELEMENTS // max(1, batch * heads * (n + n_extra) * max(dim, dim_v)))
    rows_per_chunk -= rows_per_chunk % block_size
    needs_grad = torch.is_grad_enabled() and not torch.compiler.is_exporting() and any(
        t is not None and t.requires_grad for t in (q, k, v, extra_k, extra_v))

    def run(qc, k, v, extra_k, extra_v, start):
        rows = torch.arange(start, start + qc.shape[1], device=q.device)
        if per_row:
            allowed = mask[:, :, rows][..., token_block]  # [B, heads, C, N]
        else:
            allowed = mask[token_block[rows]][:, token_block]  # [C, N]
        logits = torch.einsum("bchd,bnhd->bhcn", qc.to(ct), k.to(ct)) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        values = v.to(ct)
        if extra_k is not None:
            extra = torch.einsum("bchd,bnhd->bhcn", qc.to(ct), extra_k.to(ct)) * scale
            logits = torch.cat([logits, extra], dim=-1)
            values = torch.cat([values, extra_v.to(ct)], dim=1)
        empty = torch.isinf(logits).all(dim=-1, keepdim=True)  # a row without keys: zero output, finite grads
        probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        return torch.einsum("bhcn,bnhd->bchd", probs, values)

    outs = []
    for start in range(0, n, rows_per_chunk):
        qc = q[:, start:start + rows_per_chunk]
        if needs_grad:
            outs.append(checkpoint(run, qc, k, v, extra_k, extra_v, start, use_reentrant=False))
        else:
            outs.append(run(qc, k, v, extra_k, extra_v, start))
    return torch.cat(outs, dim=1).to(q.dtype) if len(outs) > 1 else outs[0].to(q.dtype)


def vmoba(q: Tensor, k: Tensor, v: Tensor, chunk: tuple[int, ...], select_mode: str, topk: int, threshold: float,
          threshold_type: str, scale: float, extra_k: Tensor | None = None, extra_v: Tensor | None = None) -> Tensor:
    """VMoBA on ``[B, T, H, W, heads, D]``: tokens in chunk order, each query attends the key chunks it selects
    (``geometry.vmoba_select``) plus the extra tokens, one softmax; the output back in row-major order."""
    batch, frames, height, width, heads, _ = q.shape
    n = frames * height * width
    perm, chunk_len = vmoba_layout((frames, height, width), chunk)
    qf, kf, vf = (t.reshape(batch, n, heads, t.shape[-1]) for t in (q, k, v))
    if perm is not None:
        perm = perm.to(q.device)
        qf, kf, vf = (t[:, perm] for t in (qf, kf, vf))
    sel = vmoba_select(qf, kf, chunk_len, select_mode, topk, threshold, threshold_type)
    out = block_sparse(qf, kf, vf, sel, chunk_len, scale, extra_k, extra_v)
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out.reshape(batch, frames, height, width, heads, v.shape[-1])


def to_regions(t: Tensor, regions: tuple[int, int]) -> Tensor:
    """A region-divisible ``[B, Hp, Wp, heads, D]`` map as ``[B, R, tokens, heads, D]`` (regions and the tokens
    inside each row-major)."""
    batch, height, width, heads, dim = t.shape
    sh, sw = regions
    t = t.reshape(batch, sh, height // sh, sw, width // sw, heads, dim).permute(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(batch, sh * sw, (height // sh) * (width // sw), heads, dim)


def from_regions(t: Tensor, regions: tuple[int, int], region_size: tuple[int, int]) -> Tensor:
    """The inverse of ``to_regions``: ``[B, R, tokens, heads, D]`` back to ``[B, Hp, Wp, heads, D]``."""
    batch, _, _, heads, dim = t.shape
    (sh, sw), (rh, rw) = regions, region_size
    t = t.reshape(batch, sh, sw, rh, rw, heads, dim).permute(0, 1, 3, 2, 4, 5, 6)
    return t.reshape(batch, sh * rh, sw * rw, heads, dim)


def _gather_regions(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b]]`` for every batch item: [B, R, tokens, H, D] by [B, C, topk] -> [B, C, topk, tokens, H, D]."""
    return torch.stack([t[b, idx[b]] for b in range(t.shape[0])])


def bilevel_routing(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    regions: tuple[int, int],
    topk: int,
    scale: float,
    return_routing: bool = False,
):
    """Bi-level routing attention (BiFormer) on [B, H, W, heads, D] maps, zero-padded to the region grid."""
    batch, height, width, heads, dim = q.shape
    dim_v = v.shape[-1]
    qp, kp, vp = (pad_to_regions(t, regions) for t in (q, k, v))
    _, _, region_h, region_w = region_grid(height, width, regions)
    n_regions, per_region = regions[0] * regions[1], region_h * region_w
    routing = route_regions(qp, kp, regions, topk)  # [B, R, topk]

    ct = _compute_dtype(q.dtype)
    qr, kr, vr = (to_regions(t, regions).to(ct) for t in (qp, kp, vp))
    budget = max(1, CHUNK_ELEMENTS // max(1, batch * topk * per_region * heads * max(dim, dim_v)))
    outs = []
    for start in range(0, n_regions, budget):
        idx = routing[:, start : start + budget]  # [B, C, topk]
        ks = _gather_regions(kr, idx).flatten(2, 3)
        vs = _gather_regions(vr, idx).flatten(2, 3)
        logits = torch.einsum("bcthd,bckhd->bchtk", qr[:, start : start + budget], ks) * scale
        outs.append(torch.einsum("bchtk,bckhd->bcthd", torch.softmax(logits, dim=-1), vs))
    out = from_regions(torch.cat(outs, dim=1), regions, (region_h, region_w))
    out = out[:, :height, :width].to(q.dtype).contiguous()
    return (out, routing) if return_routing else out


def halo_rel_index(query_block: int, window: int, device=None) -> Tensor:
    """``[query_block, window]`` rows of a ``2*window-1`` relative table for HaloNet's logits (one dimension):
    query ``i`` of a block and key ``j`` of its window read row ``j - i + window - 1`` (docs/SEMANTICS.md)."""
    i = torch.arange(query_block, device=device)
    j = torch.arange(window, device=device)
    return j[None, :] - i[:, None] + window - 1


def halo(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: tuple[int, int],
    halo_size: tuple[int, int],
    rel_h: Tensor | None,
    rel_w: Tensor | None,
    scale: float,
) -> Tensor:
    """HaloNet's blocked local attention: each block of queries attends the zero-padded ``(b + 2h)`` window
    around its key block, with relative logits ``q . rel_h[row] + q . rel_w[col]`` added unscaled."""
    batch, qh, qw, heads, dim = q.shape
    _, height, width, _, dim_v = v.shape
    (b0, b1), (h0, h1) = block_size, halo_size
    nh, nw = height // b0, width // b1
    qb0, qb1 = qh // nh, qw // nw
    win0, win1 = b0 + 2 * h0, b1 + 2 * h1
    ct = _compute_dtype(q.dtype)

    def windows(t: Tensor) -> Tensor:  # [B, H, W, heads, D] -> [B, nh, nw, heads, win0, win1, D], zero-padded
        t = torch.nn.functional.pad(t.to(ct), (0, 0, 0, 0, h1, h1, h0, h0))
        return t.unfold(1, win0, b0).unfold(2, win1, b1).permute(0, 1, 2, 3, 5, 6, 4)

    qb = q.to(ct).reshape(batch, nh, qb0, nw, qb1, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)  # [.., qb0, qb1, D]
    kw, vw = windows(k), windows(v)
    logits = torch.einsum("bxyhijd,bxyhuvd->bxyhijuv", qb, kw) * scale
    if rel_h is not None:
        idx_h = halo_rel_index(qb0, win0, q.device)  # [qb0, win0]
        idx_w = halo_rel_index(qb1, win1, q.device)  # [qb1, win1]
        rows = torch.einsum("bxyhijd,rd->bxyhijr", qb, rel_h.to(ct))  # [.., qb0, qb1, 2*win0-1]
        cols = torch.einsum("bxyhijd,rd->bxyhijr", qb, rel_w.to(ct))
        i0 = torch.arange(qb0, device=q.device)[:, None, None]
        i1 = torch.arange(qb1, device=q.device)[None, :, None]
        rows = rows[..., i0, i1, idx_h[:, None, :]]  # [.., qb0, qb1, win0]: query (i0, i1), window row
        cols = cols[..., i0, i1, idx_w[None, :, :]]  # [.., qb0, qb1, win1]: query (i0, i1), window column
        logits = logits + rows[..., :, None] + cols[..., None, :]
    attn = torch.softmax(logits.flatten(-2), dim=-1).view_as(logits)
    out = torch.einsum("bxyhijuv,bxyhuvd->bxyhijd", attn, vw)  # [B, nh, nw, heads, qb0, qb1, Dv]
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, qh, qw, heads, dim_v)
    return out.to(q.dtype)
