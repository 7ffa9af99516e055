"""Where each query looks, on the host: the pieces of a pattern's geometry that the kernels, the reference and the
CPU schedules share, so that each is written once.

* :func:`interval`: the inclusive key interval of one query coordinate along one dimension, for neighborhood
  (kernel / stride / causal) and window (size / shift) attention; the host twin of ``kernels/patterns.py``'s
  ``key_interval`` (``kernels/tables.py`` and ``dense_schedule.py`` build their tables from it).
* :func:`region_grid`, :func:`pad_to_regions`, :func:`route_regions`: BiFormer's region grid and its top-k region
  routing, which the reference, the gather schedule and the fused kernel's entry all use, so every backend routes
  identically.

It sits at the bottom of the import layers (docs/ARCHITECTURE.md, "Import rules"): it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def interval(q: int, group_len: int, kernel: int, stride: int, shift: int, causal: bool, window: bool):
    """Inclusive key interval ``(first, last)`` of group coordinate ``q`` along one dimension (``window``: a
    window of size ``kernel`` shifted by ``shift``; else a neighbourhood of size ``kernel`` with ``stride`` and
    ``causal``), the same rule as ``kernels/patterns.py``'s ``key_interval``."""
    if window:
        origin = ((q - shift + kernel) // kernel - 1) * kernel + shift
        return max(origin, 0), min(origin + kernel - 1, group_len - 1)
    if causal:
        lead = min((q // stride) * stride + stride - 1, group_len - 1)
        return max(lead - kernel + 1, 0), q
    lead = min((q // stride) * stride + stride // 2, group_len - 1)
    left = kernel // 2
    right = kernel - 1 - left
    centre = min(max(lead, left), group_len - 1 - right)
    return centre - left, centre + right


def _mean_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def region_grid(height: int, width: int, regions: tuple[int, int]) -> tuple[int, int, int, int]:
    """Padded map size and region size: (padded_h, padded_w, region_h, region_w)."""
    region_h, region_w = -(-height // regions[0]), -(-width // regions[1])
    return region_h * regions[0], region_w * regions[1], region_h, region_w


def route_regions(q: Tensor, k: Tensor, regions: tuple[int, int], topk: int) -> Tensor:
    """BiFormer routing on padded maps [B, Hp, Wp, heads, D]: top-k regions per query region, [B, R, topk]."""
    batch, height, width = q.shape[:3]
    sh, sw = regions

    def region_means(t: Tensor) -> Tensor:
        t = t.detach().reshape(batch, sh, height // sh, sw, width // sw, -1)
        return t.mean(dim=(2, 4), dtype=_mean_dtype(t.dtype)).reshape(batch, sh * sw, -1)  # no fp32 copy

    affinity = region_means(q) @ region_means(k).transpose(-1, -2)
    return torch.topk(affinity, k=topk, dim=-1).indices


def pad_to_regions(t: Tensor, regions: tuple[int, int]) -> Tensor:
    """Zero-pad [B, H, W, heads, D] at the bottom/right so the regions divide it."""
    padded_h, padded_w, _, _ = region_grid(t.shape[1], t.shape[2], regions)
    return F.pad(t, (0, 0, 0, 0, 0, padded_w - t.shape[2], 0, padded_h - t.shape[1]))


__all__ = ["interval", "pad_to_regions", "region_grid", "route_regions"]
