"""VisPruner's iterative similarity-based removal (the diverse tokens) as one Triton program per image.

The residual set ``R`` shrinks to ``target`` tokens in steps of ``r = min(per_step, |R| - target, ceil(|R| / 2))``
removals (VisPruner: ``per_step = 8``): ``a`` = the even positions of ``R``, ``b`` = the odd ones; each ``a``
token scores its largest similarity to a ``b`` token; the ``r`` highest-scoring ``a`` tokens go (a stable
descending sort of the scores: ties to the earlier position, a NaN counts as the largest as in ``torch.sort``),
and the surviving ``a`` tokens in that order followed by all ``b`` tokens form the next ``R``. In PyTorch that
is ~6 launches per step and ~64 steps for LLaVA's 576 patches. Here the cosine similarities of the initial
residual tokens come from one batched matmul (cuBLAS) and one program per image runs every step on them: the
scores are gathered maxima of the similarity rows, the sort is a rank by counting (order-preserving integer keys
that also carry the position, so every rank is distinct and the order stable), the survivors are scattered to
their rank; the residual positions ping-pong between two scratch rows in global memory. The eager path reads the
same similarity matrix, so both give identical indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.tokenprune.kernels.select import _ordered_key


def _removal_steps(size: int, target: int, per_step: int) -> int:
    """How many removal steps shrink ``size`` residual tokens to ``target`` (module docstring)."""
    steps = 0
    while (r := min(per_step, size - target, (size + 1) // 2)) > 0:
        steps, size = steps + 1, size - r
    return steps


@triton.jit
def _dedup_kernel(SIM, POS, KEYS, OUT, R, target, n_steps, s_g, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                  PER_STEP: tl.constexpr):
    g = tl.program_id(0)
    sim = SIM + g.to(tl.int64) * s_g
    pos = POS + g.to(tl.int64) * 2 * R
    keys = KEYS + g.to(tl.int64) * R
    ti = tl.arange(0, BLOCK_I)
    tj = tl.arange(0, BLOCK_J)
    for p0 in range(0, R, BLOCK_J):
        tl.store(pos + p0 + tj, p0 + tj, mask=p0 + tj < R)
    tl.debug_barrier()
    size = R
    for step in range(0, n_steps):
        cur = pos + (step % 2) * R
        nxt = pos + ((step + 1) % 2) * R
        r = tl.minimum(tl.minimum(size - target, (size + 1) // 2), PER_STEP)
        n_a = (size + 1) // 2
        n_b = size // 2
        for i0 in range(0, n_a, BLOCK_I):  # score of a[i] = max_j sim[a[i], b[j]] -> order-preserving key
            ii = i0 + ti
            i_ok = ii < n_a
            row = tl.load(cur + 2 * ii, mask=i_ok, other=0).to(tl.int64) * R
            best = tl.zeros((BLOCK_I, BLOCK_J), tl.float32) - float("inf")
            for j0 in range(0, n_b, BLOCK_J):  # element-wise maxima in the loop, one reduction after it
                jj = j0 + tj
                j_ok = jj < n_b
                col = tl.load(cur + 2 * jj + 1, mask=j_ok, other=0)
                s = tl.load(sim + row[:, None] + col[None, :], mask=i_ok[:, None] & j_ok[None, :],
                            other=float("-inf"))
                best = tl.maximum(best, s, propagate_nan=tl.PropagateNan.ALL)
            nan = tl.max((best != best).to(tl.int32), 1)
            top = tl.max(tl.where(best != best, float("-inf"), best), 1)
            top = tl.where(nan > 0, float("nan"), tl.where(top == 0.0, 0.0, top))  # one NaN, one zero
            tl.store(keys + ii, _ordered_key(top, ii), mask=i_ok)
        tl.debug_barrier()
        for i0 in range(0, n_a, BLOCK_I):  # rank = keys above: descending score, ties to the earlier position
            ii = i0 + ti
            i_ok = ii < n_a
            mine = tl.load(keys + ii, mask=i_ok, other=-1)
            above = tl.zeros((BLOCK_I, BLOCK_J), tl.int32)
            for j0 in range(0, n_a, BLOCK_J):
                jj = j0 + tj
                theirs = tl.load(keys + jj, mask=jj < n_a, other=-1)
                above += (theirs[None, :] > mine[:, None]).to(tl.int32)
            rank = tl.sum(above, 1)
            survivor = i_ok & (rank >= r)
            tl.store(nxt + rank - r, tl.load(cur + 2 * ii, mask=survivor, other=0), mask=survivor)
        for j0 in range(0, n_b, BLOCK_J):
            jj = j0 + tj
            j_ok = jj < n_b
            tl.store(nxt + n_a - r + jj, tl.load(cur + 2 * jj + 1, mask=j_ok, other=0), mask=j_ok)
        tl.debug_barrier()  # the next residual and the key slots are free for the next step
        size -= r
    final = pos + (n_steps % 2) * R
    for p0 in range(0, size, BLOCK_J):
        p = p0 + tj
        tl.store(OUT + g.to(tl.int64) * size + p, tl.load(final + p, mask=p < size, other=0).to(tl.int64),
                 mask=p < size)


def dedup_positions(sim: Tensor, target: int, per_step: int = 8, block_i: int = 64, block_j: int = 128,
                    num_warps: int = 8) -> Tensor:
    """Positions (G, min(R, target)) int64 into the initial residual set that survive the removal (module
    docstring), in the final residual order, from the float32 similarity matrices ``sim`` (G, R, R) of the
    initial residual tokens (``sim[g, x, y]`` = similarity of residual tokens ``x`` and ``y``); ``target >= 1``,
    at most ``per_step`` tokens removed per step. ``block_i`` / ``block_j``: the tile of one gathered score block
    (powers of two)."""
    if not isinstance(sim, Tensor) or sim.dim() != 3 or sim.shape[1] != sim.shape[2]:
        raise ValueError(f"sim: expected a (G, R, R) tensor, got {getattr(sim, 'shape', type(sim))}")
    if sim.dtype != torch.float32:
        raise TypeError(f"sim: expected float32, got {sim.dtype}")
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(f"target={target!r}: expected an int >= 1")
    if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
        raise ValueError(f"per_step={per_step!r}: expected an int >= 1")
    for name, value in (("block_i", block_i), ("block_j", block_j)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value!r}: expected a power of two")
    g, size, _ = sim.shape
    steps = _removal_steps(size, target, per_step)
    if g == 0 or steps == 0:
        return torch.arange(size, device=sim.device).expand(g, size)
    sim = sim.contiguous()
    out = torch.empty(g, target, dtype=torch.long, device=sim.device)
    pos = torch.empty(g, 2, size, dtype=torch.int32, device=sim.device)
    keys = torch.empty(g, size, dtype=torch.int64, device=sim.device)
    _dedup_kernel[(g,)](sim, pos, keys, out, size, target, steps, sim.stride(0), BLOCK_I=block_i,
                        BLOCK_J=block_j, PER_STEP=per_step, num_warps=num_warps)
    return out
