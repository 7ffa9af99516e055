"""Bi-level routing attention (BiFormer) in Triton, without BiFormer's key/value gather.

A query tile is (part of) one region; its keys are the tokens of the region's top-k routed regions, addressed
straight in the original ``[B, H, W, heads, D]`` tensors through the routing table (BiFormer copies them into a
``topk``-times larger tensor first). The key iteration is data-dependent (a table, not an interval), which is why
this is its own small kernel family rather than a pattern of the interval engine. Backward is FA2-style and
deterministic: dQ walks the routed regions again; dK/dV walks an inverse table of the query regions routed to
each key region (built with one sort), so no atomics.

Small maps take the *map schedule* instead (``map_schedule_why_not``): at BiFormer-T's 14x14 stage a region is 2x2
tokens, so a region program padded its 4 queries to tl.dot's 16 rows and reloaded 64 routed keys for them (50k
programs per call, 7% of the memory floor). There a program owns BLOCK_M raster-order queries of one (image, head)
and walks every key tile of the map, masking the pairs whose key region is not routed to the query's region (one
bit per region in two int32 words, read from the routing table once per program): dense tiles over at most 256
tokens, like dense attention over the map, with the routing applied as a mask. Its dK/dV pass walks all query
tiles the same way, so it needs no inverse table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.kernels.blocksparse import dkv_tile, dkv_tile_masked, dq_tile, dq_tile_masked, online_step
from visattn.kernels.tiles import dot_precision, padded_head_dim

_LOG2E = 1.4426950408889634
# Launch options per kernel, from benchmarks/tune_small_kernels.py on the H200 at BiFormer-T's stages (bf16):
# 2 warps suit the small routed tiles (fwd 3.7 -> 2.5 ms, dK/dV 11.8 -> 7.8 ms depth-weighted per image batch).
LAUNCH: dict[str, dict[str, int]] = {"fwd": dict(num_warps=2, num_stages=2), "dq": dict(num_warps=4, num_stages=2),
                                     "dkv": dict(num_warps=2, num_stages=2)}


@triton.jit
def _region_token(region, p, SW, RH, RW):
    """Spatial (row, col) of token ``p`` (row-major inside the region) of region ``region`` (row-major grid)."""
    return (region // SW) * RH + p // RW, (region % SW) * RW + p % RW


@triton.jit
def _load_rows(base, y, x, s_y, s_x, s_d, ok, cols, n_cols):
    return tl.load(base + y[:, None] * s_y + x[:, None] * s_x + cols[None, :] * s_d,
                   mask=ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _routed_keys(IDX, idx_base, c0, N_KEYS, PER_REGION, SW, RH, RW, BLOCK_N: tl.constexpr):
    """Columns ``c0 .. c0+BLOCK_N`` of the flattened (routed region, token) key list of one query region."""
    cols = c0 + tl.arange(0, BLOCK_N)
    ok = cols < N_KEYS
    region = tl.load(IDX + idx_base + cols // PER_REGION, mask=ok, other=0)
    ky, kx = _region_token(region, cols % PER_REGION, SW, RH, RW)
    return ky, kx, ok


@triton.jit
def _stat_offsets(b, h, HEADS, HP, W, y, x):
    """Offsets into the float32 [B, heads, Hp, Wp] row statistics (LSE, delta)."""
    return ((b * HEADS + h).to(tl.int64) * HP + y) * W + x


@triton.jit
def _program_tile(TILES, HEADS, PER_REGION, SW, RH, RW, BLOCK: tl.constexpr):
    """This program's (region, batch, head) and the spatial coordinates of its BLOCK tokens of the region."""
    region, tile = tl.program_id(0) // TILES, tl.program_id(0) % TILES
    b, h = tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
    tokens = tile * BLOCK + tl.arange(0, BLOCK)
    y, x = _region_token(region, tokens, SW, RH, RW)
    return region, b, h, y, x, tokens < PER_REGION


@triton.jit
def _forward_start(Q, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_h, qy, qx, row_ok, HEAD_D,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A forward program's head offsets, its query rows and the empty online-softmax state (both schedules)."""
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    qk_head = b.to(tl.int64) * s_b + h * s_h
    v_head = b.to(tl.int64) * v_b + h * v_h
    q = _load_rows(Q + qk_head, qy, qx, s_y, s_x, s_d, row_ok, d, HEAD_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    return d, dv, qk_head, v_head, q, m_i, tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)


@triton.jit
def _store_out(OUT, b, h, o_b, o_y, o_x, o_h, qy, qx, dv, row_ok, HEAD_DV, value):
    """Store a forward program's [rows, head_dim] output tile."""
    out = OUT + b.to(tl.int64) * o_b + h * o_h + qy[:, None] * o_y + qx[:, None] * o_x + dv[None, :]
    tl.store(out, value.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DV))


