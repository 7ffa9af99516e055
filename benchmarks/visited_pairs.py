"""Pairs a tiled local-attention kernel visits against the pairs it needs (a count, not a timing; CPU only).

For a 2-D neighborhood (kernel k, stride 1, no dilation) on an L x L map, every query tile (a box of query rows)
walks the key tiles covering the union of its rows' windows, as the engine's forward and dQ pass do
(``engine._query_dim``: first key of the first row to last key of the last row, per dimension, in whole key tiles).
Visited pairs = query-tile rows x key-tile rows summed over the walk (padding rows included); needed pairs = the
queries' windows; dense = every query against every key, and dense padded to 128-row tiles (flash-attention-style
kernels such as cuDNN's). Their ratios bound what any kernel of that tiling can gain over dense attention at equal
cost per visited pair.

``--map L0,L1,L2 --map-kernel K0,K1,K2`` instead counts the engine's three passes on any 1-3-D map (stride 1)
with the boxes they ship for that shape (``ops._tiles``): the forward and dQ pass walk key tiles per query box, the
dK/dV pass walks query tiles per key box (the queries whose windows reach the box), each in whole tiles. Dividing
a pass's GPU time by its visited pairs compares the passes' cost per pair (HunyuanVideo: ``--map 30,48,80
--map-kernel 18,24,24 --head-dim 128``).

Usage (repo root, CPU): python benchmarks/visited_pairs.py [--side 14] [--kernel 7]
    [--map 30,48,80 --map-kernel 18,24,24 --head-dim 128]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.geometry import interval  # noqa: E402


def visited_pairs(side: int, kernel: int, m: tuple[int, int], n: tuple[int, int]) -> int:
    """Pairs the walk visits for query boxes ``m`` and key boxes ``n`` (rows x columns) on a ``side``^2 map."""
    return _pass_walks((side, side), (kernel, kernel), m, n)[1]


def _pass_walks(lengths: tuple, kernel: tuple, m: tuple, n: tuple) -> tuple[int, int, int]:
    """(needed, query-box walk, key-box walk) pair counts on a map (the count is separable by dimension)."""
    needed = query_walk = key_walk = 1
    for length, k, mm, nn in zip(lengths, kernel, m, n, strict=True):
        windows = [interval(i, length, k, 1, 0, False, False) for i in range(length)]
        needed *= sum(b - a + 1 for a, b in windows)
        q_total = 0
        for t in range(math.ceil(length / mm)):
            first, last = t * mm, min(t * mm + mm, length) - 1
            q_total += mm * ((windows[last][1] - windows[first][0] + nn) // nn) * nn
        query_walk *= q_total
        k_total = 0
        for t in range(math.ceil(length / nn)):
            first, last = t * nn, min(t * nn + nn, length) - 1
            reach = [i for i, (a, b) in enumerate(windows) if a <= last and b >= first]
            k_total += nn * ((reach[-1] - reach[0] + mm) // mm) * mm
        key_walk *= k_total
    return needed, query_walk, key_walk


def engine_passes(lengths: tuple, kernel: tuple, head_dim: int) -> None:
    """Print each pass's boxes and visited / needed pairs with the tiles the engine ships for this shape."""
    import torch

    from visattn.kernels import ops

    rank = len(lengths)
    lengths3, kernel3 = (1,) * (3 - rank) + tuple(lengths), (1,) * (3 - rank) + tuple(kernel)
    pat = ops.make_pattern(rank, False, kernel, (1,) * rank, (1,) * rank, (False,) * rank, (0,) * rank)
    print(f"map {lengths}, kernel {kernel}, head_dim {head_dim}, bf16")
    for name in ("fwd", "dq", "dkv"):
        tiles = ops._tiles(name, pat, lengths3, torch.bfloat16, head_dim)
        needed, query_walk, key_walk = _pass_walks(lengths3, kernel3, tiles.m, tiles.n)
        visited = key_walk if name == "dkv" else query_walk
        print(f"{name:>4s}: query box {tiles.m}, key box {tiles.n}: visited / needed {visited / needed:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--map", default=None, help="comma list: count the engine's passes on this map instead")
    parser.add_argument("--map-kernel", default=None, help="comma list, with --map")
    parser.add_argument("--head-dim", type=int, default=128, help="with --map: picks the shipped tiles")
    args = parser.parse_args(argv)
    if args.map:
        if not args.map_kernel:
            parser.error("--map needs --map-kernel")
        engine_passes(tuple(int(x) for x in args.map.split(",")), tuple(int(x) for x in args.map_kernel.split(",")),
                      args.head_dim)
        return 0
    side, kernel = args.side, args.kernel
    needed = side * side * kernel * kernel
    dense = (side * side) ** 2
    padded = (math.ceil(side * side / 128) * 128) ** 2
    print(f"{side}x{side} map, kernel {kernel}: needed {needed} pairs per (item, head); dense {dense} "
          f"({dense / needed:.2f}x needed); dense in 128-row tiles {padded} ({padded / needed:.2f}x)")
    print(f"{'query box':>10s} {'key box':>8s} {'visited':>8s} {'/needed':>8s} {'/dense':>7s} {'/padded':>8s}")
    boxes = [((4, 16), (2, 16)), ((4, 16), (4, 16)), ((2, 16), (8, 16)), ((1, 16), (8, 16)), ((2, 8), (4, 8)),
             ((4, 8), (2, 16)), ((8, 8), (2, 16)), ((8, 16), (2, 16))]
    for m, n in boxes:
        v = visited_pairs(side, kernel, m, n)
        print(f"{m[0]:>4d}x{m[1]:<5d} {n[0]:>3d}x{n[1]:<4d} {v:8d} {v / needed:8.2f} {v / dense:7.2f} "
              f"{v / padded:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
