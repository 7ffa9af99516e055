"""Dense-with-mask schedule: a local-attention call on a small map as ONE scaled-dot-product-attention call.

When a query's window covers a large share of the map (NAT/Swin's 14x14 and 7x7 stages), visiting the whole map
with an additive mask costs no more than the neighbour-by-neighbour reference and runs on PyTorch's fused SDPA
kernels (CPU and CUDA). The mask is exact: ``-inf`` outside each query's window (the same per-dimension rules as the
engine, ``kernels/tables.py``), plus the relative-position bias gathered from the table inside it, so results equal
the reference up to rounding; gradients reach q, k, v and the table through SDPA and the gather.

Two limits of one masked SDPA call, and what this module does about them:

- A masked logit is added after the product, so a NaN or inf in one key or value would reach every query of the
  call (``-inf + nan`` is nan, ``0 * nan`` is nan). Calls whose keys or values hold a non-finite number run the
  neighbour-table reference instead, which masks before it multiplies (one ``isfinite`` pass over k and v).
- PyTorch's fused CPU SDPA kernel has no double backward. float64 calls (``gradgradcheck``) run SDPA's math
  backend, which has one; for a double backward in lower precision pass ``backend="reference"``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from visattn import reference
from visattn.caching import cached, may_cache
from visattn.geometry import interval

# Use the schedule when the map has at most this many tokens and each query sees at least this share of it.
MAX_TOKENS = 1024
MIN_COVERAGE = 0.2

_CACHE: dict = {}


def coverage(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...]) -> float:
    """The share of the map one query's window covers (dilation counts: a dilated window spans its group)."""
    return math.prod(k * d for k, d in zip(kernel, dilation, strict=True)) / math.prod(spatial)


