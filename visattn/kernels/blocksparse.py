"""Static (or routed) block-sparse attention in Triton: one kernel family for Radial Attention's mask and, with a
per-(batch, head) table, VMoBA-style routed blocks.

Problem. Tokens are flattened, ``q, k, v: [B, N, heads, D]`` (any strides). Queries are cut into blocks of
``Q_BLOCK`` tokens, keys into blocks of ``K_BLOCK``. Query block ``i`` attends the key blocks listed in row ``i``
of a CSR table (``row_ptr [G, NQB + 1]``, ``col_idx [G, nnz]``, int32; ``G`` = 1 for a static mask shared by every
(batch, head), read with group stride 0, or ``B * heads`` for routed tables), plus optional extra tokens
``extra_k / extra_v: [B, n, heads, D]`` (text) that every query attends, all in ONE softmax.

Algorithm (FlashAttention-2 on a block list):

* forward: a program owns ``BLOCK_M`` rows of one query block (a query block of more than ``BLOCK_M`` rows has
  several programs) and one (batch, head). It walks its CSR row; each listed key block is read in ``BLOCK_N``-row
  tiles (columns past the block or past ``N`` masked), then the extra tokens in ``BLOCK_N`` tiles. Online softmax in
  the log2 domain; the row LSE (log2) is saved ``[B, heads, N]``. A row with no key gets a zero output and LSE
  ``-inf`` (the running max is made safe so no ``inf - inf`` appears).
* dQ pass: the same walk, recomputing ``P = exp2(S - LSE)``; it computes ``delta = rowsum(dO * O)`` itself and
  stores it for the next pass; ``dS = P * (dP - delta)``, ``dQ = scale * dS K``.
* dK/dV pass: a program owns ``BLOCK_N`` rows of one key block and walks the query blocks that list it, from the
  transposed CSR (``col_ptr [G, NKB + 1]``, ``row_idx``), ``BLOCK_M`` query rows at a time:
  ``dV += Pᵀ dO``, ``dK += scale * dSᵀ Q``. Every (query, key) pair is visited by exactly one program in each
  pass: no atomics, deterministic.
* extra-token dK/dV: a program owns ``BLOCK_N`` extra tokens and walks every query row (each attends them all).

Tile sizes are constexpr: ``BLOCK_M``/``BLOCK_N`` the block size rounded to a power of two in ``[16, 64]`` (the
forward takes 128 x 32 for 16-bit blocks of >= 128 tokens, :func:`_forward_blocks`), head dims padded to powers of
two (>= 16) with masked columns; a key block that fills its tiles inside the sequence skips the score mask.
Tables come from :func:`block_csr` (torch ops without a host sync: it works on a device mask built per call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.kernels.tiles import dot_precision, padded_head_dim

_LOG2E = 1.4426950408889634
LAUNCH: dict[str, dict[str, int]] = {"fwd": dict(num_warps=4, num_stages=3), "dq": dict(num_warps=4, num_stages=2),
                                     "dkv": dict(num_warps=4, num_stages=2)}


@triton.jit
def _rows(base, idx, s_n, s_d, ok, cols, n_cols):
    """``[len(idx), n_cols]`` rows ``idx`` of one (batch, head) slice, zero where masked."""
    return tl.load(base + idx[:, None].to(tl.int64) * s_n + cols[None, :] * s_d,
                   mask=ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _query_tile(Q_TILES, HEADS, Q_BLOCK, N, BLOCK_M: tl.constexpr):
    """This program's query block, (batch * heads) index, batch, head, rows and their validity."""
    qb, tile = tl.program_id(0) // Q_TILES, tl.program_id(0) % Q_TILES
    bh = tl.program_id(1)
    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qb * Q_BLOCK + local
    return qb, bh, bh // HEADS, bh % HEADS, rows, (local < Q_BLOCK) & (rows < N)


