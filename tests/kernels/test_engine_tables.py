"""Host-side pattern tables (``visattn/kernels/tables.py``) against brute force from the dense masks of
``visattn.bench.dense`` (an independent formulation of docs/SEMANTICS.md)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from visattn.bench.dense import na_mask_1d, window_mask_1d
from visattn.kernels import tables
from visattn.kernels.ops import make_pattern


def _group_mask(length: int, kernel: int, dilation: int, stride: int, causal: bool, window: bool, shift: int):
    return window_mask_1d(length, kernel, shift) if window else na_mask_1d(length, kernel, dilation, stride, causal)


NA_CASES = [(21, 5, 1, 1, False), (20, 4, 2, 1, True), (19, 6, 1, 4, False), (32, 8, 1, 8, False),
            (56, 7, 8, 1, False), (14, 7, 2, 1, False), (7, 7, 1, 1, True), (33, 1, 3, 1, False)]
WINDOW_CASES = [(14, 7, 0), (14, 7, 3), (12, 4, 2), (8, 8, 5)]


@pytest.mark.parametrize("length,kernel,dilation,stride,causal", NA_CASES)
@pytest.mark.parametrize("tile", [1, 4, 16])
def test_query_ranges_match_brute_force_na(length, kernel, dilation, stride, causal, tile):
    _check_ranges(length, kernel, dilation, stride, causal, False, 0, tile)


@pytest.mark.parametrize("length,window,shift", WINDOW_CASES)
@pytest.mark.parametrize("tile", [2, 4, 8])
def test_query_ranges_match_brute_force_window(length, window, shift, tile):
    _check_ranges(length, window, 1, 1, False, True, shift, tile)


def _check_ranges(length, kernel, dilation, stride, causal, window, shift, tile):
    mask = _group_mask(length, kernel, dilation, stride, causal, window, shift)  # [query pos, key pos]
    if window:
        n_tiles = (length // kernel + (1 if shift > 0 else 0)) * -(-kernel // tile)
    else:
        n_tiles = math.ceil(math.ceil(length / dilation) / tile)
    rows = tables._dim_ranges(length, dilation, n_tiles, kernel, stride, shift, causal, window, tile)
    assert len(rows) == dilation * n_tiles
    for t, (q_lo, q_hi, inner_lo, inner_hi) in enumerate(rows):
        group, group_len, first, lo, hi = tables.tile_span(t, length, dilation, n_tiles, kernel, shift, tile, window)
        keys = [group + dilation * j for j in range(max(first, lo), min(first + tile, hi))]
        if not keys:
            continue
        queries = [group + dilation * i for i in range(group_len)]
        reach = [i for i, p in enumerate(queries) if any(mask[p, key] for key in keys)]
        hold = [i for i, p in enumerate(queries) if all(mask[p, key] for key in keys)]
        assert (q_lo, q_hi) == (reach[0], reach[-1]), (t, reach)
        if hold:  # the inner range is a superset bound used only to skip masks: it must hold every such query
            assert inner_lo <= hold[0] and inner_hi >= hold[-1]
            assert all(all(mask[queries[i], key] for key in keys) for i in range(inner_lo, inner_hi + 1))


@pytest.mark.parametrize("length,kernel,dilation,stride,causal", NA_CASES[:6])
def test_rpb_offset_map_matches_dense_mask(length, kernel, dilation, stride, causal):
    """Neighbour j of position p sits at table offset (key - query + kernel - 1) in group coordinates, and the map
    has exactly one entry per allowed (query, key) pair."""
    offsets = tables._offset_map(length, dilation, kernel, stride, 0, causal, False)
    mask = na_mask_1d(length, kernel, dilation, stride, causal)
    for p in range(length):
        keys = [k for k in range(length) if mask[p, k]]
        got = sorted(int(r) for r in torch.nonzero(offsets[p])[:, 1])
        want = sorted(k // dilation - p // dilation + kernel - 1 for k in keys)
        assert got == want


def test_query_range_table_shape_and_cache():
    pat = make_pattern(2, False, (7, 7), (1, 1), (1, 1), (False, False), (0, 0))
    lengths, n_tiles, box = (1, 14, 14), (1, 2, 4), (1, 8, 4)
    table = tables.query_range_table(pat, lengths, n_tiles, box, torch.device("cpu"))
    assert table.dtype == torch.int32 and tuple(table.shape) == (3, 4, 4)
    assert tables.query_range_table(pat, lengths, n_tiles, box, torch.device("cpu")) is table
    for combo in itertools.product(range(2), range(4)):
        assert table[1, combo[0], 0] <= table[1, combo[0], 1]


@pytest.mark.parametrize("length,kernel,dilation,stride,causal", NA_CASES)
@pytest.mark.parametrize("tile_m,tile_n", [(4, 8), (16, 4), (8, 8)])
def test_key_walk_length_matches_brute_force(length, kernel, dilation, stride, causal, tile_m, tile_n):
    """The bias tiles' key walk per query tile: the dense mask's first and last key of the tile's real queries."""
    mask = _group_mask(length, kernel, dilation, stride, causal, False, 0)
    n_tiles = math.ceil(math.ceil(length / dilation) / tile_m)
    most = 0
    for t in range(dilation * n_tiles):
        group, index = divmod(t, n_tiles)
        positions = list(range(group, length, dilation))
        rows = positions[index * tile_m:(index + 1) * tile_m]
        keys = [j for j, p in enumerate(positions) for r in rows if mask[r, p]]
        if keys:
            most = max(most, (max(keys) - min(keys) + tile_n) // tile_n)
    assert tables._dim_walk(length, dilation, n_tiles, kernel, stride, 0, causal, False, tile_m, tile_n) == most


@pytest.mark.parametrize("length,window,shift", WINDOW_CASES)
@pytest.mark.parametrize("tile_m,tile_n", [(2, 4), (4, 2)])
def test_query_walk_length_matches_brute_force(length, window, shift, tile_m, tile_n):
    """The dK/dV walk's query tiles per key tile, from the queries that reach each key tile."""
    mask = _group_mask(length, window, 1, 1, False, True, shift)
    n_tiles = (length // window + (1 if shift > 0 else 0)) * -(-window // tile_n)
    most = 0
    for t in range(n_tiles):
        _, _, first, lo, hi = tables.tile_span(t, length, 1, n_tiles, window, shift, tile_n, True)
        keys = range(max(first, lo), min(first + tile_n, hi))
        reach = [i for i in range(length) if any(mask[i, key] for key in keys)]
        if reach:
            most = max(most, (reach[-1] - reach[0] + tile_m) // tile_m)
    pat = make_pattern(1, True, (window,), (1,), (1,), (False,), (shift,))
    got = tables.query_walk_length(pat, (1, 1, length), (1, 1, n_tiles), (1, 1, tile_m), (1, 1, tile_n))
    assert got == most