def worth_it(spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], extra: bool) -> bool:
    """Whether a call should run as one masked SDPA call (small map, large window, no extra global tokens)."""
    return (not extra and math.prod(spatial) <= MAX_TOKENS
            and coverage(spatial, kernel, dilation) >= MIN_COVERAGE)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every element of ``tensors`` is finite (one reduction each; a host sync on CUDA). Fake, traced and
    meta tensors hold no data: True (the schedule's shapes are what such a call is after; timm builds models on the
    meta device and runs them there)."""
    if not may_cache(*tensors) or any(t.is_meta for t in tensors):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA on [B, H, N, D]; float64 on the math backend, the one with a double backward."""
    if q.dtype == torch.float64:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _dim_tables(length: int, kernel: int, dilation: int, stride: int, causal: bool, window: bool, shift: int):
    """[L, L] bool mask and [L, L] long table offset (key - query + kernel - 1, clamped) along one dimension."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for p in range(length):
        group = p % dilation
        group_len = (length - group + dilation - 1) // dilation
        start, end = interval(p // dilation, group_len, kernel, stride, shift, causal, window)
        mask[p, group + start * dilation: group + end * dilation + 1: dilation] = True
    pos = torch.arange(length)
    offset = (pos[None, :] // dilation - pos[:, None] // dilation + kernel - 1).clamp(0, 2 * kernel - 2)
    return mask, offset


def _masks(spatial, kernel, dilation, stride, causal, window, shift, q):
    key = (tuple(spatial), tuple(kernel), tuple(dilation), tuple(stride), tuple(causal), window, tuple(shift),
           str(q.device))
    return cached(_CACHE, key, lambda: _build_masks(spatial, kernel, dilation, stride, causal, window, shift,
                                                    q.device), q, limit=64)


def _build_masks(spatial, kernel, dilation, stride, causal, window, shift, device):
    """[N, N] bool allowed pairs and [N, N] long rpb-table offsets, as outer products of the per-dimension tables."""
    mask, index = torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long)
    for i, length in enumerate(spatial):
        m, o = _dim_tables(length, kernel[i], dilation[i], stride[i], causal[i], window, shift[i])
        n = mask.shape[0]
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(n * length, n * length)
        index = (index[:, None, :, None] * (2 * kernel[i] - 1) + o[None, :, None, :]).reshape(n * length, -1)
    return mask.to(device), index.to(device)


def local_attention(q: Tensor, k: Tensor, v: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...],
                    stride: tuple[int, ...], causal: tuple[bool, ...], rpb: Tensor | None, scale: float,
                    window: bool = False, shift: tuple[int, ...] | None = None) -> Tensor:
    """Neighborhood (``window=False``) or (shifted) window attention on ``[B, *spatial, heads, D]`` as one SDPA
    call with an additive ``[heads, N, N]`` mask; arguments already validated and normalised by the caller."""
    batch, *spatial, heads, _ = q.shape
    rank = len(spatial)
    shift = shift if shift is not None else (0,) * rank
    if not all_finite(k, v):  # masked pairs must not multiply a nan/inf: the reference masks before the product
        if window:
            return reference.window(q, k, v, kernel, shift, rpb, scale)
        return reference.na(q, k, v, kernel, dilation, stride, causal, rpb, scale, None, None)
    mask, index = _masks(spatial, kernel, dilation, stride, causal, window, shift, q)
    if rpb is None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))[None]
    else:
        gathered = rpb.reshape(heads, -1)[:, index]  # [heads, N, N]; its backward sums into the table
        bias = gathered.to(q.dtype).masked_fill(~mask, float("-inf"))

    def as_bhnd(t: Tensor) -> Tensor:
        return t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)

    out = _sdpa(as_bhnd(q), as_bhnd(k), as_bhnd(v), bias[None], scale)
    return out.transpose(1, 2).reshape(batch, *spatial, heads, v.shape[-1])


def _window_tables(window: tuple[int, ...], spatial: tuple[int, ...], shift: tuple[int, ...], q: Tensor):
    """For the rolled-and-partitioned layout: [nW, n, n] bool (pairs in the same original window) and [n, n] long
    table offsets inside a window (n = prod(window))."""
    key = ("window", window, spatial, shift, str(q.device))
    return cached(_CACHE, key, lambda: _build_window_tables(window, spatial, shift, q.device), q, limit=64)


def _build_window_tables(window, spatial, shift, device):
    """[nW, n, n] same-original-window mask and [n, n] rpb offsets of the rolled-and-partitioned layout."""
    region_masks = []  # per dim: [windows along dim, w, w] same-region mask
    offsets = torch.zeros(1, 1, dtype=torch.long)
    for length, w, t in zip(spatial, window, shift, strict=True):
        rolled = torch.arange(length)
        # after rolling by -t, the last window holds the tail [L-w+t, L) and the head [0, t) of the original
        region = torch.where(rolled < length - w, 0, torch.where(rolled < length - t, 1, 2)).view(-1, w)
        region_masks.append(region[:, :, None] == region[:, None, :])
        local = torch.arange(w)
        o = local[None, :] - local[:, None] + w - 1
        n = offsets.shape[0]
        offsets = (offsets[:, None, :, None] * (2 * w - 1) + o[None, :, None, :]).reshape(n * w, n * w)
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    for m in region_masks:  # outer product over dims: windows and in-window positions row-major
        nw, n = mask.shape[0], mask.shape[1]
        mask = (mask[:, None, :, None, :, None] & m[None, :, None, :, None, :]).reshape(
            nw * m.shape[0], n * m.shape[1], n * m.shape[1])
    return mask.to(device), offsets.to(device)


def window_partition_attention(q: Tensor, k: Tensor, v: Tensor, window: tuple[int, ...], shift: tuple[int, ...],
                               rpb: Tensor | None, scale: float) -> Tensor:
    """(Shifted) window attention as timm's Swin computes it: roll by ``-shift``, partition into windows, one
    batched SDPA call with a per-window mask for the windows that hold wrapped pieces, un-partition, roll back.
    Exactly visattn's semantics (the wrapped pieces are the partial border windows); the CPU path of ``auto``."""
    batch, *spatial, heads, dim = q.shape
    rank = len(spatial)
    spatial, window, shift = tuple(spatial), tuple(window), tuple(shift)
    if any(shift) and not all_finite(k, v):  # wrapped pieces share a partition: mask before the product
        return reference.window(q, k, v, window, shift, rpb, scale)
    mask, offsets = _window_tables(window, spatial, shift, q)
    dims = tuple(range(1, rank + 1))
    grid = [length // w for length, w in zip(spatial, window, strict=True)]
    n = math.prod(window)

    def partition(t: Tensor) -> Tensor:  # [B, *spatial, H, D] -> [B, nW, H, n, D]
        if any(shift):
            t = torch.roll(t, shifts=tuple(-s for s in shift), dims=dims)
        shape = [batch]
        for g, w in zip(grid, window, strict=True):
            shape += [g, w]
        t = t.reshape(*shape, heads, t.shape[-1])
        order = [0, *range(1, 2 * rank, 2), 2 * rank + 1, *range(2, 2 * rank + 1, 2), 2 * rank + 2]
        return t.permute(*order).reshape(batch, math.prod(grid), heads, n, t.shape[-1])

    bias = torch.zeros(mask.shape[0], 1, n, n, dtype=q.dtype, device=q.device)
    if rpb is not None:
        bias = bias + rpb.reshape(heads, -1)[:, offsets].to(q.dtype)[None]  # [1, H, n, n] -> [nW, H, n, n]
    bias = bias.masked_fill(~mask[:, None], float("-inf"))
    out = _sdpa(partition(q), partition(k), partition(v), bias, scale)
    # [B, nW, H, n, Dv] -> [B, *spatial, H, Dv]
    dv = out.shape[-1]
    out = out.reshape(batch, *grid, heads, *window, dv)
    order = [0]
    for i in range(rank):
        order += [1 + i, 2 + rank + i]
    order += [1 + rank, 2 + 2 * rank]
    out = out.permute(*order).reshape(batch, *spatial, heads, dv)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=dims)
    return out


