"""The backward of the engine, FA2-style: probabilities are recomputed from the saved log2-LSE and
``delta = rowsum(dO * O)``. The dQ pass walks the same key tiles as the forward. With a trained rpb it also
produces the bias gradient: a 1-D / 3-D one as each pair's dS in a per-query neighbour buffer
``[B, H, positions, prod(kernel)]`` (every pair exactly once, no atomics) that the host reduces deterministically
(``ops._reduce_rpb_grad``), a 2-D one as offset bins summed in registers (``_rpb_bins``). A 2-D bias read from
expanded tiles (``bias_tiles.py``) also takes the neighbour buffer (``DS_BUFFER``): one store per pair costs less
than recomputing dS (``ops.BIAS_GRAD_BUFFER``; ``bias_tiles._bias_grad_kernel`` otherwise). The dK/dV pass owns
a key tile and walks the query tiles whose windows reach it, read from a per-shape table (``tables.py``). Extra
(global) keys get their own dK/dV pass over all queries.
"""

import triton
import triton.language as tl

from visattn.kernels.engine import (
    _PATTERN_ARGS,
    LOG2E,
    _bias_tile,
    _key_tile,
    _load_cols,
    _load_rows,
    _on_border,
    _program_head,
    _query_tile,
    _row_offsets,
    _rpb_offsets,
    _store_rows,
    _tile_scores,
    _tile_walk,
    _walked_pair,
)
from visattn.kernels.patterns import in_box_t, key_interval, split_tile, unflatten

