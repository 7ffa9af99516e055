"""Greedy max–min diversity selection (DivPrune) as one Triton program per image.

The greedy loop is inherently sequential (each pick depends on the last), so in PyTorch it costs ~4 launches per
pick — 250+ launches for 64 tokens, a visible share of a pruned prefill. Here one program keeps the running
"distance to the closest pick" vector in registers and streams one distance row per pick: a single launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _maxmin_kernel(DIST, FIRST, PICKED, n, k, s_g, s_r, BLOCK: tl.constexpr):
    g = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    base = DIST + g.to(tl.int64) * s_g
    pick = tl.load(FIRST + g)
    tl.store(PICKED + g * k, pick)
    closest = tl.load(base + pick.to(tl.int64) * s_r + cols, mask=ok, other=float("-inf"))
    for i in range(1, k):
        pick = tl.argmax(closest, 0, tie_break_left=True)  # torch.argmax also returns the first maximum
        tl.store(PICKED + g * k + i, pick)
        row = tl.load(base + pick.to(tl.int64) * s_r + cols, mask=ok, other=float("-inf"))
        closest = tl.minimum(closest, row)


def maxmin_picks(dist: Tensor, first: Tensor, k: int) -> Tensor:
    """Greedy picks [G, k] (in pick order) from distances [G, N, N] (float32) and first picks [G]."""
    g, n, _ = dist.shape
    picked = torch.empty(g, k, dtype=torch.int32, device=dist.device)
    dist = dist if dist.stride(-1) == 1 else dist.contiguous()
    _maxmin_kernel[(g,)](dist, first.to(torch.int32).contiguous(), picked, n, k, dist.stride(0), dist.stride(1),
                         BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return picked.long()
