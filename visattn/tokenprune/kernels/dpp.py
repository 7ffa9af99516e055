"""Greedy MAP inference of a DPP (CDPruner) as one Triton program per image.

The algorithm is the fast incremental-Cholesky greedy of Chen et al. (NeurIPS 2018): every candidate ``j`` carries
``d2[j]`` (its squared Cholesky pivot, ``det L[S+j] / det L[S]``), starting at ``L[j, j]``; a step picks
``j* = argmax d2``, computes the new Cholesky row ``e = (L[j*] - sum_t c[t, j*] c[t]) / sqrt(d2[j*])``, appends it
to ``c`` and lowers ``d2 -= e*e``; the pick's ``d2`` becomes ``-inf``. Each pick depends on the last, so the
PyTorch loop costs ~8 small launches per pick (500+ for 64 tokens, host-bound). Here one program per image runs all
``k`` steps: ``d2`` and the ``k x N`` rows ``c`` live in global scratch (L1/L2-resident), ``L`` rows are read from
the kernel matrix, a per-lane running argmax is kept across column chunks and reduced once per step, one launch in all.

The arithmetic is the PyTorch loop's, op by op in float32: correctly rounded square root and division, no fused
multiply-adds (the launch disables FP contraction), the argmax of ``torch.argmax`` (first index on ties, a NaN
counts as the largest). The one difference is the order in which the ``sum_t`` dot products are accumulated
(here a fixed tiled sum, in PyTorch a batched matmul), so the two agree bit for bit on the first two picks' rows
and up to float32 rounding after; the kept set can differ only where two candidates' ``d2`` tie within that
rounding (duplicate tokens tie exactly in both and go to the first index in both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _first_max(x, at):
    """``(value, index)`` of the largest entry of ``x`` whose indices are ``at``, as ``torch.argmax``: the first
    NaN if any, else the first maximum."""
    nan_at = tl.min(tl.where(x != x, at, 2147483647), 0)
    clean = tl.where(x != x, float("-inf"), x)
    top = tl.max(clean, 0)
    first = tl.min(tl.where(clean == top, at, 2147483647), 0)
    has_nan = nan_at < 2147483647
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, nan_at, first)


@triton.jit
def _lane_max(best, best_at, value, cols):
    """Per-lane running argmax over column chunks in ascending order: a later chunk's entry wins its lane only by
    being strictly larger (or NaN where the lane's is not). Reductions stay out of the loop."""
    take = (best == best) & ((value != value) | (value > best))
    return tl.where(take, value, best), tl.where(take, cols, best_at)


@triton.jit
def _dpp_kernel(L, D2, C, PICKED, n, k, s_g, s_r, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                STAGES: tl.constexpr):
    g = tl.program_id(0)
    base = L + g.to(tl.int64) * s_g
    d2_base = D2 + g.to(tl.int64) * n
    c_base = C + g.to(tl.int64) * k * n
    offs = tl.arange(0, BLOCK_N)
    ts = tl.arange(0, BLOCK_T)
    lane = tl.zeros((BLOCK_N,), tl.float32) - float("inf")
    lane_at = offs
    for n0 in range(0, n, BLOCK_N):  # d2 = diag(L)
        cols = n0 + offs
        ok = cols < n
        diag = tl.load(base + cols.to(tl.int64) * (s_r + 1), mask=ok, other=float("-inf"))
        tl.store(d2_base + cols, diag, mask=ok)
        lane, lane_at = _lane_max(lane, lane_at, diag, cols)
    best, j = _first_max(lane, lane_at)
    tl.debug_barrier()
    for i in range(0, k):
        tl.store(PICKED + g * k + i, j.to(tl.int64))
        root = tl.sqrt_rn(best)  # best == d2[j]
        row = base + j.to(tl.int64) * s_r
        lane = tl.zeros((BLOCK_N,), tl.float32) - float("inf")
        lane_at = offs
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + offs
            ok = cols < n
            acc = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
            for t0 in tl.range(0, i, BLOCK_T, num_stages=STAGES):  # sum_t c[t, j] c[t, cols], earlier picks
                t = t0 + ts
                t_ok = t < i
                c_j = tl.load(c_base + t * n + j, mask=t_ok, other=0.0)
                c_t = tl.load(c_base + t[:, None] * n + cols[None, :], mask=t_ok[:, None] & ok[None, :], other=0.0)
                acc += c_j[:, None] * c_t
            e = tl.div_rn(tl.load(row + cols, mask=ok, other=0.0) - tl.sum(acc, 0), root)
            tl.store(c_base + i * n + cols, e, mask=ok)
            d2 = tl.load(d2_base + cols, mask=ok, other=float("-inf"))
            d2 = d2 - e * e
            d2 = tl.where(ok & (cols != j), d2, float("-inf"))
            tl.store(d2_base + cols, d2, mask=ok)
            lane, lane_at = _lane_max(lane, lane_at, d2, cols)
        best, j = _first_max(lane, lane_at)
        tl.debug_barrier()  # this step's c row and d2 are visible to every thread of the next step


def dpp_picks(kernel: Tensor, k: int, block_n: int | None = None, block_t: int | None = None,
              num_warps: int | None = None, num_stages: int = 1) -> Tensor:
    """Greedy DPP MAP picks (G, k) int64, in pick order, of the float32 kernels ``kernel`` (G, N, N) (symmetric
    PSD); ``k <= N``. ``block_n`` / ``block_t``: the column chunk and the earlier-pick tile of one dot step
    (powers of two; default: up to 1024 columns, an 8192-entry tile), ``num_warps`` (default 8 from 512 columns,
    else 4); ``num_stages`` > 1 software-pipelines the loads of the earlier picks' rows (1: a plain loop)."""
    if not isinstance(kernel, Tensor) or kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel: expected a (G, N, N) tensor, got {getattr(kernel, 'shape', type(kernel))}")
    if kernel.dtype != torch.float32:
        raise TypeError(f"kernel: expected float32, got {kernel.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= kernel.shape[1]:
        raise ValueError(f"k={k!r}: expected an int in [0, {kernel.shape[1]}]")
    if block_n is None:
        block_n = min(1024, triton.next_power_of_2(max(kernel.shape[1], 1)))
    if block_t is None:
        block_t = max(1, min(32, 8192 // block_n))
    for name, value in (("block_n", block_n), ("block_t", block_t)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value!r}: expected a power of two")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r}: expected an int >= 1")
    g, n, _ = kernel.shape
    picked = torch.empty(g, k, dtype=torch.long, device=kernel.device)
    if g == 0 or k == 0:
        return picked
    kernel = kernel if kernel.stride(-1) == 1 else kernel.contiguous()
    d2 = torch.empty(g, n, dtype=torch.float32, device=kernel.device)
    c = torch.empty(g, k, n, dtype=torch.float32, device=kernel.device)
    block_n = min(block_n, triton.next_power_of_2(n))
    _dpp_kernel[(g,)](kernel, d2, c, picked, n, k, kernel.stride(0), kernel.stride(1), BLOCK_N=block_n,
                      BLOCK_T=block_t, STAGES=num_stages, num_warps=num_warps or (8 if block_n >= 512 else 4),
                      enable_fp_fusion=False)
    return picked