@triton.jit
def _key_tile(kb, c0, K_BLOCK, N, BLOCK_N: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK_N`` of key block ``kb`` and their validity."""
    offs = c0 + tl.arange(0, BLOCK_N)
    cols = kb * K_BLOCK + offs
    return cols, (offs < K_BLOCK) & (cols < N)


@triton.jit
def _row_selection(SEL, bh, rows, kb, row_ok, N, NKB, HAS_SEL: tl.constexpr):
    """Which rows of the tile take key block ``kb``: all (a static or block-level table) or, with a per-row
    selection ``SEL [groups, N, NKB]`` (int8; VMoBA's per-query chunk choice), the rows that selected it."""
    if HAS_SEL:
        sel = tl.load(SEL + (bh.to(tl.int64) * N + rows) * NKB + kb, mask=row_ok, other=0)
        return row_ok & (sel != 0)
    return row_ok


@triton.jit
def online_step(q, kT, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax (log2 domain) over the [rows, keys] pairs ``ok``; a running max of -inf
    is used as 0, so empty rows stay at l = 0 without NaNs."""
    s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def online_step_full(q, kT, v, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """:func:`online_step` for a tile whose every pair is attended: the new running max is finite."""
    s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _bs_fwd_kernel(Q, K, V, EK, EV, OUT, LSE, ROW_PTR, COL_IDX, SEL,
                   q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d,
                   ek_b, ek_n, ek_h, ek_d, ev_b, ev_n, ev_h, ev_d, o_b, o_n, o_h, ptr_g, idx_g,
                   HEADS, N, N_EXTRA, Q_BLOCK, K_BLOCK, Q_TILES, NKB, qk_scale, HEAD_D, HEAD_DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, HAS_SEL: tl.constexpr, DOT_PREC: tl.constexpr,
                   EVEN_K: tl.constexpr = False):
    qb, bh, b, h, rows, row_ok = _query_tile(Q_TILES, HEADS, Q_BLOCK, N, BLOCK_M)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _rows(Q + b.to(tl.int64) * q_b + h * q_h, rows, q_n, q_d, row_ok, d, HEAD_D)
    k_head = K + b.to(tl.int64) * k_b + h * k_h
    v_head = V + b.to(tl.int64) * v_b + h * v_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ptr = ROW_PTR + bh.to(tl.int64) * ptr_g + qb
    start, end = tl.load(ptr), tl.load(ptr + 1)
    for e in range(start, end):
        kb = tl.load(COL_IDX + bh.to(tl.int64) * idx_g + e)
        row_sel = _row_selection(SEL, bh, rows, kb, row_ok, N, NKB, HAS_SEL)
        # A key block inside the sequence whose tiles it fills exactly needs no score mask (every pair is listed):
        # the unmasked update skips two selects per score, ~10% of the forward at Radial's 128-token blocks. (One
        # flat loop over (block, tile) pairs, to pipeline across blocks, measured slower on an H100: 98.8 vs 93.3 ms
        # at Wan 720p, video-sparse-ab-h100-2026-12-06-*.json.)
        full = EVEN_K and (not HAS_SEL) and ((kb + 1) * K_BLOCK <= N)
        for c0 in range(0, K_BLOCK, BLOCK_N):
            cols, col_ok = _key_tile(kb, c0, K_BLOCK, N, BLOCK_N)
            kT = tl.trans(_rows(k_head, cols, k_n, k_d, col_ok, d, HEAD_D))
            v = _rows(v_head, cols, v_n, v_d, col_ok, dv, HEAD_DV)
            if full:
                m_i, l_i, acc = online_step_full(q, kT, v, m_i, l_i, acc, qk_scale, DOT_PREC)
            else:
                m_i, l_i, acc = online_step(q, kT, v, row_sel[:, None] & col_ok[None, :], m_i, l_i, acc, qk_scale,
                                             DOT_PREC)
    if HAS_EXTRA:
        ek_head = EK + b.to(tl.int64) * ek_b + h * ek_h
        ev_head = EV + b.to(tl.int64) * ev_b + h * ev_h
        for c0 in range(0, N_EXTRA, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N_EXTRA
            kT = tl.trans(_rows(ek_head, cols, ek_n, ek_d, col_ok, d, HEAD_D))
            v = _rows(ev_head, cols, ev_n, ev_d, col_ok, dv, HEAD_DV)
            m_i, l_i, acc = online_step(q, kT, v, row_ok[:, None] & col_ok[None, :], m_i, l_i, acc, qk_scale,
                                         DOT_PREC)
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptr = OUT + b.to(tl.int64) * o_b + h * o_h + rows[:, None].to(tl.int64) * o_n + dv[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < HEAD_DV))
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit
def dq_tile(q, do, k, v, col_ok, row_ok, lse, delta, dq, qk_scale, DOT_PREC: tl.constexpr):
    """FA2's dQ update for one key tile, P recomputed from the log2 LSE (shared with ``routing.py``)."""
    return dq_tile_masked(q, do, k, v, row_ok[:, None] & col_ok[None, :], lse, delta, dq, qk_scale, DOT_PREC)


@triton.jit
def dq_tile_masked(q, do, k, v, allowed, lse, delta, dq, qk_scale, DOT_PREC: tl.constexpr):
    """``dq_tile`` with a [queries, keys] mask of the pairs that attend."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)


@triton.jit
def _bs_dq_kernel(Q, K, V, EK, EV, OUT, DO, DQ, LSE, DELTA, ROW_PTR, COL_IDX, SEL,
                  q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d,
                  ek_b, ek_n, ek_h, ek_d, ev_b, ev_n, ev_h, ev_d, o_b, o_n, o_h, g_b, g_n, g_h,
                  dq_b, dq_n, dq_h, ptr_g, idx_g,
                  HEADS, N, N_EXTRA, Q_BLOCK, K_BLOCK, Q_TILES, NKB, qk_scale, scale, HEAD_D, HEAD_DV,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_EXTRA: tl.constexpr, HAS_SEL: tl.constexpr, DOT_PREC: tl.constexpr):
    qb, bh, b, h, rows, row_ok = _query_tile(Q_TILES, HEADS, Q_BLOCK, N, BLOCK_M)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _rows(Q + b.to(tl.int64) * q_b + h * q_h, rows, q_n, q_d, row_ok, d, HEAD_D)
    do = _rows(DO + b.to(tl.int64) * g_b + h * g_h, rows, g_n, 1, row_ok, dv, HEAD_DV)
    o = _rows(OUT + b.to(tl.int64) * o_b + h * o_h, rows, o_n, 1, row_ok, dv, HEAD_DV)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stats = bh.to(tl.int64) * N + rows
    tl.store(DELTA + stats, delta, mask=row_ok)
    lse = tl.load(LSE + stats, mask=row_ok, other=0.0)
    k_head = K + b.to(tl.int64) * k_b + h * k_h
    v_head = V + b.to(tl.int64) * v_b + h * v_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ptr = ROW_PTR + bh.to(tl.int64) * ptr_g + qb
    start, end = tl.load(ptr), tl.load(ptr + 1)
    for e in range(start, end):
        kb = tl.load(COL_IDX + bh.to(tl.int64) * idx_g + e)
        row_sel = _row_selection(SEL, bh, rows, kb, row_ok, N, NKB, HAS_SEL)
        for c0 in range(0, K_BLOCK, BLOCK_N):
            cols, col_ok = _key_tile(kb, c0, K_BLOCK, N, BLOCK_N)
            k = _rows(k_head, cols, k_n, k_d, col_ok, d, HEAD_D)
            v = _rows(v_head, cols, v_n, v_d, col_ok, dv, HEAD_DV)
            dq = dq_tile(q, do, k, v, col_ok, row_sel, lse, delta, dq, qk_scale, DOT_PREC)
    if HAS_EXTRA:
        ek_head = EK + b.to(tl.int64) * ek_b + h * ek_h
        ev_head = EV + b.to(tl.int64) * ev_b + h * ev_h
        for c0 in range(0, N_EXTRA, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N_EXTRA
            k = _rows(ek_head, cols, ek_n, ek_d, col_ok, d, HEAD_D)
            v = _rows(ev_head, cols, ev_n, ev_d, col_ok, dv, HEAD_DV)
            dq = dq_tile(q, do, k, v, col_ok, row_ok, lse, delta, dq, qk_scale, DOT_PREC)
    dq_ptr = DQ + b.to(tl.int64) * dq_b + h * dq_h + rows[:, None].to(tl.int64) * dq_n + d[None, :]
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_D))


@triton.jit
def dkv_tile(k, v, q, do, col_ok, row_ok, lse, delta, dk, dvacc, qk_scale, DOT_PREC: tl.constexpr):
    """FA2's dK / dV update of a key tile by one query tile (shared with ``routing.py``)."""
    return dkv_tile_masked(k, v, q, do, col_ok[:, None] & row_ok[None, :], lse, delta, dk, dvacc, qk_scale,
                           DOT_PREC)


@triton.jit
def dkv_tile_masked(k, v, q, do, allowed_t, lse, delta, dk, dvacc, qk_scale, DOT_PREC: tl.constexpr):
    """``dkv_tile`` with a [keys, queries] mask of the pairs that attend."""
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [keys, queries]
    pT = tl.where(allowed_t, tl.math.exp2(sT - lse[None, :]), 0.0)
    dvacc += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dvacc


@triton.jit
def _bs_dkv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, COL_PTR, ROW_IDX, SEL,
                   q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d, g_b, g_n, g_h,
                   dk_b, dk_n, dk_h, dv_b, dv_n, dv_h, ptr_g, idx_g,
                   HEADS, N, N_KEYS, Q_BLOCK, K_BLOCK, K_TILES, NKB, ALL_QUERIES: tl.constexpr, qk_scale, scale,
                   HEAD_D, HEAD_DV,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HAS_SEL: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of BLOCK_N keys of one key block over the query blocks listing it (transposed CSR). With
    ALL_QUERIES (the extra tokens: K/V are the extra tensors, N_KEYS their count) every query row is walked."""
    kb, tile = tl.program_id(0) // K_TILES, tl.program_id(0) % K_TILES
    bh = tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    local = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    keys = kb * K_BLOCK + local
    col_ok = (local < K_BLOCK) & (keys < N_KEYS)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k = _rows(K + b.to(tl.int64) * k_b + h * k_h, keys, k_n, k_d, col_ok, d, HEAD_D)
    v = _rows(V + b.to(tl.int64) * v_b + h * v_h, keys, v_n, v_d, col_ok, dv, HEAD_DV)
    q_head = Q + b.to(tl.int64) * q_b + h * q_h
    do_head = DO + b.to(tl.int64) * g_b + h * g_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if ALL_QUERIES:
        for r0 in range(0, N, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < N
            q = _rows(q_head, rows, q_n, q_d, row_ok, d, HEAD_D)
            do = _rows(do_head, rows, g_n, 1, row_ok, dv, HEAD_DV)
            lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
            dk, dvacc = dkv_tile(k, v, q, do, col_ok, row_ok, lse, delta, dk, dvacc, qk_scale, DOT_PREC)
    else:
        ptr = COL_PTR + bh.to(tl.int64) * ptr_g + kb
        start, end = tl.load(ptr), tl.load(ptr + 1)
        for e in range(start, end):
            qb = tl.load(ROW_IDX + bh.to(tl.int64) * idx_g + e)
            for r0 in range(0, Q_BLOCK, BLOCK_M):
                offs = r0 + tl.arange(0, BLOCK_M)
                rows = qb * Q_BLOCK + offs
                row_ok = (offs < Q_BLOCK) & (rows < N)
                row_sel = _row_selection(SEL, bh, rows, kb, row_ok, N, NKB, HAS_SEL)
                q = _rows(q_head, rows, q_n, q_d, row_sel, d, HEAD_D)
                do = _rows(do_head, rows, g_n, 1, row_sel, dv, HEAD_DV)
                lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_sel, other=0.0)
                delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_sel, other=0.0)
                dk, dvacc = dkv_tile(k, v, q, do, col_ok, row_sel, lse, delta, dk, dvacc, qk_scale, DOT_PREC)
    out_rows = keys[:, None].to(tl.int64)
    tl.store(DK + b.to(tl.int64) * dk_b + h * dk_h + out_rows * dk_n + d[None, :], (dk * scale).to(
        DK.dtype.element_ty), mask=col_ok[:, None] & (d[None, :] < HEAD_D))
    tl.store(DV + b.to(tl.int64) * dv_b + h * dv_h + out_rows * dv_n + dv[None, :], dvacc.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & (dv[None, :] < HEAD_DV))


# ------------------------------------------------------------------------------------------------ tables
def block_csr(mask: Tensor) -> tuple[Tensor, Tensor]:
    """CSR of a block mask ``[R, C]`` or ``[G, R, C]`` (bool): ``(ptr [G, R + 1], idx [G, R * C])`` int32, row
    ``r``'s column blocks in increasing order at ``idx[g, ptr[g, r]:ptr[g, r + 1]]`` (entries past the group's
    count are 0 and never read). Torch ops only, no host sync, so a routed mask built on the device per call
    (VMoBA) gets its table without leaving the device. The transposed CSR is ``block_csr(mask.transpose(-1, -2))``.
    """
    mask = mask if mask.dim() == 3 else mask[None]
    groups, rows, cols = mask.shape
    flat = mask.reshape(groups, rows * cols)
    counts = mask.sum(dim=-1, dtype=torch.int32)
    ptr = torch.zeros(groups, rows + 1, dtype=torch.int32, device=mask.device)
    ptr[:, 1:] = torch.cumsum(counts, dim=-1)
    # row-major order: an entry's rank among the group's True entries is its CSR slot
    slot = torch.cumsum(flat.to(torch.int32), dim=-1) - 1
    dump = rows * cols  # masked-out entries go to one extra column, dropped after
    slot = torch.where(flat, slot, dump).long()
    column = torch.arange(rows * cols, device=mask.device, dtype=torch.int32).remainder(cols).expand(groups, -1)
    idx = torch.zeros(groups, rows * cols + 1, dtype=torch.int32, device=mask.device)
    idx.scatter_(1, slot, column)
    return ptr, idx[:, :dump].contiguous()


def tables(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's CSR and the dK/dV pass's transposed CSR of a block mask ``[R, C]`` / ``[G, R, C]``."""
    row_ptr, col_idx = block_csr(mask)
    col_ptr, row_idx = block_csr(mask.transpose(-1, -2))
    return row_ptr, col_idx, col_ptr, row_idx


# ------------------------------------------------------------------------------------------------ launchers
def _blocks(q_block: int, k_block: int, head_d: int, head_dv: int, dtype: torch.dtype):
    cap = 64 if dtype != torch.float32 else 32
    block_m = min(cap, max(16, triton.next_power_of_2(q_block)))
    block_n = min(cap, max(16, triton.next_power_of_2(k_block)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=padded_head_dim(head_d),
                BLOCK_DV=padded_head_dim(head_dv), DOT_PREC=dot_precision(dtype))


def _forward_blocks(q_block: int, k_block: int, head_d: int, head_dv: int, dtype: torch.dtype):
    """The forward's tiles: 128 query rows x 32 keys for 16-bit blocks of >= 128 tokens and head dims <= 128
    (H100 sweep at Wan 2.1's Radial mask: 88.7 ms against 100 ms with the shared 64 x 64 tiles), else the shared
    tiles of :func:`_blocks`."""
    meta = _blocks(q_block, k_block, head_d, head_dv, dtype)
    if dtype != torch.float32 and min(q_block, k_block) >= 128 and max(meta["BLOCK_D"], meta["BLOCK_DV"]) <= 128:
        meta.update(BLOCK_M=128, BLOCK_N=32)
    return meta


def _s4(t: Tensor | None):
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def _group_strides(ptr: Tensor, idx: Tensor):
    """Static tables (one group) are read with stride 0 by every (batch, head)."""
    return (0, 0) if ptr.shape[0] == 1 else (ptr.stride(0), idx.stride(0))


def _forward(q, k, v, ek, ev, row_ptr, col_idx, q_block, k_block, scale, sel=None):
    batch, n, heads, _ = q.shape
    out = torch.empty(batch, n, heads, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, n, device=q.device, dtype=torch.float32)
    meta = _forward_blocks(q_block, k_block, q.shape[-1], v.shape[-1], q.dtype)
    nqb = triton.cdiv(n, q_block)
    q_tiles = triton.cdiv(q_block, meta["BLOCK_M"])
    n_extra = 0 if ek is None else ek.shape[1]
    _bs_fwd_kernel[(nqb * q_tiles, batch * heads)](
        q, k, v, ek if ek is not None else q, ev if ev is not None else v, out, lse, row_ptr, col_idx,
        sel if sel is not None else row_ptr, *_s4(q), *_s4(k), *_s4(v), *_s4(ek), *_s4(ev), *_s4(out)[:3],
        *_group_strides(row_ptr, col_idx), heads, n, n_extra, q_block, k_block, q_tiles, triton.cdiv(n, k_block),
        scale * _LOG2E, q.shape[-1], v.shape[-1], HAS_EXTRA=ek is not None, HAS_SEL=sel is not None, **meta,
        EVEN_K=k_block % meta["BLOCK_N"] == 0, **LAUNCH["fwd"])
    return out, lse


def _backward(do, q, k, v, ek, ev, out, lse, tabs, q_block, k_block, scale, sel=None):
    row_ptr, col_idx, col_ptr, row_idx = tabs
    batch, n, heads, _ = q.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    meta = _blocks(q_block, k_block, q.shape[-1], v.shape[-1], q.dtype)
    nqb, nkb = triton.cdiv(n, q_block), triton.cdiv(n, k_block)
    q_tiles = triton.cdiv(q_block, meta["BLOCK_M"])
    k_tiles = triton.cdiv(k_block, meta["BLOCK_N"])
    n_extra = 0 if ek is None else ek.shape[1]
    delta = torch.empty_like(lse)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    _bs_dq_kernel[(nqb * q_tiles, batch * heads)](
        q, k, v, ek if ek is not None else q, ev if ev is not None else v, out, do, dq, lse, delta, row_ptr,
        col_idx, sel if sel is not None else row_ptr, *_s4(q), *_s4(k), *_s4(v), *_s4(ek), *_s4(ev),
        *_s4(out)[:3], *_s4(do)[:3], *_s4(dq)[:3], *_group_strides(row_ptr, col_idx), heads, n, n_extra, q_block,
        k_block, q_tiles, nkb, scale * _LOG2E, scale, q.shape[-1], v.shape[-1], HAS_EXTRA=ek is not None,
        HAS_SEL=sel is not None, **meta, **LAUNCH["dq"])
    _bs_dkv_kernel[(nkb * k_tiles, batch * heads)](
        q, k, v, do, dk, dv, lse, delta, col_ptr, row_idx, sel if sel is not None else col_ptr, *_s4(q), *_s4(k),
        *_s4(v), *_s4(do)[:3], *_s4(dk)[:3], *_s4(dv)[:3], *_group_strides(col_ptr, row_idx), heads, n, n,
        q_block, k_block, k_tiles, nkb, False, scale * _LOG2E, scale, q.shape[-1], v.shape[-1],
        HAS_SEL=sel is not None, **meta, **LAUNCH["dkv"])
    dek = dev = None
    if ek is not None:
        dek = torch.empty(ek.shape, device=q.device, dtype=ek.dtype)
        dev = torch.empty(ev.shape, device=q.device, dtype=ev.dtype)
        e_tiles = triton.cdiv(n_extra, meta["BLOCK_N"])
        _bs_dkv_kernel[(e_tiles, batch * heads)](
            q, ek, ev, do, dek, dev, lse, delta, col_ptr, row_idx, col_ptr, *_s4(q), *_s4(ek), *_s4(ev),
            *_s4(do)[:3], *_s4(dek)[:3], *_s4(dev)[:3], 0, 0, heads, n, n_extra, q_block, meta["BLOCK_N"], 1, 1, True,
            scale * _LOG2E, scale, q.shape[-1], v.shape[-1], HAS_SEL=False, **meta, **LAUNCH["dkv"])
    return dq, dk, dv, dek, dev


@torch.library.custom_op("visattn::blocksparse_fwd", mutates_args=())
def blocksparse_forward(q: Tensor, k: Tensor, v: Tensor, extra_k: Tensor | None, extra_v: Tensor | None,
                        row_ptr: Tensor, col_idx: Tensor, col_ptr: Tensor, row_idx: Tensor, sel: Tensor | None,
                        q_block: int, k_block: int, scale: float) -> tuple[Tensor, Tensor]:
    """The forward as a custom op (what ``torch.compile`` traces): ``(out, log2-LSE [B, heads, N])``; the
    transposed CSR is an input only for the backward."""
    return _forward(q, k, v, extra_k, extra_v, row_ptr, col_idx, q_block, k_block, scale, sel)


@blocksparse_forward.register_fake
def _(q, k, v, extra_k, extra_v, row_ptr, col_idx, col_ptr, row_idx, sel, q_block, k_block, scale):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


@torch.library.custom_op("visattn::blocksparse_bwd", mutates_args=())
def blocksparse_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, extra_k: Tensor | None,
                         extra_v: Tensor | None, out: Tensor, lse: Tensor, row_ptr: Tensor, col_idx: Tensor,
                         col_ptr: Tensor, row_idx: Tensor, sel: Tensor | None, q_block: int, k_block: int,
                         scale: float) -> list[Tensor]:
    """The backward as a custom op: ``[dq, dk, dv]``, plus ``d extra_k, d extra_v`` with extra tokens."""
    grads = _backward(grad_out, q, k, v, extra_k, extra_v, out, lse, (row_ptr, col_idx, col_ptr, row_idx), q_block,
                      k_block, scale, sel)
    return list(grads if extra_k is not None else grads[:3])


@blocksparse_backward.register_fake
def _(grad_out, q, k, v, extra_k, extra_v, out, lse, row_ptr, col_idx, col_ptr, row_idx, sel, q_block, k_block,
      scale):
    extra = [] if extra_k is None else [torch.empty_like(extra_k), torch.empty_like(extra_v)]
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *extra]


def _setup_context(ctx, inputs, output):
    q, k, v, extra_k, extra_v, row_ptr, col_idx, col_ptr, row_idx, sel, q_block, k_block, scale = inputs
    ctx.save_for_backward(q, k, v, extra_k, extra_v, output[0], output[1], row_ptr, col_idx, col_ptr, row_idx, sel)
    ctx.blocks, ctx.scale = (q_block, k_block), scale


def _custom_op_backward(ctx, grad_out, grad_lse):
    q, k, v, extra_k, extra_v, out, lse, *tabs = ctx.saved_tensors
    grads = blocksparse_backward(grad_out, q, k, v, extra_k, extra_v, out, lse, *tabs, *ctx.blocks, ctx.scale)
    extra = grads[3:] if extra_k is not None else [None, None]
    return (*grads[:3], *extra, None, None, None, None, None, None, None, None)


blocksparse_forward.register_autograd(_custom_op_backward, setup_context=_setup_context)


class _BlockSparseAttention(torch.autograd.Function):
    """The custom ops' forward/backward for eager mode, without ``torch.library`` dispatch (see
    ops._LocalAttention); returns the output only."""

    @staticmethod
    def forward(ctx, q, k, v, ek, ev, row_ptr, col_idx, col_ptr, row_idx, sel, q_block: int, k_block: int,
                scale: float):
        out, lse = _forward(q, k, v, ek, ev, row_ptr, col_idx, q_block, k_block, scale, sel)
        ctx.save_for_backward(q, k, v, ek, ev, out, lse, row_ptr, col_idx, col_ptr, row_idx, sel)
        ctx.blocks, ctx.scale = (q_block, k_block), scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, ek, ev, out, lse, *tabs, sel = ctx.saved_tensors
        dq, dk, dv, dek, dev = _backward(grad_out, q, k, v, ek, ev, out, lse, tabs, *ctx.blocks, ctx.scale, sel)
        return dq, dk, dv, dek, dev, None, None, None, None, None, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, tabs: tuple[Tensor, Tensor, Tensor, Tensor],
                           q_block: int, k_block: int, scale: float, extra_k: Tensor | None = None,
                           extra_v: Tensor | None = None, sel: Tensor | None = None) -> Tensor:
    """Fused block-sparse attention, forward and backward: ``q, k, v [B, N, heads, D]`` (any strides),
    ``tabs`` from :func:`tables` (static: one group; routed: ``B * heads`` groups, batch-major), extra tokens
    ``[B, n, heads, D]`` in the same softmax. ``sel`` (int8 ``[B * heads, N, ceil(N / k_block)]``, contiguous):
    per-row key-block choices inside the tables' blocks (the tables must list, per query block, every key block
    one of its rows selected). Returns ``[B, N, heads, D_v]``."""
    if torch.compiler.is_compiling():
        return blocksparse_forward(q, k, v, extra_k, extra_v, *tabs, sel, int(q_block), int(k_block),
                                   float(scale))[0]
    return _BlockSparseAttention.apply(q, k, v, extra_k, extra_v, *tabs, sel, int(q_block), int(k_block),
                                       float(scale))


__all__ = ["block_csr", "block_sparse_attention", "tables"]
