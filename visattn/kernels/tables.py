"""Host-side mirrors of the pattern rules (``patterns.py``), computed once per problem shape and cached.

* ``query_range_table``: for every key tile of the dK/dV pass, the queries whose windows reach it (``q_lo..q_hi``)
  and those whose windows hold all of it (``inner_lo..inner_hi``). The kernel used to find them with four binary
  searches per dimension and program (51 dependent steps), which cost more than the tile work itself on small maps.
* ``rpb_offset_maps``: for the atomic-free rpb gradient, the one-hot map from (query position, neighbour index) to
  the bias-table offset ``key - query + kernel - 1`` along each dimension; ``rpb_joint_map``, their product over
  all dimensions, so a small map's reduction is one matmul (one launch, not six).

Both must agree exactly with the ``@triton.jit`` rules in ``patterns.py``; the interpreter tests compare the fused
backward (which uses them) against the float64 reference, so a mismatch fails there.
"""

from __future__ import annotations

import bisect
import functools
import math

import torch

from visattn.caching import cached
from visattn.geometry import interval


def tile_span(t: int, length: int, dilation: int, n_tiles: int, kernel: int, shift: int, tile: int, window: bool):
    """(group, group length, first coordinate, lo, hi) of tile ``t`` along one dimension (``patterns.split_tile``)."""
    group, index = divmod(t, n_tiles)
    group_len = (length - group + dilation - 1) // dilation
    if window:
        per_window = (kernel + tile - 1) // tile
        u = index // per_window - (shift + kernel - 1) // kernel
        origin = u * kernel + shift
        return group, group_len, origin + (index % per_window) * tile, max(origin, 0), min(origin + kernel, group_len)
    return group, group_len, index * tile, 0, group_len


@functools.lru_cache(maxsize=256)
def _dim_ranges(length: int, dilation: int, n_tiles: int, kernel: int, stride: int, shift: int, causal: bool,
                window: bool, tile: int) -> tuple:
    """Rows ``(q_lo, q_hi, inner_lo, inner_hi)`` for the ``dilation * n_tiles`` key tiles of one dimension."""
    rows = []
    bounds = {}  # group length -> (starts, ends); at most two distinct lengths across dilation groups
    for t in range(dilation * n_tiles):
        _, group_len, first, lo, hi = tile_span(t, length, dilation, n_tiles, kernel, shift, tile, window)
        ka, kb = max(first, lo), min(first + tile, hi) - 1
        if kb < ka:
            rows.append((0, -1, 0, -1))
            continue
        if group_len not in bounds:
            pairs = [interval(q, group_len, kernel, stride, shift, causal, window) for q in range(group_len)]
            bounds[group_len] = ([p[0] for p in pairs], [p[1] for p in pairs])
        starts, ends = bounds[group_len]
        rows.append((bisect.bisect_left(ends, ka), bisect.bisect_right(starts, kb) - 1,
                     bisect.bisect_left(ends, kb), bisect.bisect_right(starts, ka) - 1))
    return tuple(rows)


_DEVICE_TABLES: dict = {}


def query_range_table(pattern, lengths, n_tiles, tile_box, device: torch.device) -> torch.Tensor:
    """int32 ``[3, T, 4]`` (T = the most key tiles of any dimension) on ``device``, cached per problem shape."""
    key = (pattern, tuple(lengths), tuple(n_tiles), tuple(tile_box), str(device))

    def build() -> torch.Tensor:
        per_dim = [_dim_ranges(lengths[i], pattern.dilation[i], n_tiles[i], pattern.kernel[i], pattern.stride[i],
                               pattern.shift[i], pattern.causal[i], pattern.window, tile_box[i]) for i in range(3)]
        width = max(len(rows) for rows in per_dim)
        padded = [list(rows) + [(0, -1, 0, -1)] * (width - len(rows)) for rows in per_dim]
        return torch.tensor(padded, dtype=torch.int32).to(device)

    return cached(_DEVICE_TABLES, key, build)


def _offset_map(length: int, dilation: int, kernel: int, stride: int, shift: int, causal: bool,
                window: bool) -> torch.Tensor:
    """float32 ``[length, kernel, 2*kernel - 1]``: one where neighbour j of position p sits at table offset r."""
    out = torch.zeros(length, kernel, 2 * kernel - 1)
    for p in range(length):
        group = p % dilation
        q = p // dilation
        group_len = (length - group + dilation - 1) // dilation
        start, end = interval(q, group_len, kernel, stride, shift, causal, window)
        for j in range(end - start + 1):
            out[p, j, start + j - q + kernel - 1] = 1.0
    return out


