"""Relative-position-bias table conversions between Swin/Video-Swin and visattn layouts.

visattn's ``rpb`` is ``[heads, 2w0-1, 2w1-1(, 2w2-1)]`` indexed by the key-minus-query offset plus ``w - 1``
(docs/SEMANTICS.md). Swin (and Video Swin) keep ``[(2w0-1)(2w1-1)(...), heads]``, row-major over the
query-minus-key offset plus ``w - 1``: the same numbers with the heads axis moved first and every offset axis
reversed.

NAT / DiNAT (NATTEN's legacy ``rpb``, the SHI-Labs checkpoints and transformers' ``NatModel``/``DinatModel``) store
``[heads, 2k-1, 2k-1]`` indexed by key-minus-query offset (in dilation-group coordinates) plus ``k - 1``: in NATTEN
0.17's CPU kernel ``pointwise_neighborhood_2d.hpp`` the bias of key ``ki`` of a query is
``rpb[h, get_pb_start(i) + ki]`` with ``get_pb_start(i) + ki == key - query + k - 1``. That is visattn's layout
already, so NAT tables load unchanged and no conversion function is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from visattn.nn import _args


def _window(window_size: int | Sequence[int], rank: int) -> tuple:
    return _args.int_tuple(window_size, rank, "window_size")


def swin_rpb_to_visattn(table: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """Swin's ``[(2w0-1)(2w1-1)(...), heads]`` table -> visattn's ``[heads, 2w0-1, 2w1-1(, ...)]`` (a copy).

    An int ``window_size`` means a square 2-D window; pass a 3-tuple for Video Swin tables.
    """
    rank = len(window_size) if isinstance(window_size, (tuple, list)) else 2
    sizes = tuple(2 * w - 1 for w in _window(window_size, rank))
    if table.dim() != 2 or table.shape[0] != math.prod(sizes):
        raise ValueError(f"table must have shape [{'*'.join(map(str, sizes))}, heads] for window_size "
                         f"{window_size!r}, got {tuple(table.shape)}")
    offsets = tuple(range(1, rank + 1))
    return table.reshape(*sizes, table.shape[1]).permute(rank, *range(rank)).flip(offsets).contiguous()


def visattn_rpb_to_swin(rpb: Tensor, window_size: int | Sequence[int]) -> Tensor:
    """visattn's ``[heads, 2w0-1, 2w1-1(, ...)]`` table -> Swin's ``[(2w0-1)(2w1-1)(...), heads]`` (a copy)."""
    rank = rpb.dim() - 1
    sizes = tuple(2 * w - 1 for w in _window(window_size, rank))
    if rank < 1 or tuple(rpb.shape[1:]) != sizes:
        raise ValueError(f"rpb must have shape [heads, {', '.join(map(str, sizes))}] for window_size "
                         f"{window_size!r}, got {tuple(rpb.shape)}")
    flipped = rpb.flip(tuple(range(1, rank + 1)))
    return flipped.permute(*range(1, rank + 1), 0).reshape(-1, rpb.shape[0]).contiguous()

