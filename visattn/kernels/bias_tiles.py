"""Bias tiles: a trained 2-D relative-position bias expanded once per call into the tiles the tiled kernels visit.

A bias entry depends on (key - query) only, so it is the same for every batch item: gathering it per pair in every
program (B times over) cost the tiled path more than the attention itself at NAT-T's 14x14 to 56x56 stages. Here
one program per (query tile, head) walks the forward's key tiles and stores each ``[BLOCK_M, BLOCK_N]`` tile of
``bias * log2(e)``, with ``-inf`` outside every row's window (the mask baked in); one program per (key tile, head)
does the same along the dK/dV pass's walk, transposed. The attention kernels then read a tile like a K tile.

The bias gradient is the adjoint: ``_bias_grad_kernel`` owns one (query tile, key tile) pair and a chunk of the
batch, recomputes dS there for each item, sums it in registers and bins the sum into bias offsets once
(``backward._rpb_bins``): the binning is paid per batch chunk instead of per item, and each program writes its
own partial (no atomics; the host sums the partials in a fixed order). By default (``ops.BIAS_GRAD_BUFFER``) the
dQ pass instead stores each pair's dS once in the per-query neighbour buffer and the host reduces it: on an H100
that cost less than this kernel's recompute at NAT-T s1-s3 (engine-h100-2026-12-06-run6-dsn.json).
"""

import triton
import triton.language as tl

from visattn.kernels.backward import _key_box, _rpb_bins
from visattn.kernels.engine import (
    LOG2E,
    _key_tile,
    _load_cols,
    _load_rows,
    _query_tile,
    _row_offsets,
    _rpb_offsets,
    _tile_scores,
    _tile_walk,
)
from visattn.kernels.patterns import in_box_t, key_interval, split_tile

# The pattern integers change from call to call (see engine._PATTERN_ARGS); the walk lengths too.
_WALK_ARGS = ["L1", "L2", "DL1", "DL2", "NT1", "NT2", "KS1", "KS2", "SH0", "SH1", "SH2", "NKMAX"]


@triton.jit(do_not_specialize=_WALK_ARGS)
def _expand_query_walk_kernel(
    RPB, BT, r_sh, r_s0, r_s1, r_s2,
    L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2, NKMAX,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
):
    """``BT[h, query tile, t]`` = the masked log2-domain bias of key tile ``t`` of the forward / dQ walk
    (``-inf`` for t past the tile's walk)."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    h = tl.program_id(1)
    (_t1, _t2, _g0, _g1, _g2, G0, G1, G2, qi0, qi1, qi2, q_valid, st0, st1, st2, en0, en1, en2,
     ka0, ka1, ka2, nk0, nk1, nk2, cl0, cl1, cl2, ch0, ch1, ch2, c0, c1, c2) = _query_tile(
        pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
        M0, M1, M2, N0, N1, N2, CAUSAL0, CAUSAL1, CAUSAL2, WINDOW)
    cells = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = BT + (h * tl.num_programs(0) + pid).to(tl.int64) * NKMAX * (BLOCK_M * BLOCK_N)
    n_walk = nk0 * nk1 * nk2
    for t in range(0, NKMAX):
        lo0, lo1, lo2, kj0, kj1, kj2, _k_in = _key_tile(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, G0, G1, G2,
                                                        N0, N1, N2)
        tile, _ = _tile_scores(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), q_valid, qi0, qi1, qi2, st0, st1, st2,
                               en0, en1, en2, lo0, lo1, lo2, kj0, kj1, kj2, cl0, cl1, cl2, ch0, ch1, ch2, RPB, h,
                               r_sh, r_s0, r_s1, r_s2, KS0, KS1, KS2, N0, N1, N2, True, BT, pid, t, NKMAX, False)
        tile = tl.where(t < n_walk, tile, float("-inf"))
        tl.store(base + t * (BLOCK_M * BLOCK_N) + cells, tile.to(BT.dtype.element_ty))


@triton.jit(do_not_specialize=_WALK_ARGS + ["QR_T"])
def _expand_key_walk_kernel(
    RPB, BT, QR, r_sh, r_s0, r_s1, r_s2,
    L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2, QR_T, NKMAX,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
):
    """``BT[h, key tile, t]`` = the transposed ``[BLOCK_N, BLOCK_M]`` masked log2-domain bias of query tile ``t``
    of the dK/dV pass's walk (``NKMAX`` here is the most query tiles any key tile walks)."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    h = tl.program_id(1)
    (r0, r1, r2, _g0, _g1, _g2, G0, G1, G2, kj0, kj1, kj2, k_valid, ql0, ql1, ql2, qh0, qh1, qh2, nq0, nq1, nq2,
     _i0, _i1, _i2, _j0, _j1, _j2) = _key_box(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2,
                                              SH0, SH1, SH2, QR, QR_T, M0, M1, M2, N0, N1, N2, WINDOW)
    cells = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    base = BT + (h * tl.num_programs(0) + pid).to(tl.int64) * NKMAX * (BLOCK_M * BLOCK_N)
    n_walk = nq0 * nq1 * nq2
    for t in range(0, NKMAX):
        _qs0, _qs1, _qs2, qi0, qi1, qi2 = _tile_walk(t, nq1, nq2, ql0, ql1, ql2, r0, r1, r2, M0, M1, M2)
        q_valid = (qi0 <= qh0) & (qi1 <= qh1) & (qi2 <= qh2)
        st0, en0 = key_interval(qi0, G0, KS0, ST0, SH0, CAUSAL0, WINDOW)
        st1, en1 = key_interval(qi1, G1, KS1, ST1, SH1, CAUSAL1, WINDOW)
        st2, en2 = key_interval(qi2, G2, KS2, ST2, SH2, CAUSAL2, WINDOW)
        pair = in_box_t(kj0, kj1, kj2, st0, st1, st2, en0, en1, en2)
        pair = pair & q_valid[None, :] & k_valid[:, None] & (t < n_walk)
        offs = tl.trans(_rpb_offsets(qi0, qi1, qi2, kj0, kj1, kj2, KS0, KS1, KS2, r_s0, r_s1, r_s2))
        bias = tl.load(RPB + h * r_sh + offs, mask=pair, other=0.0).to(tl.float32)
        tile = tl.where(pair, bias * LOG2E, float("-inf"))
        tl.store(base + t * (BLOCK_M * BLOCK_N) + cells, tile.to(BT.dtype.element_ty))