# a str constexpr passed explicitly: Triton 3.6 hands a jit helper's str default to tl.dot unwrapped
IEEE = tl.constexpr("ieee")


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["N_EXTRA", "NKMAX"])
def _bwd_dq_kernel(
    Q, K, V, DO, OUT, GLSE, LSE, DELTA, DQ, DSN, RPB, EK, EV, BT, KD, VD,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    dq_sb, dq_s0, dq_s1, dq_s2, dq_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2, ek_sb, ek_sn, ek_sh, ek_sd, ev_sb, ev_sn, ev_sh, ev_sd,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    N_EXTRA, NKMAX, qk_scale, sm_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, DOT_PREC: tl.constexpr,
    RPB_BINS: tl.constexpr = False, O1: tl.constexpr = 16, O2: tl.constexpr = 16, HAS_GLSE: tl.constexpr = False,
    BIAS_TILES: tl.constexpr = False, DS_BUFFER: tl.constexpr = False, KV_DESC: tl.constexpr = False,
):
    """dQ for one query tile over the forward's key tiles, and ``delta = rowsum(dO * O)`` (minus the LSE
    gradient's share) computed here and stored for the dK/dV pass. With a bias: ``RPB_BINS`` sums each tile's dS
    into relative-offset bins in registers (``_rpb_bins``) and stores one ``[O1, O2]`` partial per program;
    otherwise each pair's dS goes to the neighbour buffer ``DSN``. With ``BIAS_TILES`` (``HAS_RPB`` off) the bias
    and mask come from the expanded tiles ``BT``; ``DS_BUFFER`` then stores each real pair's dS (finite bias) in
    ``DSN``, else the bias gradient is left to ``bias_tiles._bias_grad_kernel``. ``KV_DESC``: key boxes through
    tensor descriptors ``KD`` / ``VD``, as in the forward (``engine._fwd_kernel``)."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    b, h = _program_head(H)
    (t1, t2, g0, g1, g2, G0, G1, G2, qi0, qi1, qi2, q_valid, st0, st1, st2, en0, en1, en2,
     ka0, ka1, ka2, nk0, nk1, nk2, cl0, cl1, cl2, ch0, ch1, ch2, c0, c1, c2) = _query_tile(
        pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
        M0, M1, M2, N0, N1, N2, CAUSAL0, CAUSAL1, CAUSAL2, WINDOW)
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2)
    q = _load_rows(Q + b * q_sb + h * q_sh, q_rows, 1, q_valid, d_cols, q_sd, HEAD_D)
    do_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, do_s0, do_s1, do_s2)
    do = _load_rows(DO + b * do_sb + h * do_sh, do_rows, 1, q_valid, dv_cols, do_sd, HEAD_DV)
    l_rows = b * l_sb + h + _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
    lse = tl.load(LSE + l_rows, mask=q_valid, other=0.0)
    o_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, o_s0, o_s1, o_s2)
    o = _load_rows(OUT + b * o_sb + h * o_sh, o_rows, 1, q_valid, dv_cols, 1, HEAD_DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GLSE:  # lse = log2(sum exp2(s)) adds p * g / ln 2 to each score's gradient: delta shifts by -g / ln 2
        delta -= tl.load(GLSE + l_rows, mask=q_valid, other=0.0).to(tl.float32) * LOG2E
    tl.store(DELTA + l_rows, delta, mask=q_valid)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * k_sb + h * k_sh
    v_base = V + b * v_sb + h * v_sh
    if RPB_BINS:  # first query coordinate of the tile along dimensions 1 and 2 (dimension 0 is the padding one)
        _, _, q_first1, _, _ = split_tile(t1, L1, DL1, NT1, KS1, SH1, M1, WINDOW)
        _, _, q_first2, _, _ = split_tile(t2, L2, DL2, NT2, KS2, SH2, M2, WINDOW)
        bins = tl.zeros([O1, O2], tl.float32)
    elif HAS_RPB or DS_BUFFER:  # row starts of this program's queries in the dS buffer [B, H, L0*L1*L2, KS0*KS1*KS2]
        positions = ((qi0 * DL0 + g0) * L1 + (qi1 * DL1 + g1)) * L2 + (qi2 * DL2 + g2)
        dsn_rows = DSN + ((b * H + h) * (L0 * L1 * L2) + positions) * (KS0 * KS1 * KS2)
    for t in range(0, nk0 * nk1 * nk2):
        lo0, lo1, lo2, kj0, kj1, kj2, k_in = _key_tile(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, G0, G1, G2,
                                                       N0, N1, N2)
        k, vT = _walked_pair(KV_DESC, KD, VD, k_base, v_base, b, L0, lo0, lo1, lo2, h, kj0, kj1, kj2, k_in,
                             DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2, k_sd, v_s0, v_s1, v_s2, v_sd, HEAD_D,
                             HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, False, True)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s, pair = _tile_scores(s, q_valid, qi0, qi1, qi2, st0, st1, st2, en0, en1, en2, lo0, lo1, lo2, kj0, kj1, kj2,
                               cl0, cl1, cl2, ch0, ch1, ch2, RPB, h, r_sh, r_s0, r_s1, r_s2, KS0, KS1, KS2,
                               N0, N1, N2, HAS_RPB, BT, pid, t, NKMAX, BIAS_TILES)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if RPB_BINS:
            bins += _rpb_bins(ds, q_first1, q_first2, lo1, lo2, KS1, KS2, M1, M2, N1, N2, O1, O2, IEEE)
        elif HAS_RPB or DS_BUFFER:  # neighbour index (key - window start) per dimension: each pair in its own slot
            if DS_BUFFER:  # bias tiles: the real pairs are those whose expanded bias is finite
                pair = s > float("-inf")
            nbr = (((kj0[None, :] - st0[:, None]) * KS1 + (kj1[None, :] - st1[:, None])) * KS2
                   + (kj2[None, :] - st2[:, None]))
            tl.store(dsn_rows[:, None] + nbr, ds, mask=pair)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    if HAS_EXTRA:
        e_cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, N_EXTRA, BLOCK_N):
            e_in = (n0 + e_cols) < N_EXTRA
            k = _load_rows(EK + b * ek_sb + h * ek_sh, n0 + e_cols, ek_sn, e_in, d_cols, ek_sd, HEAD_D)
            vT = _load_cols(EV + b * ev_sb + h * ev_sh, n0 + e_cols, ev_sn, e_in, dv_cols, ev_sd, HEAD_DV)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(e_in[None, :], s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])
            ds = p * (tl.dot(do, vT, input_precision=DOT_PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, dq_s0, dq_s1, dq_s2)
    _store_rows(DQ + b * dq_sb + h * dq_sh, dq_rows, 1, q_valid, d_cols, HEAD_D, dq * sm_scale)
    if RPB_BINS:  # this program's partial bias gradient: [B, H, programs, O1, O2], summed on the host
        part = DSN + ((b * H + h) * tl.num_programs(0) + pid) * (O1 * O2)
        tl.store(part + tl.arange(0, O1)[:, None] * O2 + tl.arange(0, O2)[None, :], bins)


@triton.jit
def _rpb_bins(ds, q1, q2, k1, k2, KS1, KS2, M1: tl.constexpr, M2: tl.constexpr, N1: tl.constexpr,
              N2: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, PREC: tl.constexpr):
    """Sum a ``[M1*M2, N1*N2]`` tile of dS (rows: the query box whose first coordinates are (q1, q2), row-major;
    columns: the key box from (k1, k2)) into bias-offset bins ``[O1, O2]``, bin ``(key - query + kernel - 1)`` per
    dimension. Regrouped as ``[(query row, key row), (query col, key col)]`` the offset of dimension 1 depends only
    on the row index and that of dimension 2 only on the column index, so the sum is two one-hot products — no
    atomics, no per-pair buffer. float32 throughout (``ieee``, or ``tf32x3``: three tensor-core products, float32
    accuracy for a one-hot operand): bias gradients sum many cancelling terms."""
    a = tl.reshape(ds, [M1, M2, N1, N2])
    a = tl.reshape(tl.permute(a, [0, 2, 1, 3]), [M1 * N1, M2 * N2])
    j = tl.arange(0, M1 * N1)
    off1 = k1 - q1 + (j % N1) - (j // N1) + KS1 - 1
    left = tl.where(tl.arange(0, O1)[:, None] == off1[None, :], 1.0, 0.0)
    i = tl.arange(0, M2 * N2)
    off2 = k2 - q2 + (i % N2) - (i // N2) + KS2 - 1
    right = tl.where(off2[:, None] == tl.arange(0, O2)[None, :], 1.0, 0.0)
    return tl.dot(tl.dot(left, a, input_precision=PREC), right, input_precision=PREC)


@triton.jit
def _key_dim(t, c, L, dil, n_tiles, ks, sh, qr, M: tl.constexpr, N: tl.constexpr, WINDOW: tl.constexpr):
    """One dimension of a key tile: its rows, and the queries that reach it (all of it: the inner range), read
    from the host-built table row ``qr`` = (q_lo, q_hi, inner_lo, inner_hi) of tile ``t``."""
    g, group_len, first, lo, hi = split_tile(t, L, dil, n_tiles, ks, sh, N, WINDOW)
    kj = first + c
    valid = (kj >= lo) & (kj < hi)
    ka = tl.maximum(first, lo)
    kb = tl.minimum(first + N, hi) - 1
    row = qr + t * 4
    q_lo = tl.load(row)
    q_hi = tl.load(row + 1)
    inner_lo = tl.load(row + 2)
    inner_hi = tl.load(row + 3)
    n_query_tiles = tl.where((kb >= ka) & (q_hi >= q_lo), (q_hi - q_lo + M) // M, 0)
    return g, group_len, kj, valid, q_lo, q_hi, n_query_tiles, inner_lo, inner_hi


@triton.jit
def _key_box(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, SH0, SH1, SH2, QR, QR_T,
             M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
             N2: tl.constexpr, WINDOW: tl.constexpr):
    """Key tile ``pid`` of the dK/dV walk (N0 x N1 x N2 rows, row-major) and the walk over its query tiles.

    Returns the query box's row coordinates (r0, r1, r2); then per dimension (three values each, dimension 0 first):
    dilation group, group length, the keys' coordinates; the keys' validity; and per dimension the first and last
    query reaching the tile, the number of M-row query tiles to walk, and the inner range (``_key_dim``)."""
    t0, t1, t2 = unflatten(pid, DL1 * NT1, DL2 * NT2)
    r0, r1, r2 = unflatten(tl.arange(0, M0 * M1 * M2), M1, M2)
    c0, c1, c2 = unflatten(tl.arange(0, N0 * N1 * N2), N1, N2)
    g0, G0, kj0, kv0, ql0, qh0, nq0, il0, ih0 = _key_dim(t0, c0, L0, DL0, NT0, KS0, SH0, QR, M0, N0, WINDOW)
    g1, G1, kj1, kv1, ql1, qh1, nq1, il1, ih1 = _key_dim(t1, c1, L1, DL1, NT1, KS1, SH1, QR + QR_T * 4, M1, N1,
                                                         WINDOW)
    g2, G2, kj2, kv2, ql2, qh2, nq2, il2, ih2 = _key_dim(t2, c2, L2, DL2, NT2, KS2, SH2, QR + QR_T * 8, M2, N2,
                                                         WINDOW)
    return (r0, r1, r2, g0, g1, g2, G0, G1, G2, kj0, kj1, kj2, kv0 & kv1 & kv2, ql0, ql1, ql2, qh0, qh1, qh2,
            nq0, nq1, nq2, il0, il1, il2, ih0, ih1, ih2)


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["QR_T", "NQMAX"])
def _bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, RPB, QR, BT, QD, DOD, SD,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd,
    dk_sb, dk_s0, dk_s1, dk_s2, dk_sh, dv_sb, dv_s0, dv_s1, dv_s2, dv_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    QR_T, NQMAX, qk_scale, sm_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_TILES: tl.constexpr = False, QDO_DESC: tl.constexpr = False,
    STATS: tl.constexpr = 0,
):
    """dK, dV for one key tile (N0 x N1 x N2), over the query tiles (M0 x M1 x M2) that attend it. With
    ``BIAS_TILES`` (``HAS_RPB`` off) each query tile's transposed bias and mask come from the expanded tiles
    ``BT`` (``bias_tiles._expand_key_walk_kernel``). ``QDO_DESC``: query and output-gradient boxes through tensor
    descriptors ``QD`` / ``DOD`` (5-D views as in the forward; rows past a walk's last query are masked as on the
    pointer path, rows past the map are zero-filled). ``STATS`` 1 / 2 (with ``QDO_DESC``): each query box's LSE and
    delta from their head-major copy ``SD`` ``[B, heads, L0, L1, L2, 4]`` (``ops._row_stats``): 1 by pointer at a
    scalar plus a loop-invariant offset, 2 through a tensor descriptor (a query's 16 bytes are one TMA box row).
    Per-query values are this pass's column vectors, 16 per thread at 64 queries: read from the ``[B, *spatial,
    heads]`` layout (``STATS`` 0) they cost a fifth of the loop's instructions (sm90 SASS, FLUX-4K)."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    b, h = _program_head(H)
    (r0, r1, r2, g0, g1, g2, G0, G1, G2, kj0, kj1, kj2, k_valid, ql0, ql1, ql2, qh0, qh1, qh2, nq0, nq1, nq2,
     il0, il1, il2, ih0, ih1, ih2) = _key_box(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2,
                                              SH0, SH1, SH2, QR, QR_T, M0, M1, M2, N0, N1, N2, WINDOW)
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2)
    k = _load_rows(K + b * k_sb + h * k_sh, k_rows, 1, k_valid, d_cols, k_sd, HEAD_D)
    v_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2)
    v = _load_rows(V + b * v_sb + h * v_sh, v_rows, 1, k_valid, dv_cols, v_sd, HEAD_DV)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_base = Q + b * q_sb + h * q_sh
    do_base = DO + b * do_sb + h * do_sh
    if STATS == 1:  # no dilation with QDO_DESC: group coordinates are map coordinates
        s_roff = (r0 * L1 + r1) * L2 + r2
        s_last = tl.num_programs(1) * (L0 * L1 * L2) - 1
    for t in range(0, nq0 * nq1 * nq2):
        qs0, qs1, qs2, qi0, qi1, qi2 = _tile_walk(t, nq1, nq2, ql0, ql1, ql2, r0, r1, r2, M0, M1, M2)
        q_valid = (qi0 <= qh0) & (qi1 <= qh1) & (qi2 <= qh2)
        q, do = _walked_pair(QDO_DESC, QD, DOD, q_base, do_base, b, L0, qs0, qs1, qs2, h, qi0, qi1, qi2, q_valid,
                             DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2, q_sd, do_s0, do_s1, do_s2, do_sd, HEAD_D,
                             HEAD_DV, BLOCK_M, BLOCK_D, BLOCK_DV, False, False)
        if STATS == 1:  # rows past the map read the last row (their pairs are masked)
            s_rows = tl.minimum((((b * H + h) * L0 + qs0) * L1 + qs1) * L2 + qs2 + s_roff, s_last)
            lse, delta = tl.split(tl.load(SD + s_rows[:, None] * 4 + tl.arange(0, 2)[None, :]))
        elif STATS == 2:  # rows past the map are zero-filled
            stats = tl.reshape(SD.load([(b * H + h).to(tl.int32), qs0, qs1, qs2, 0]), [BLOCK_M, 2, 2])
            lse_pair, delta_pair = tl.split(stats)
            lse, _ = tl.split(lse_pair)
            delta, _ = tl.split(delta_pair)
        else:
            l_rows = b * l_sb + h + _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
            lse = tl.load(LSE + l_rows, mask=q_valid, other=0.0)
            delta = tl.load(DELTA + l_rows, mask=q_valid, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if BIAS_TILES:
            border = False
            sT = sT + _bias_tile(BT, h, pid, t, NQMAX, BLOCK_N, BLOCK_M)
        else:
            border = _on_border(qs0, qs1, qs2, il0, il1, il2, ih0, ih1, ih2, M0, M1, M2)
            border = border | HAS_RPB  # the bias gather needs the element mask anyway
        if border:
            st0, en0 = key_interval(qi0, G0, KS0, ST0, SH0, CAUSAL0, WINDOW)
            st1, en1 = key_interval(qi1, G1, KS1, ST1, SH1, CAUSAL1, WINDOW)
            st2, en2 = key_interval(qi2, G2, KS2, ST2, SH2, CAUSAL2, WINDOW)
            pair = in_box_t(kj0, kj1, kj2, st0, st1, st2, en0, en1, en2)
            pair = pair & q_valid[None, :] & k_valid[:, None]
            if HAS_RPB:
                offs = tl.trans(_rpb_offsets(qi0, qi1, qi2, kj0, kj1, kj2, KS0, KS1, KS2, r_s0, r_s1, r_s2))
                bias = tl.load(RPB + h * r_sh + offs, mask=pair, other=0.0).to(tl.float32)
                sT = sT + bias * LOG2E
            sT = tl.where(pair, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)

    dk_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, dk_s0, dk_s1, dk_s2)
    _store_rows(DK + b * dk_sb + h * dk_sh, dk_rows, 1, k_valid, d_cols, HEAD_D, dk * sm_scale)
    dv_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, dv_s0, dv_s1, dv_s2)
    _store_rows(DV + b * dv_sb + h * dv_sh, dv_rows, 1, k_valid, dv_cols, HEAD_DV, dv)