def rpb_offset_maps(pattern, lengths, device: torch.device) -> list[torch.Tensor]:
    """The three per-dimension ``_offset_map`` tensors of a problem, on ``device`` (cached there)."""
    key = ("rpb", pattern, tuple(lengths), str(device))
    return cached(_DEVICE_TABLES, key, lambda: [
        _offset_map(lengths[i], pattern.dilation[i], pattern.kernel[i], pattern.stride[i], pattern.shift[i],
                    pattern.causal[i], pattern.window).to(device) for i in range(3)])


# The joint map below is one matmul's right operand; above this size (NAT-T's 56x56 stage: 104 MB) the reduction
# takes the three per-dimension maps one after the other instead.
JOINT_MAP_BYTES = 32 << 20


def rpb_joint_map(pattern, lengths, device: torch.device) -> torch.Tensor | None:
    """float32 ``[positions * neighbours, (2K0-1)(2K1-1)(2K2-1)]``: one where neighbour ``j`` of position ``p`` (both
    flattened row-major, as in the per-pair dS buffer) sits at table offset ``r``; the product of the three
    per-dimension maps. ``None`` above ``JOINT_MAP_BYTES``. Cached on ``device``."""
    k0, k1, k2 = pattern.kernel
    rows = math.prod(lengths) * k0 * k1 * k2
    cols = (2 * k0 - 1) * (2 * k1 - 1) * (2 * k2 - 1)
    if rows * cols * 4 > JOINT_MAP_BYTES:
        return None

    def build() -> torch.Tensor:
        w0, w1, w2 = rpb_offset_maps(pattern, lengths, device)
        return torch.einsum("xia,yjb,zkc->xyzijkabc", w0, w1, w2).reshape(rows, cols).contiguous()

    return cached(_DEVICE_TABLES, ("rpb-joint", pattern, tuple(lengths), str(device)), build)


@functools.lru_cache(maxsize=256)
def _dim_walk(length: int, dilation: int, n_tiles: int, kernel: int, stride: int, shift: int, causal: bool,
              window: bool, tile_m: int, tile_n: int) -> int:
    """The most key tiles (``tile_n`` rows) one query tile (``tile_m`` rows) walks along one dimension, as
    ``engine._query_dim`` counts them."""
    most = 0
    for t in range(dilation * n_tiles):
        _, group_len, first, lo, hi = tile_span(t, length, dilation, n_tiles, kernel, shift, tile_m, window)
        qa, qb = max(first, lo), min(first + tile_m, hi) - 1
        if qb < qa:
            continue
        ka = interval(qa, group_len, kernel, stride, shift, causal, window)[0]
        kb = interval(qb, group_len, kernel, stride, shift, causal, window)[1]
        most = max(most, (kb - ka + tile_n) // tile_n)
    return most


def key_walk_length(pattern, lengths, n_tiles, tile_m, tile_n) -> int:
    """The most key tiles any query tile of the forward / dQ walk visits (the expanded bias's tiles per program)."""
    return math.prod(_dim_walk(lengths[i], pattern.dilation[i], n_tiles[i], pattern.kernel[i], pattern.stride[i],
                               pattern.shift[i], pattern.causal[i], pattern.window, tile_m[i], tile_n[i])
                     for i in range(3))


def query_walk_length(pattern, lengths, n_tiles, tile_m, tile_n) -> int:
    """The most query tiles (``tile_m`` rows) any key tile (``tile_n`` rows, ``n_tiles`` per group) of the dK/dV
    pass walks, from the same rows as ``query_range_table``."""
    most = 1
    for i in range(3):
        rows = _dim_ranges(lengths[i], pattern.dilation[i], n_tiles[i], pattern.kernel[i], pattern.stride[i],
                           pattern.shift[i], pattern.causal[i], pattern.window, tile_n[i])
        most *= max([(q_hi - q_lo + tile_m[i]) // tile_m[i] for q_lo, q_hi, _, _ in rows if q_hi >= q_lo] or [0])
    return most