@triton.jit(do_not_specialize=_WALK_ARGS + ["H", "B", "CB"])
def _bias_grad_kernel(
    Q, K, V, DO, LSE, DELTA, BT, PART,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd, l_sb, l_s0, l_s1, l_s2,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2, NKMAX,
    B, CB, qk_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BINS_PREC: tl.constexpr,
):
    """The bias gradient of one (query tile, key tile ``t``) pair of the forward walk over batch items
    ``[chunk * CB, chunk * CB + CB)``: ``sum_b dS_b`` in registers (P recomputed from the saved log2-LSE, dS =
    P * (dO V^T - delta) with the dQ pass's delta), binned once into ``PART[chunk, h, program]`` ([O1, O2])."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid0 = tl.program_id(0)
    pid = pid0 // NKMAX
    t = pid0 % NKMAX
    h = tl.program_id(1)
    chunk = tl.program_id(2)
    (t1, t2, g0, g1, g2, G0, G1, G2, qi0, qi1, qi2, q_valid, _st0, _st1, _st2, _en0, _en1, _en2,
     ka0, ka1, ka2, nk0, nk1, nk2, _cl0, _cl1, _cl2, _ch0, _ch1, _ch2, c0, c1, c2) = _query_tile(
        pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
        M0, M1, M2, N0, N1, N2, CAUSAL0, CAUSAL1, CAUSAL2, WINDOW)
    lo0, lo1, lo2, kj0, kj1, kj2, k_in = _key_tile(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, G0, G1, G2, N0, N1, N2)
    cells = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    bias = tl.load(BT + ((h * (tl.num_programs(0) // NKMAX) + pid).to(tl.int64) * NKMAX + t) * (BLOCK_M * BLOCK_N)
                   + cells).to(tl.float32)
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2)
    do_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, do_s0, do_s1, do_s2)
    l_rows = h + _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
    k_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2)
    v_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_lo = chunk * CB
    b_hi = tl.where(t < nk0 * nk1 * nk2, tl.minimum(b_lo + CB, B), b_lo)  # past the walk: nothing to sum
    for b_item in range(b_lo, b_hi):
        b = tl.cast(b_item, tl.int64)
        q = _load_rows(Q + b * q_sb + h * q_sh, q_rows, 1, q_valid, d_cols, q_sd, HEAD_D)
        do = _load_rows(DO + b * do_sb + h * do_sh, do_rows, 1, q_valid, dv_cols, do_sd, HEAD_DV)
        lse = tl.load(LSE + b * l_sb + l_rows, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + b * l_sb + l_rows, mask=q_valid, other=0.0)
        k = _load_rows(K + b * k_sb + h * k_sh, k_rows, 1, k_in, d_cols, k_sd, HEAD_D)
        vT = _load_cols(V + b * v_sb + h * v_sh, v_rows, 1, k_in, dv_cols, v_sd, HEAD_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        acc += p * (dp - delta[:, None])
    _, _, q_first1, _, _ = split_tile(t1, L1, DL1, NT1, KS1, SH1, M1, WINDOW)
    _, _, q_first2, _, _ = split_tile(t2, L2, DL2, NT2, KS2, SH2, M2, WINDOW)
    bins = _rpb_bins(acc, q_first1, q_first2, lo1, lo2, KS1, KS2, M1, M2, N1, N2, O1, O2, BINS_PREC)
    part = PART + ((chunk * H + h) * tl.num_programs(0) + pid0).to(tl.int64) * (O1 * O2)
    tl.store(part + tl.arange(0, O1)[:, None] * O2 + tl.arange(0, O2)[None, :], bins)