@triton.jit
def _bwd_extra_dkv_kernel(
    Q, EK, EV, DO, LSE, DELTA, DEK, DEV,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, ek_sb, ek_sn, ek_sh, ek_sd, ev_sb, ev_sn, ev_sh, ev_sd,
    do_sb, do_s0, do_s1, do_s2, do_sh, do_sd, l_sb, l_s0, l_s1, l_s2,
    H, L1, L2, N_TOKENS, N_EXTRA, qk_scale, sm_scale, HEAD_D, HEAD_DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dK, dV of the extra (global) keys: every query of the map attends them, no mask but bounds."""
    b, h = _program_head(H)
    e = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e_in = e < N_EXTRA
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k = _load_rows(EK + b * ek_sb + h * ek_sh, e, ek_sn, e_in, d_cols, ek_sd, HEAD_D)
    v = _load_rows(EV + b * ev_sb + h * ev_sh, e, ev_sn, e_in, dv_cols, ev_sd, HEAD_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for f0 in range(0, N_TOKENS, BLOCK_M):
        f = f0 + tl.arange(0, BLOCK_M)
        f_in = f < N_TOKENS
        p0 = f // (L1 * L2)
        p1 = (f // L2) % L1
        p2 = f % L2
        q = _load_rows(Q + b * q_sb + h * q_sh, p0 * q_s0 + p1 * q_s1 + p2 * q_s2, 1, f_in, d_cols, q_sd, HEAD_D)
        do = _load_rows(DO + b * do_sb + h * do_sh, p0 * do_s0 + p1 * do_s1 + p2 * do_s2, 1, f_in, dv_cols, do_sd,
                        HEAD_DV)
        l_rows = b * l_sb + h + p0 * l_s0 + p1 * l_s1 + p2 * l_s2
        lse = tl.load(LSE + l_rows, mask=f_in, other=0.0)
        delta = tl.load(DELTA + l_rows, mask=f_in, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        sT = tl.where(f_in[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    _store_rows(DEK, (b * N_EXTRA + e) * H + h, HEAD_D, e_in, d_cols, HEAD_D, dk * sm_scale)
    _store_rows(DEV, (b * N_EXTRA + e) * H + h, HEAD_DV, e_in, dv_cols, HEAD_DV, dv)