@triton.jit
def _bra_fwd_kernel(Q, K, V, OUT, LSE, IDX, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                    o_b, o_y, o_x, o_h, idx_b, idx_r,
                    HEADS, HP, W, SW, RH, RW, PER_REGION, N_KEYS, Q_TILES, qk_scale, HEAD_D, HEAD_DV,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One program: a tile of one query region's tokens against every token of its routed regions."""
    region, b, h, qy, qx, row_ok = _program_tile(Q_TILES, HEADS, PER_REGION, SW, RH, RW, BLOCK_M)
    d, dv, qk_head, v_head, q, m_i, l_i, acc = _forward_start(Q, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_h, qy, qx,
                                                              row_ok, HEAD_D, BLOCK_M, BLOCK_D, BLOCK_DV)
    for c0 in range(0, N_KEYS, BLOCK_N):
        ky, kx, col_ok = _routed_keys(IDX, b * idx_b + region * idx_r, c0, N_KEYS, PER_REGION, SW, RH, RW, BLOCK_N)
        kT = tl.trans(_load_rows(K + qk_head, ky, kx, s_y, s_x, s_d, col_ok, d, HEAD_D))
        v = _load_rows(V + v_head, ky, kx, v_y, v_x, v_d, col_ok, dv, HEAD_DV)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every row has >= 1 valid key in the first block: never -inf
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    _store_out(OUT, b, h, o_b, o_y, o_x, o_h, qy, qx, dv, row_ok, HEAD_DV, acc / l_i[:, None])
    tl.store(LSE + _stat_offsets(b, h, HEADS, HP, W, qy, qx), m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bra_dq_kernel(Q, K, V, OUT, DO, DQ, LSE, DELTA, IDX, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                   o_b, o_y, o_x, o_h, g_b, g_y, g_x, g_h, gq_b, gq_y, gq_x, gq_h, idx_b, idx_r,
                   HEADS, HP, W, SW, RH, RW, PER_REGION, N_KEYS, Q_TILES, qk_scale, scale, HEAD_D, HEAD_DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """dQ of one query tile: recompute P from the saved LSE over the routed keys; dS = P * (dP - delta), with
    delta = rowsum(dO * O) computed here and stored for the dK/dV pass."""
    region, b, h, qy, qx, row_ok = _program_tile(Q_TILES, HEADS, PER_REGION, SW, RH, RW, BLOCK_M)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    qk_head = b.to(tl.int64) * s_b + h * s_h
    v_head = b.to(tl.int64) * v_b + h * v_h
    g_head = b.to(tl.int64) * g_b + h * g_h
    q = _load_rows(Q + qk_head, qy, qx, s_y, s_x, s_d, row_ok, d, HEAD_D)
    do = _load_rows(DO + g_head, qy, qx, g_y, g_x, 1, row_ok, dv, HEAD_DV)
    stats = _stat_offsets(b, h, HEADS, HP, W, qy, qx)
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    o = _load_rows(OUT + b.to(tl.int64) * o_b + h * o_h, qy, qx, o_y, o_x, 1, row_ok, dv, HEAD_DV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + stats, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c0 in range(0, N_KEYS, BLOCK_N):
        ky, kx, col_ok = _routed_keys(IDX, b * idx_b + region * idx_r, c0, N_KEYS, PER_REGION, SW, RH, RW, BLOCK_N)
        k = _load_rows(K + qk_head, ky, kx, s_y, s_x, s_d, col_ok, d, HEAD_D)
        v = _load_rows(V + v_head, ky, kx, v_y, v_x, v_d, col_ok, dv, HEAD_DV)
        dq = dq_tile(q, do, k, v, col_ok, row_ok, lse, delta, dq, qk_scale, DOT_PREC)
    out = DQ + b.to(tl.int64) * gq_b + h * gq_h + qy[:, None] * gq_y + qx[:, None] * gq_x + d[None, :]
    tl.store(out, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_D))


@triton.jit
def _dkv_start(K, V, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d, g_b, g_h, ky, kx, col_ok, HEAD_D,
               HEAD_DV, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A dK/dV program's head offsets, its key and value rows and zero accumulators (both schedules)."""
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    qk_head = b.to(tl.int64) * s_b + h * s_h
    g_head = b.to(tl.int64) * g_b + h * g_h
    k = _load_rows(K + qk_head, ky, kx, s_y, s_x, s_d, col_ok, d, HEAD_D)
    v = _load_rows(V + b.to(tl.int64) * v_b + h * v_h, ky, kx, v_y, v_x, v_d, col_ok, dv, HEAD_DV)
    return (d, dv, qk_head, g_head, k, v, tl.zeros([BLOCK_N, BLOCK_D], tl.float32),
            tl.zeros([BLOCK_N, BLOCK_DV], tl.float32))


@triton.jit
def _bra_dkv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, INV, INV_COUNT, s_b, s_y, s_x, s_h, s_d,
                    v_b, v_y, v_x, v_h, v_d, g_b, g_y, g_x, g_h, gk_b, gk_y, gk_x, gk_h, gv_b, gv_y, gv_x, gv_h,
                    HEADS, HP, W, SW, RH, RW, PER_REGION, N_REGIONS, K_TILES, qk_scale, scale, HEAD_D, HEAD_DV,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """dK, dV of one key tile: walk the tokens of the query regions routed to this key region (the inverse
    table), BLOCK_M (source region, token) rows at a time."""
    region, b, h, ky, kx, col_ok = _program_tile(K_TILES, HEADS, PER_REGION, SW, RH, RW, BLOCK_N)
    d, dv, qk_head, g_head, k, v, dk, dvacc = _dkv_start(K, V, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                                                        g_b, g_h, ky, kx, col_ok, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                                                        BLOCK_DV)
    inv_base = (b * N_REGIONS + region).to(tl.int64) * N_REGIONS
    n_rows = tl.load(INV_COUNT + b * N_REGIONS + region) * PER_REGION
    # Rows are the flattened (source region, token) list, as the forward flattens its keys: small regions fill
    # the tile with several source regions instead of padding each one to BLOCK_M.
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q_region = tl.load(INV + inv_base + rows // PER_REGION, mask=row_ok, other=0)
        qy, qx = _region_token(q_region, rows % PER_REGION, SW, RH, RW)
        q = _load_rows(Q + qk_head, qy, qx, s_y, s_x, s_d, row_ok, d, HEAD_D)
        do = _load_rows(DO + g_head, qy, qx, g_y, g_x, 1, row_ok, dv, HEAD_DV)
        stats = _stat_offsets(b, h, HEADS, HP, W, qy, qx)
        lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        dk, dvacc = dkv_tile(k, v, q, do, col_ok, row_ok, lse, delta, dk, dvacc, qk_scale, DOT_PREC)
    tl.store(DK + b.to(tl.int64) * gk_b + h * gk_h + ky[:, None] * gk_y + kx[:, None] * gk_x + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (d[None, :] < HEAD_D))
    tl.store(DV + b.to(tl.int64) * gv_b + h * gv_h + ky[:, None] * gv_y + kx[:, None] * gv_x + dv[None, :],
             dvacc.to(DV.dtype.element_ty), mask=col_ok[:, None] & (dv[None, :] < HEAD_DV))


# ---------------------------------------------------------------------------------------------- map schedule
# Maps of at most MAP_MAX_TOKENS tokens (after padding to the region grid) with at most MAP_MAX_REGIONS regions
# (one bit each in two int32 words) can run the map schedule. 256 tokens: the masked-dense tiles then visit at most
# 4x the pairs of BiFormer-T's 14x14 stage (196 queries x 64 routed keys), against 16 padded rows per 4-token
# region on the region schedule. MAP_MAX_TOKENS = 0 forces the region schedule (tests).
MAP_MAX_TOKENS = 256
MAP_MAX_REGIONS = 64
# Which passes take the map schedule where it applies: "fwd", "bwd" (dQ + dK/dV). The two schedules share the LSE
# layout and the map dQ pass computes delta itself, so a region forward can feed a map backward. Only the backward
# does by default: at BiFormer-T s3 (H100, B128) the region forward took 0.225 ms against the map's 0.260, and
# region forward + map backward 0.706 ms against 0.778 (regions) and 0.759 (map) for forward+backward
# (benchmarks/results/routing-schedules-h100-2026-12-07-run2.json).
MAP_PASSES = ("bwd",)
MAP_LAUNCH: dict[str, dict[str, int]] = {"fwd": dict(num_warps=4, num_stages=2), "dq": dict(num_warps=4, num_stages=2),
                                         "dkv": dict(num_warps=4, num_stages=2)}


def map_schedule_why_not(height: int, width: int, regions: tuple[int, int]) -> str | None:
    """None when a padded ``height x width`` map on a ``regions`` grid takes the map schedule, else why not."""
    tokens, n_regions = height * width, regions[0] * regions[1]
    if tokens > MAP_MAX_TOKENS:
        return f"{tokens} tokens exceed the map schedule's {MAP_MAX_TOKENS}"
    if n_regions > MAP_MAX_REGIONS:
        return f"{n_regions} regions exceed the map schedule's {MAP_MAX_REGIONS} (one bit each)"
    return None


@triton.jit
def _map_tokens(start, N, W, SW, RH, RW, BLOCK: tl.constexpr):
    """``BLOCK`` raster-order tokens from ``start``: row, column, region (row-major grid) and in-map flag."""
    t = start + tl.arange(0, BLOCK)
    y, x = t // W, t % W
    return y, x, (y // RH) * SW + x // RW, t < N


@triton.jit
def _routed_bits(IDX, region, ok, idx_r, TOPK):
    """Per token: two int32 words with bit ``r % 32`` of word ``r // 32`` set when key region ``r`` is routed to
    the token's query region (``IDX``: this image's [regions, topk] table). 32-bit words: sm90 emulates 64-bit
    shifts, and the first version (one int64 per token) ran the map forward slower than the region one."""
    lo = tl.zeros_like(region)
    hi = tl.zeros_like(region)
    one = tl.full(region.shape, 1, tl.int32)
    for j in range(0, TOPK):
        routed = tl.load(IDX + region * idx_r + j, mask=ok, other=0)
        bit = one << (routed & 31)
        lo = lo | tl.where(routed < 32, bit, 0)
        hi = hi | tl.where(routed >= 32, bit, 0)
    return lo, hi


@triton.jit
def _routed(lo, hi, key_region):
    """[queries, keys]: does the query (row; its ``_routed_bits`` words) attend to a key of that region?"""
    word = tl.where(key_region[None, :] < 32, lo[:, None], hi[:, None])
    return ((word >> (key_region[None, :] & 31)) & 1) != 0


@triton.jit
def _routed_t(lo, hi, key_region):
    """``_routed`` transposed: [keys, queries]."""
    word = tl.where(key_region[:, None] < 32, lo[None, :], hi[None, :])
    return ((word >> (key_region[:, None] & 31)) & 1) != 0


@triton.jit
def _bra_map_fwd_kernel(Q, K, V, OUT, LSE, IDX, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                        o_b, o_y, o_x, o_h, idx_b, idx_r,
                        HEADS, N, W, SW, RH, RW, TOPK, qk_scale, HEAD_D, HEAD_DV,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program: BLOCK_M raster-order queries of one (image, head) against every key tile of the map, the
    pairs whose key region is not routed to the query's region masked (online softmax; a tile may mask a row
    entirely, so the running max is guarded)."""
    b, h = tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
    qy, qx, q_region, row_ok = _map_tokens(tl.program_id(0) * BLOCK_M, N, W, SW, RH, RW, BLOCK_M)
    lo, hi = _routed_bits(IDX + b.to(tl.int64) * idx_b, q_region, row_ok, idx_r, TOPK)
    d, dv, qk_head, v_head, q, m_i, l_i, acc = _forward_start(Q, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_h, qy, qx,
                                                              row_ok, HEAD_D, BLOCK_M, BLOCK_D, BLOCK_DV)
    for c0 in range(0, N, BLOCK_N):
        ky, kx, k_region, col_ok = _map_tokens(c0, N, W, SW, RH, RW, BLOCK_N)
        kT = tl.trans(_load_rows(K + qk_head, ky, kx, s_y, s_x, s_d, col_ok, d, HEAD_D))
        v = _load_rows(V + v_head, ky, kx, v_y, v_x, v_d, col_ok, dv, HEAD_DV)
        allowed = _routed(lo, hi, k_region) & col_ok[None, :]
        m_i, l_i, acc = online_step(q, kT, v, allowed, m_i, l_i, acc, qk_scale, DOT_PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past the map only: every query has >= 1 routed key
    _store_out(OUT, b, h, o_b, o_y, o_x, o_h, qy, qx, dv, row_ok, HEAD_DV, acc / l_safe[:, None])
    tl.store(LSE + _stat_offsets(b, h, HEADS, N // W, W, qy, qx), m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bra_map_dq_kernel(Q, K, V, OUT, DO, DQ, LSE, DELTA, IDX, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                       o_b, o_y, o_x, o_h, g_b, g_y, g_x, g_h, gq_b, gq_y, gq_x, gq_h, idx_b, idx_r,
                       HEADS, N, W, SW, RH, RW, TOPK, qk_scale, scale, HEAD_D, HEAD_DV,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of BLOCK_M raster-order queries over every key tile of the map (routing as a mask); delta =
    rowsum(dO * O) is computed here and stored for the dK/dV pass."""
    b, h = tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
    qy, qx, q_region, row_ok = _map_tokens(tl.program_id(0) * BLOCK_M, N, W, SW, RH, RW, BLOCK_M)
    lo, hi = _routed_bits(IDX + b.to(tl.int64) * idx_b, q_region, row_ok, idx_r, TOPK)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    qk_head = b.to(tl.int64) * s_b + h * s_h
    v_head = b.to(tl.int64) * v_b + h * v_h
    q = _load_rows(Q + qk_head, qy, qx, s_y, s_x, s_d, row_ok, d, HEAD_D)
    do = _load_rows(DO + b.to(tl.int64) * g_b + h * g_h, qy, qx, g_y, g_x, 1, row_ok, dv, HEAD_DV)
    o = _load_rows(OUT + b.to(tl.int64) * o_b + h * o_h, qy, qx, o_y, o_x, 1, row_ok, dv, HEAD_DV)
    stats = _stat_offsets(b, h, HEADS, N // W, W, qy, qx)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + stats, delta, mask=row_ok)
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c0 in range(0, N, BLOCK_N):
        ky, kx, k_region, col_ok = _map_tokens(c0, N, W, SW, RH, RW, BLOCK_N)
        k = _load_rows(K + qk_head, ky, kx, s_y, s_x, s_d, col_ok, d, HEAD_D)
        v = _load_rows(V + v_head, ky, kx, v_y, v_x, v_d, col_ok, dv, HEAD_DV)
        allowed = _routed(lo, hi, k_region) & col_ok[None, :] & row_ok[:, None]
        dq = dq_tile_masked(q, do, k, v, allowed, lse, delta, dq, qk_scale, DOT_PREC)
    out = DQ + b.to(tl.int64) * gq_b + h * gq_h + qy[:, None] * gq_y + qx[:, None] * gq_x + d[None, :]
    tl.store(out, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_D))


@triton.jit
def _bra_map_dkv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, IDX, s_b, s_y, s_x, s_h, s_d,
                        v_b, v_y, v_x, v_h, v_d, g_b, g_y, g_x, g_h, gk_b, gk_y, gk_x, gk_h, gv_b, gv_y, gv_x, gv_h,
                        idx_b, idx_r, HEADS, N, W, SW, RH, RW, TOPK, qk_scale, scale, HEAD_D, HEAD_DV,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of BLOCK_N raster-order keys over every query tile of the map (a query's routing bits say whether
    it attends to a key's region), with the dQ pass's delta."""
    b, h = tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
    ky, kx, k_region, col_ok = _map_tokens(tl.program_id(0) * BLOCK_N, N, W, SW, RH, RW, BLOCK_N)
    d, dv, qk_head, g_head, k, v, dk, dvacc = _dkv_start(K, V, b, h, s_b, s_y, s_x, s_h, s_d, v_b, v_y, v_x, v_h, v_d,
                                                        g_b, g_h, ky, kx, col_ok, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D,
                                                        BLOCK_DV)
    idx = IDX + b.to(tl.int64) * idx_b
    for r0 in range(0, N, BLOCK_M):
        qy, qx, q_region, row_ok = _map_tokens(r0, N, W, SW, RH, RW, BLOCK_M)
        lo, hi = _routed_bits(idx, q_region, row_ok, idx_r, TOPK)
        q = _load_rows(Q + qk_head, qy, qx, s_y, s_x, s_d, row_ok, d, HEAD_D)
        do = _load_rows(DO + g_head, qy, qx, g_y, g_x, 1, row_ok, dv, HEAD_DV)
        stats = _stat_offsets(b, h, HEADS, N // W, W, qy, qx)
        lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        allowed_t = _routed_t(lo, hi, k_region) & col_ok[:, None] & row_ok[None, :]
        dk, dvacc = dkv_tile_masked(k, v, q, do, allowed_t, lse, delta, dk, dvacc, qk_scale, DOT_PREC)
    tl.store(DK + b.to(tl.int64) * gk_b + h * gk_h + ky[:, None] * gk_y + kx[:, None] * gk_x + d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (d[None, :] < HEAD_D))
    tl.store(DV + b.to(tl.int64) * gv_b + h * gv_h + ky[:, None] * gv_y + kx[:, None] * gv_x + dv[None, :],
             dvacc.to(DV.dtype.element_ty), mask=col_ok[:, None] & (dv[None, :] < HEAD_DV))


def _map_blocks(tokens: int, head_d: int, head_dv: int, dtype: torch.dtype):
    """Map-schedule tiles: 64 rows (32 in float32), fewer for maps smaller than that (at least tl.dot's 16)."""
    block = min(64 if dtype != torch.float32 else 32, max(16, triton.next_power_of_2(tokens)))
    return block, block, padded_head_dim(head_d), padded_head_dim(head_dv)


# ------------------------------------------------------------------------------------------------ launchers
def _blocks(per_region: int, head_d: int, head_dv: int, dtype: torch.dtype):
    """Tile sizes: a region's tokens (at least 16 rows for tl.dot), at most 64x64; head dims padded to pow2 >= 16."""
    block_m = min(64, max(16, triton.next_power_of_2(per_region)))
    block_n = 64 if dtype != torch.float32 else 32
    return block_m, block_n, padded_head_dim(head_d), padded_head_dim(head_dv)


def _strides5(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)


def _grid_args(q: Tensor, regions: tuple[int, int]):
    batch, hp, wp, heads, _ = q.shape
    rh, rw = hp // regions[0], wp // regions[1]
    return batch, heads, hp, wp, rh, rw, rh * rw


def _forward(q: Tensor, k: Tensor, v: Tensor, routing: Tensor, sh: int, sw: int, scale: float
             ) -> tuple[Tensor, Tensor]:
    """Fused routed attention on region-divisible maps; returns (out, log2-LSE [B, heads, H, W])."""
    batch, heads, hp, wp, rh, rw, per_region = _grid_args(q, (sh, sw))
    topk = routing.shape[-1]
    out = torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, hp, wp, device=q.device, dtype=torch.float32)
    if "fwd" in MAP_PASSES and map_schedule_why_not(hp, wp, (sh, sw)) is None:
        block_m, block_n, block_d, block_dv = _map_blocks(hp * wp, q.shape[-1], v.shape[-1], q.dtype)
        _bra_map_fwd_kernel[(triton.cdiv(hp * wp, block_m), batch * heads)](
            q, k, v, out, lse, routing, *_strides5(q), *_strides5(v), *_strides5(out)[:4],
            routing.stride(0), routing.stride(1), heads, hp * wp, wp, sw, rh, rw, topk, scale * _LOG2E,
            q.shape[-1], v.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PREC=dot_precision(q.dtype), **MAP_LAUNCH["fwd"])
        return out, lse
    block_m, block_n, block_d, block_dv = _blocks(per_region, q.shape[-1], v.shape[-1], q.dtype)
    q_tiles = triton.cdiv(per_region, block_m)
    _bra_fwd_kernel[(sh * sw * q_tiles, batch * heads)](
        q, k, v, out, lse, routing, *_strides5(q), *_strides5(v), *_strides5(out)[:4],
        routing.stride(0), routing.stride(1), heads, hp, wp, sw, rh, rw, per_region, topk * per_region, q_tiles,
        scale * _LOG2E, q.shape[-1], v.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_DV=block_dv, DOT_PREC=dot_precision(q.dtype), **LAUNCH["fwd"])
    return out, lse


@torch.library.custom_op("visattn::bra_fwd", mutates_args=())
def bra_forward(q: Tensor, k: Tensor, v: Tensor, routing: Tensor, sh: int, sw: int, scale: float
                ) -> tuple[Tensor, Tensor]:
    """The forward as a custom op (what ``torch.compile`` traces): see ``_forward``."""
    return _forward(q, k, v, routing, sh, sw, scale)


@bra_forward.register_fake
def _(q, k, v, routing, sh, sw, scale):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[0], q.shape[3], q.shape[1], q.shape[2], dtype=torch.float32)


@triton.jit
def _inverse_routing_kernel(IDX, TABLE, COUNT, N_REGIONS, TOPK, BLOCK: tl.constexpr):
    """One batch item: for each key region, the query regions that route to it, in increasing order (a masked
    prefix sum over the flattened [query region, slot] routing list gives each one its slot)."""
    b = tl.program_id(0).to(tl.int64)
    entry = tl.arange(0, BLOCK)
    ok = entry < N_REGIONS * TOPK
    key_region = tl.load(IDX + b * N_REGIONS * TOPK + entry, mask=ok, other=-1)
    source = (entry // TOPK).to(tl.int32)
    for region in range(0, N_REGIONS):
        hit = key_region == region
        slot = tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(TABLE + (b * N_REGIONS + region) * N_REGIONS + slot, source, mask=hit)
        tl.store(COUNT + b * N_REGIONS + region, tl.sum(hit.to(tl.int32), 0))


_INVERSE_KERNEL_ENTRIES = 4096  # one program holds a batch item's routing list (49 regions x top-49 fit)


def inverse_routing(routing: Tensor, n_regions: int) -> tuple[Tensor, Tensor]:
    """For each key region, the query regions routed to it: ([B, R, R] table, [B, R] counts), int32. Entries past
    a region's count are unspecified (the dK/dV pass never reads them). One kernel launch where a batch item's
    routing list fits one program, else torch ops (a stable sort)."""
    batch, _, topk = routing.shape
    if n_regions * topk <= _INVERSE_KERNEL_ENTRIES:
        table = torch.empty(batch, n_regions, n_regions, dtype=torch.int32, device=routing.device)
        counts = torch.empty(batch, n_regions, dtype=torch.int32, device=routing.device)
        _inverse_routing_kernel[(batch,)](routing.contiguous(), table, counts, n_regions, topk,
                                          BLOCK=triton.next_power_of_2(n_regions * topk))
        return table, counts
    return _inverse_routing_torch(routing, n_regions)


def _inverse_routing_torch(routing: Tensor, n_regions: int) -> tuple[Tensor, Tensor]:
    """``inverse_routing`` with torch ops (zero-padded table)."""
    batch, _, topk = routing.shape
    flat = routing.reshape(batch, -1).long()
    order = torch.argsort(flat, dim=1, stable=True)
    sources = (order // topk).to(torch.int32)  # query region of each sorted entry
    counts = torch.zeros(batch, n_regions, dtype=torch.int64, device=routing.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, dim=1) - counts
    # entry e of the sorted list belongs to key region kr = sorted value, at slot e - starts[kr]
    sorted_regions = torch.gather(flat, 1, order)
    slot = torch.arange(flat.shape[1], device=routing.device)[None, :] - torch.gather(starts, 1, sorted_regions)
    table = torch.zeros(batch, n_regions, n_regions, dtype=torch.int32, device=routing.device)
    table[torch.arange(batch, device=routing.device)[:, None], sorted_regions, slot] = sources
    return table, counts.to(torch.int32)


def _backward_kernels(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      routing: Tensor, sh: int, sw: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """dQ (which also writes delta = rowsum(dO * O)), then dK/dV over the inverse routing table."""
    batch, heads, hp, wp, rh, rw, per_region = _grid_args(q, (sh, sw))
    topk = routing.shape[-1]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O) [B, heads, H, W], written by the dQ pass
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if "bwd" in MAP_PASSES and map_schedule_why_not(hp, wp, (sh, sw)) is None:
        block_m, block_n, block_d, block_dv = _map_blocks(hp * wp, q.shape[-1], v.shape[-1], q.dtype)
        common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                      DOT_PREC=dot_precision(q.dtype))
        tokens = hp * wp
        _bra_map_dq_kernel[(triton.cdiv(tokens, block_m), batch * heads)](
            q, k, v, out, grad_out, dq, lse, delta, routing, *_strides5(q), *_strides5(v), *_strides5(out)[:4],
            *_strides5(grad_out)[:4], *_strides5(dq)[:4], routing.stride(0), routing.stride(1), heads, tokens, wp,
            sw, rh, rw, topk, scale * _LOG2E, scale, q.shape[-1], v.shape[-1], **common, **MAP_LAUNCH["dq"])
        _bra_map_dkv_kernel[(triton.cdiv(tokens, block_n), batch * heads)](
            q, k, v, grad_out, dk, dv, lse, delta, routing, *_strides5(q), *_strides5(v),
            *_strides5(grad_out)[:4], *_strides5(dk)[:4], *_strides5(dv)[:4], routing.stride(0), routing.stride(1),
            heads, tokens, wp, sw, rh, rw, topk, scale * _LOG2E, scale, q.shape[-1], v.shape[-1], **common,
            **MAP_LAUNCH["dkv"])
        return dq, dk, dv
    block_m, block_n, block_d, block_dv = _blocks(per_region, q.shape[-1], v.shape[-1], q.dtype)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  DOT_PREC=dot_precision(q.dtype))
    q_tiles = triton.cdiv(per_region, block_m)
    _bra_dq_kernel[(sh * sw * q_tiles, batch * heads)](
        q, k, v, out, grad_out, dq, lse, delta, routing, *_strides5(q), *_strides5(v), *_strides5(out)[:4],
        *_strides5(grad_out)[:4], *_strides5(dq)[:4], routing.stride(0), routing.stride(1), heads, hp, wp, sw, rh,
        rw, per_region, topk * per_region, q_tiles, scale * _LOG2E, scale, q.shape[-1], v.shape[-1], **common,
        **LAUNCH["dq"])
    table, counts = inverse_routing(routing, sh * sw)
    # A dK/dV program owns a region-sized key tile and walks routed (source region, token) rows: the forward's
    # two tiles, swapped.
    common.update(BLOCK_M=block_n, BLOCK_N=block_m)
    _bra_dkv_kernel[(sh * sw * q_tiles, batch * heads)](
        q, k, v, grad_out, dk, dv, lse, delta, table, counts, *_strides5(q), *_strides5(v),
        *_strides5(grad_out)[:4], *_strides5(dk)[:4], *_strides5(dv)[:4], heads, hp, wp, sw, rh, rw, per_region,
        sh * sw, q_tiles, scale * _LOG2E, scale, q.shape[-1], v.shape[-1], **common, **LAUNCH["dkv"])
    return dq, dk, dv


@torch.library.custom_op("visattn::bra_bwd", mutates_args=())
def bra_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, routing: Tensor,
                 sh: int, sw: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward as a custom op: see ``_backward_kernels``."""
    return _backward_kernels(grad_out, q, k, v, out, lse, routing, sh, sw, scale)


@bra_backward.register_fake
def _(grad_out, q, k, v, out, lse, routing, sh, sw, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, routing, sh, sw, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], routing)
    ctx.grid, ctx.scale = (sh, sw), scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, routing = ctx.saved_tensors
    dq, dk, dv = bra_backward(grad_out, q, k, v, out, lse, routing, *ctx.grid, ctx.scale)
    return dq, dk, dv, None, None, None, None


bra_forward.register_autograd(_backward, setup_context=_setup_context)


class _RoutedAttention(torch.autograd.Function):
    """The custom op's forward/backward for eager mode, without ``torch.library`` dispatch (see
    ops._LocalAttention); returns the output only."""

    @staticmethod
    def forward(ctx, q, k, v, routing, sh: int, sw: int, scale: float):
        out, lse = _forward(q, k, v, routing, sh, sw, scale)
        ctx.save_for_backward(q, k, v, out, lse, routing)
        ctx.grid, ctx.scale = (sh, sw), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, routing = ctx.saved_tensors
        dq, dk, dv = _backward_kernels(grad_out, q, k, v, out, lse, routing, *ctx.grid, ctx.scale)
        return dq, dk, dv, None, None, None, None


def bilevel_routing(q: Tensor, k: Tensor, v: Tensor, regions: tuple[int, int], topk: int, scale: float,
                    return_routing: bool = False):
    """Backend entry: pad to the region grid, route exactly as the reference does, run the fused kernel, crop."""
    from visattn.geometry import pad_to_regions, route_regions

    height, width = q.shape[1:3]
    if height % regions[0] or width % regions[1]:
        q, k, v = (pad_to_regions(t, regions) for t in (q, k, v))
    routing = route_regions(q, k, regions, topk)
    table = routing.to(torch.int32).contiguous()
    if torch.compiler.is_compiling():
        out = bra_forward(q, k, v, table, regions[0], regions[1], scale)[0]
    else:
        out = _RoutedAttention.apply(q, k, v, table, regions[0], regions[1], scale)
    out = out[:, :height, :width]
    out = out if out.is_contiguous() else out.contiguous()
    return (out, routing) if return_routing else out
