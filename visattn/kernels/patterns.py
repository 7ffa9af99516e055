"""Patterns: per-dimension index rules shared by the forward and backward kernels.

Every local pattern (neighborhood with kernel/dilation/stride/causal, window and shifted window) is a product over
spatial dimensions of 1-D rules, and in every case the keys a query sees along one dimension form ONE interval
``[start(qi), end(qi)]`` in dilation-group coordinates, with ``start`` and ``end`` non-decreasing in ``qi``.
The engine only needs three things from a pattern, all written here as small ``@triton.jit`` functions:

* ``key_interval``: the interval of one query (vectorised over a tile's rows);
* ``split_tile``: where a query/key tile starts and which of its rows are real (windows align tiles to windows);
* ``in_box`` / ``in_box_t``: which keys of a tile lie in each row's window (the product of the 1-D intervals).

``tables.py`` mirrors these rules on the host for what is cheaper to compute once per shape than per program
(the dK/dV pass's query ranges, the rpb gradient's offset maps).
"""

import triton
import triton.language as tl


@triton.jit
def na_interval(qi, group_len, kernel, stride, CAUSAL: tl.constexpr):
    """Neighborhood window of group coordinate ``qi`` (docs/SEMANTICS.md rules 2-3), inclusive bounds."""
    if CAUSAL:
        lead = tl.minimum((qi // stride) * stride + stride - 1, group_len - 1)
        start = tl.maximum(lead - kernel + 1, 0)
        end = qi
    else:
        lead = tl.minimum((qi // stride) * stride + stride // 2, group_len - 1)
        left = kernel // 2
        right = kernel - 1 - left
        centre = tl.minimum(tl.maximum(lead, left), group_len - 1 - right)
        start = centre - left
        end = centre + right
    return start, end


@triton.jit
def window_interval(x, length, window, shift):
    """The (possibly partial) shifted window that contains ``x``, inclusive bounds."""
    # (x - shift) may be negative: shift the numerator up by one window so '//' never sees a negative value.
    origin = ((x - shift + window) // window - 1) * window + shift
    return tl.maximum(origin, 0), tl.minimum(origin + window - 1, length - 1)


@triton.jit
def key_interval(qi, group_len, kernel, stride, shift, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Inclusive key interval along one dimension for query coordinate(s) ``qi``."""
    if WINDOW:
        start, end = window_interval(qi, group_len, kernel, shift)
    else:
        start, end = na_interval(qi, group_len, kernel, stride, CAUSAL)
    return start, end


@triton.jit
def split_tile(t, length, dilation, n_tiles, kernel, shift, TILE: tl.constexpr, WINDOW: tl.constexpr):
    """Tile number ``t`` along one dimension -> (group, group length, first coordinate, valid [lo, hi)).

    Neighborhood: tiles of TILE rows over each dilation group. Window: each window is cut into
    ceil(window / TILE) tiles, so a tile never straddles two windows and all its rows share one key interval.
    """
    group = t // n_tiles
    tile = t % n_tiles
    group_len = (length - group + dilation - 1) // dilation
    if WINDOW:
        per_window = (kernel + TILE - 1) // TILE
        # window u covers [u*w + shift, u*w + shift + w); with shift > 0 the first one (u = -1) is partial.
        u = tile // per_window - (shift + kernel - 1) // kernel
        origin = u * kernel + shift
        first = origin + (tile % per_window) * TILE
        lo = tl.maximum(origin, 0)
        hi = tl.minimum(origin + kernel, group_len)
    else:
        first = tile * TILE
        lo = first * 0
        hi = group_len + first * 0
    return group, group_len, first, lo, hi


@triton.jit
def unflatten(r, S1, S2):
    """Row-major index inside a (S0, S1, S2) box -> its three coordinates."""
    return r // (S1 * S2), (r // S2) % S1, r % S2


@triton.jit
def in_interval(kj, start, end):
    """[rows, cols] mask: key coordinate kj (cols) inside the row's interval [start, end]."""
    return (kj[None, :] >= start[:, None]) & (kj[None, :] <= end[:, None])


@triton.jit
def in_interval_t(kj, start, end):
    """[keys, queries] mask (the transpose of ``in_interval``), used by the dK/dV pass."""
    return (kj[:, None] >= start[None, :]) & (kj[:, None] <= end[None, :])


@triton.jit
def in_box(k0, k1, k2, start0, start1, start2, end0, end1, end2):
    """[rows, cols] mask: key coordinates (cols) inside the row's interval along all three dimensions."""
    return in_interval(k0, start0, end0) & in_interval(k1, start1, end1) & in_interval(k2, start2, end2)


@triton.jit
def in_box_t(k0, k1, k2, start0, start1, start2, end0, end1, end2):
    """[keys, queries] mask (the transpose of ``in_box``), used by the dK/dV pass."""
    return in_interval_t(k0, start0, end0) & in_interval_t(k1, start1, end1) & in_interval_t(k2, start2, end2)
