"""Pairs a tiled local-attention kernel visits against the pairs it needs (a count, not a timing; CPU only).

For a 2-D neighborhood (kernel k, stride 1, no dilation) on an L x L map, every query tile (a box of query rows)
walks the key tiles covering the union of its rows' windows, as the engine's forward and dQ pass do
(``engine._query_dim``: first key of the first row to last key of the last row, per dimension, in whole key tiles).
Visited pairs = query-tile rows x key-tile rows summed over the walk (padding rows included); needed pairs = the
queries' windows; dense = every query against every key, and dense padded to 128-row tiles (flash-attention-style
kernels such as cuDNN's). Their ratios bound what any kernel of that tiling can gain over dense attention at equal
cost per visited pair.

Usage (repo root, CPU): python benchmarks/visited_pairs.py [--side 14] [--kernel 7]
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
    total = 0
    for t0 in range(math.ceil(side / m[0])):
        for t1 in range(math.ceil(side / m[1])):
            tiles = 1
            for t, mm, nn in ((t0, m[0], n[0]), (t1, m[1], n[1])):
                first, last = t * mm, min(t * mm + mm, side) - 1
                ka = interval(first, side, kernel, 1, 0, False, False)[0]
                kb = interval(last, side, kernel, 1, 0, False, False)[1]
                tiles *= (kb - ka + nn) // nn
            total += m[0] * m[1] * tiles * n[0] * n[1]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--kernel", type=int, default=7)
    args = parser.parse_args(argv)
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