def routed_gather_attention(q: Tensor, k: Tensor, v: Tensor, regions: tuple[int, int], topk: int,
                            scale: float) -> Tensor:
    """Bi-level routing attention as BiFormer computes it: route exactly as the reference does, gather the routed
    regions' keys/values (a ``topk``-times copy, in region chunks bounded like the reference's), then one SDPA call
    per chunk over (batch, region) rows. Same result as ``reference.bilevel_routing`` up to rounding; the CPU path
    of ``auto`` (SDPA's CPU kernel beats the reference's einsums: benchmarks/cpu_backbones.py)."""
    batch, height, width, heads, dim = q.shape
    dim_v = v.shape[-1]
    padded_h, padded_w, region_h, region_w = reference.region_grid(height, width, regions)
    if (padded_h, padded_w) != (height, width):
        q, k, v = (reference.pad_to_regions(t, regions) for t in (q, k, v))
    n_regions, tokens = regions[0] * regions[1], region_h * region_w
    routing = reference.route_regions(q, k, regions, topk)  # [B, R, topk]

    qr = reference.to_regions(q, regions)
    kr, vr = (reference.to_regions(t, regions).reshape(batch * n_regions, tokens, heads, t.shape[-1])
              for t in (k, v))
    rows = max(1, reference.CHUNK_ELEMENTS // max(1, batch * topk * tokens * heads * max(dim, dim_v)))
    outs = []
    for start in range(0, n_regions, rows):
        idx = routing[:, start:start + rows]  # [B, C, topk]
        chunk = idx.shape[1]
        flat = (idx + torch.arange(batch, device=idx.device)[:, None, None] * n_regions).reshape(-1)
        keys, values = (t.index_select(0, flat).reshape(batch * chunk, topk * tokens, heads, t.shape[-1])
                        for t in (kr, vr))
        query = qr[:, start:start + chunk].reshape(batch * chunk, tokens, heads, dim)
        out = _sdpa(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), None,
                    scale)  # [B*C, heads, tokens, Dv]
        outs.append(out.transpose(1, 2).reshape(batch, chunk, tokens, heads, dim_v))
    out = reference.from_regions(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], regions, (region_h, region_w))
    return out[:, :height, :width].contiguous()
