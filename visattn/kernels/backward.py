"""The backward of the engine, FA2-style: probabilities are recomputed from the saved log2-LSE and
``delta = rowsum(dO * O)``. The dQ pass walks the same key tiles as the forward; with a trained rpb it also writes
each pair's dS into a per-query neighbour buffer ``[B, H, positions, prod(kernel)]`` (every pair exactly once, no
atomics), which the host reduces into the table deterministically (``ops._reduce_rpb_grad``). The dK/dV pass owns
a key tile and walks the query tiles whose windows reach it, read from a per-shape table (``tables.py``). Extra
(global) keys get their own dK/dV pass over all queries.
"""

import triton
import triton.language as tl

from visattn.kernels.engine import _PATTERN_ARGS, LOG2E, _query_dim, _row_offsets, _rpb_offsets
from visattn.kernels.patterns import in_interval, in_interval_t, key_interval, split_tile, unflatten

# a str constexpr passed explicitly: Triton 3.6 hands a jit helper's str default to tl.dot unwrapped
IEEE = tl.constexpr("ieee")


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["N_EXTRA"])
def _bwd_dq_kernel(
    Q, K, V, DO, OUT, GLSE, LSE, DELTA, DQ, DSN, RPB, EK, EV,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd,
    o_sb, o_s0, o_s1, o_s2, o_sh,
    dq_sb, dq_s0, dq_s1, dq_s2, dq_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2, ek_sb, ek_sn, ek_sh, ek_sd, ev_sb, ev_sn, ev_sh, ev_sd,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    N_EXTRA, qk_scale, sm_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, DOT_PREC: tl.constexpr,
    RPB_BINS: tl.constexpr = False, O1: tl.constexpr = 16, O2: tl.constexpr = 16, HAS_GLSE: tl.constexpr = False,
):
    """dQ for one query tile over the forward's key tiles, and ``delta = rowsum(dO * O)`` (minus the LSE
    gradient's share) computed here and stored for the dK/dV pass. With a bias: ``RPB_BINS`` sums each tile's dS
    into relative-offset bins in registers (``_rpb_bins``) and stores one ``[O1, O2]`` partial per program;
    otherwise each pair's dS goes to the neighbour buffer ``DSN``."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t0, t1, t2 = unflatten(pid, DL1 * NT1, DL2 * NT2)
    r0, r1, r2 = unflatten(tl.arange(0, BLOCK_M), M1, M2)
    c0, c1, c2 = unflatten(tl.arange(0, BLOCK_N), N1, N2)
    g0, G0, qi0, qv0, st0, en0, ka0, nk0, cl0, ch0 = _query_dim(
        t0, r0, L0, DL0, NT0, KS0, ST0, SH0, M0, N0, CAUSAL0, WINDOW)
    g1, G1, qi1, qv1, st1, en1, ka1, nk1, cl1, ch1 = _query_dim(
        t1, r1, L1, DL1, NT1, KS1, ST1, SH1, M1, N1, CAUSAL1, WINDOW)
    g2, G2, qi2, qv2, st2, en2, ka2, nk2, cl2, ch2 = _query_dim(
        t2, r2, L2, DL2, NT2, KS2, ST2, SH2, M2, N2, CAUSAL2, WINDOW)
    q_valid = qv0 & qv1 & qv2
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2)
    q = tl.load(Q + b * q_sb + h * q_sh + q_rows[:, None] + d_cols[None, :] * q_sd,
                mask=q_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
    do_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, do_s0, do_s1, do_s2)
    do = tl.load(DO + b * do_sb + h * do_sh + do_rows[:, None] + dv_cols[None, :] * do_sd,
                 mask=q_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
    l_rows = b * l_sb + h + _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
    lse = tl.load(LSE + l_rows, mask=q_valid, other=0.0)
    o_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, o_s0, o_s1, o_s2)
    o = tl.load(OUT + b * o_sb + h * o_sh + o_rows[:, None] + dv_cols[None, :],
                mask=q_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
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
    elif HAS_RPB:  # row starts of this program's queries in the dS buffer [B, H, L0*L1*L2, KS0*KS1*KS2]
        positions = ((qi0 * DL0 + g0) * L1 + (qi1 * DL1 + g1)) * L2 + (qi2 * DL2 + g2)
        dsn_rows = DSN + ((b * H + h) * (L0 * L1 * L2) + positions) * (KS0 * KS1 * KS2)
    for t in range(0, nk0 * nk1 * nk2):
        a0, a1, a2 = t // (nk1 * nk2), (t // nk2) % nk1, t % nk2
        kj0 = ka0 + a0 * N0 + c0
        kj1 = ka1 + a1 * N1 + c1
        kj2 = ka2 + a2 * N2 + c2
        k_in = (kj0 < G0) & (kj1 < G1) & (kj2 < G2)
        k_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2)
        k = tl.load(k_base + k_rows[:, None] + d_cols[None, :] * k_sd,
                    mask=k_in[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
        v_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2)
        vT = tl.load(v_base + v_rows[None, :] + dv_cols[:, None] * v_sd,
                     mask=k_in[None, :] & (dv_cols[:, None] < HEAD_DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_RPB:
            pair = in_interval(kj0, st0, en0) & in_interval(kj1, st1, en1) & in_interval(kj2, st2, en2)
            pair = pair & q_valid[:, None]
            offs = _rpb_offsets(qi0, qi1, qi2, kj0, kj1, kj2, KS0, KS1, KS2, r_s0, r_s1, r_s2)
            bias = tl.load(RPB + h * r_sh + offs, mask=pair, other=0.0).to(tl.float32)
            s = tl.where(pair, s + bias * LOG2E, float("-inf"))
        else:
            t_lo0 = ka0 + a0 * N0
            t_lo1 = ka1 + a1 * N1
            t_lo2 = ka2 + a2 * N2
            border = ((t_lo0 < cl0) | (t_lo0 + N0 - 1 > ch0) | (t_lo1 < cl1) | (t_lo1 + N1 - 1 > ch1)
                      | (t_lo2 < cl2) | (t_lo2 + N2 - 1 > ch2))
            if border:
                pair = in_interval(kj0, st0, en0) & in_interval(kj1, st1, en1) & in_interval(kj2, st2, en2)
                s = tl.where(pair, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if RPB_BINS:
            bins += _rpb_bins(ds, q_first1, q_first2, ka1 + a1 * N1, ka2 + a2 * N2, KS1, KS2, M1, M2, N1, N2, O1, O2,
                              IEEE)
        elif HAS_RPB:  # neighbour index (key - window start) per dimension: each pair lands in its own slot
            nbr = (((kj0[None, :] - st0[:, None]) * KS1 + (kj1[None, :] - st1[:, None])) * KS2
                   + (kj2[None, :] - st2[:, None]))
            tl.store(dsn_rows[:, None] + nbr, ds, mask=pair)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    if HAS_EXTRA:
        e_cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, N_EXTRA, BLOCK_N):
            e_in = (n0 + e_cols) < N_EXTRA
            k = tl.load(EK + b * ek_sb + h * ek_sh + (n0 + e_cols)[:, None] * ek_sn + d_cols[None, :] * ek_sd,
                        mask=e_in[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
            vT = tl.load(EV + b * ev_sb + h * ev_sh + (n0 + e_cols)[None, :] * ev_sn + dv_cols[:, None] * ev_sd,
                         mask=e_in[None, :] & (dv_cols[:, None] < HEAD_DV), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(e_in[None, :], s, float("-inf"))
            p = tl.math.exp2(s - lse[:, None])
            ds = p * (tl.dot(do, vT, input_precision=DOT_PREC) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, dq_s0, dq_s1, dq_s2)
    tl.store(DQ + b * dq_sb + h * dq_sh + dq_rows[:, None] + d_cols[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_valid[:, None] & (d_cols[None, :] < HEAD_D))
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


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["QR_T"])
def _bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, RPB, QR,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd,
    dk_sb, dk_s0, dk_s1, dk_s2, dk_sh, dv_sb, dv_s0, dv_s1, dv_s2, dv_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    QR_T, qk_scale, sm_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dK, dV for one key tile (N0 x N1 x N2), over the query tiles (M0 x M1 x M2) that attend it."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    t0, t1, t2 = unflatten(pid, DL1 * NT1, DL2 * NT2)
    r0, r1, r2 = unflatten(tl.arange(0, BLOCK_M), M1, M2)
    c0, c1, c2 = unflatten(tl.arange(0, BLOCK_N), N1, N2)
    g0, G0, kj0, kv0, ql0, qh0, nq0, il0, ih0 = _key_dim(t0, c0, L0, DL0, NT0, KS0, SH0, QR, M0, N0, WINDOW)
    g1, G1, kj1, kv1, ql1, qh1, nq1, il1, ih1 = _key_dim(t1, c1, L1, DL1, NT1, KS1, SH1, QR + QR_T * 4, M1, N1,
                                                         WINDOW)
    g2, G2, kj2, kv2, ql2, qh2, nq2, il2, ih2 = _key_dim(t2, c2, L2, DL2, NT2, KS2, SH2, QR + QR_T * 8, M2, N2,
                                                         WINDOW)
    k_valid = kv0 & kv1 & kv2
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2)
    k = tl.load(K + b * k_sb + h * k_sh + k_rows[:, None] + d_cols[None, :] * k_sd,
                mask=k_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
    v_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2)
    v = tl.load(V + b * v_sb + h * v_sh + v_rows[:, None] + dv_cols[None, :] * v_sd,
                mask=k_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_base = Q + b * q_sb + h * q_sh
    do_base = DO + b * do_sb + h * do_sh
    for t in range(0, nq0 * nq1 * nq2):
        a0, a1, a2 = t // (nq1 * nq2), (t // nq2) % nq1, t % nq2
        qs0 = ql0 + a0 * M0
        qs1 = ql1 + a1 * M1
        qs2 = ql2 + a2 * M2
        qi0 = qs0 + r0
        qi1 = qs1 + r1
        qi2 = qs2 + r2
        q_valid = (qi0 <= qh0) & (qi1 <= qh1) & (qi2 <= qh2)
        q_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2)
        q = tl.load(q_base + q_rows[:, None] + d_cols[None, :] * q_sd,
                    mask=q_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
        do_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, do_s0, do_s1, do_s2)
        do = tl.load(do_base + do_rows[:, None] + dv_cols[None, :] * do_sd,
                     mask=q_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
        l_rows = b * l_sb + h + _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
        lse = tl.load(LSE + l_rows, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + l_rows, mask=q_valid, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        border = ((qs0 < il0) | (qs0 + M0 - 1 > ih0) | (qs1 < il1) | (qs1 + M1 - 1 > ih1)
                  | (qs2 < il2) | (qs2 + M2 - 1 > ih2))
        border = border | HAS_RPB  # the bias gather needs the element mask anyway
        if border:
            st0, en0 = key_interval(qi0, G0, KS0, ST0, SH0, CAUSAL0, WINDOW)
            st1, en1 = key_interval(qi1, G1, KS1, ST1, SH1, CAUSAL1, WINDOW)
            st2, en2 = key_interval(qi2, G2, KS2, ST2, SH2, CAUSAL2, WINDOW)
            pair = in_interval_t(kj0, st0, en0) & in_interval_t(kj1, st1, en1) & in_interval_t(kj2, st2, en2)
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
    tl.store(DK + b * dk_sb + h * dk_sh + dk_rows[:, None] + d_cols[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=k_valid[:, None] & (d_cols[None, :] < HEAD_D))
    dv_rows = _row_offsets(kj0, kj1, kj2, DL0, DL1, DL2, g0, g1, g2, dv_s0, dv_s1, dv_s2)
    tl.store(DV + b * dv_sb + h * dv_sh + dv_rows[:, None] + dv_cols[None, :], dv.to(DV.dtype.element_ty),
             mask=k_valid[:, None] & (dv_cols[None, :] < HEAD_DV))


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
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    e = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e_in = e < N_EXTRA
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k = tl.load(EK + b * ek_sb + h * ek_sh + e[:, None] * ek_sn + d_cols[None, :] * ek_sd,
                mask=e_in[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
    v = tl.load(EV + b * ev_sb + h * ev_sh + e[:, None] * ev_sn + dv_cols[None, :] * ev_sd,
                mask=e_in[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for f0 in range(0, N_TOKENS, BLOCK_M):
        f = f0 + tl.arange(0, BLOCK_M)
        f_in = f < N_TOKENS
        p0 = f // (L1 * L2)
        p1 = (f // L2) % L1
        p2 = f % L2
        q = tl.load(Q + b * q_sb + h * q_sh + (p0 * q_s0 + p1 * q_s1 + p2 * q_s2)[:, None] + d_cols[None, :] * q_sd,
                    mask=f_in[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
        do = tl.load(DO + b * do_sb + h * do_sh + (p0 * do_s0 + p1 * do_s1 + p2 * do_s2)[:, None]
                     + dv_cols[None, :] * do_sd, mask=f_in[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
        l_rows = b * l_sb + h + p0 * l_s0 + p1 * l_s1 + p2 * l_s2
        lse = tl.load(LSE + l_rows, mask=f_in, other=0.0)
        delta = tl.load(DELTA + l_rows, mask=f_in, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        sT = tl.where(f_in[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dsT = pT * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(DEK + ((b * N_EXTRA + e) * H + h)[:, None] * HEAD_D + d_cols[None, :],
             (dk * sm_scale).to(DEK.dtype.element_ty), mask=e_in[:, None] & (d_cols[None, :] < HEAD_D))
    tl.store(DEV + ((b * N_EXTRA + e) * H + h)[:, None] * HEAD_DV + dv_cols[None, :], dv.to(DEV.dtype.element_ty),
             mask=e_in[:, None] & (dv_cols[None, :] < HEAD_DV))
