"""The small-map path of the engine: one program per *cell*, the whole set of tokens that attend only each other.

A cell is one dilation group of a neighborhood pattern whose group map is small (NAT-T's 14x14 and 7x7 stages, every
7x7 dilation group of DiNAT), or one (possibly partial) window of window attention. Every key a cell's queries see
lies in the cell, so a program holds all of the cell's keys and values at once, padded to a power-of-two box
``C0 x C1 x C2`` (``CELL`` tokens, at most ``ops.CELL_MAX``), and computes masked attention against all of them:

* forward (``_cell_fwd_kernel``): a program per (cell, block of ``SUB`` query rows, head, ``NB`` batch items); one
  exact softmax over the cell's keys (no online rescaling: every key is in the one tile); writes O and the log2-LSE.
* backward (``_cell_bwd_kernel``): a program per (cell, head, ``NB`` batch items) walks its query blocks once and
  produces dQ (stored per block), dK and dV (accumulated for the whole cell in registers, stored once: each key
  belongs to one cell, so no atomics),
  with ``delta = rowsum(P * dP)`` computed from the recomputed P and dP of the block (every key of a row is in the
  block, so no separate pass and no copy of O), and with a bias, the bias gradient binned by relative offset in
  registers (``backward._rpb_bins``) into one partial per program, summed on the host in a fixed order.

A bias (rank 2) is never gathered per pair: each program loads the table once and expands it to the block's
``[queries, keys]`` tile with two one-hot products (``_rpb_tile``), the inverse of the gradient's binning. Cells
are small (a 7x7 window is one 64-row block), so a program serves ``NB`` batch items of one head: the mask, the
bias tile and (for one-block cells) the bias gradient's binning are paid once per program, not per item.

The mask is index arithmetic (``patterns.key_interval`` per dimension), never a materialised tensor; masked-dense
work inside a cell is bounded by the caller (``ops.cell_box``), which sends larger or sparser maps to the tiled path.
"""

import triton
import triton.language as tl

from visattn.kernels.backward import _rpb_bins
from visattn.kernels.engine import _PATTERN_ARGS, LOG2E, _row_offsets
from visattn.kernels.patterns import in_box, key_interval, split_tile, unflatten


@triton.jit
def _cell_dim(t, L, dil, n_tiles, ks, sh, C: tl.constexpr, WINDOW: tl.constexpr):
    """Cell number ``t`` along one dimension: (group, group length, first coordinate, valid [lo, hi))."""
    return split_tile(t, L, dil, n_tiles, ks, sh, C, WINDOW)


@triton.jit
def _cell_keys(cell, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, SH0, SH1, SH2, C0: tl.constexpr,
               C1: tl.constexpr, C2: tl.constexpr, WINDOW: tl.constexpr):
    """Cell number ``cell``: per dimension (group, group length, first coordinate, valid [lo, hi)), then the
    coordinates of its ``C0*C1*C2`` keys (row-major in the box) and which of them are real."""
    t0, t1, t2 = unflatten(cell, DL1 * NT1, DL2 * NT2)
    g0, G0, f0, lo0, hi0 = _cell_dim(t0, L0, DL0, NT0, KS0, SH0, C0, WINDOW)
    g1, G1, f1, lo1, hi1 = _cell_dim(t1, L1, DL1, NT1, KS1, SH1, C1, WINDOW)
    g2, G2, f2, lo2, hi2 = _cell_dim(t2, L2, DL2, NT2, KS2, SH2, C2, WINDOW)
    c0, c1, c2 = unflatten(tl.arange(0, C0 * C1 * C2), C1, C2)
    kx0, kx1, kx2 = f0 + c0, f1 + c1, f2 + c2
    k_valid = (kx0 >= lo0) & (kx0 < hi0) & (kx1 >= lo1) & (kx1 < hi1) & (kx2 >= lo2) & (kx2 < hi2)
    return g0, G0, f0, lo0, hi0, g1, G1, f1, lo1, hi1, g2, G2, f2, lo2, hi2, kx0, kx1, kx2, k_valid


@triton.jit
def _cell_kv(K, V, b, B, k_rows, v_rows, k_valid, d_cols, dv_cols, k_sb, k_sd, v_sb, v_sd, HEAD_D, HEAD_DV):
    """Batch item ``b`` of a program's group: (b as int64, whether it exists, the cell's keys, its values)."""
    in_b = b < B
    b = b.to(tl.int64)
    k = tl.load(K + b * k_sb + k_rows[:, None] + d_cols[None, :] * k_sd,
                mask=in_b & k_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
    v = tl.load(V + b * v_sb + v_rows[:, None] + dv_cols[None, :] * v_sd,
                mask=in_b & k_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
    return b, in_b, k, v


@triton.jit
def _cell_queries(r, first, lo, hi, G, ks, st, sh, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows ``r`` (cell-box coordinates) along one dimension: coordinate, validity and key interval."""
    x = first + r
    valid = (x >= lo) & (x < hi)
    start, end = key_interval(x, G, ks, st, sh, CAUSAL, WINDOW)
    return x, valid, start, end


@triton.jit
def _rpb_tile(RPB, h, r_sh, r_s1, r_s2, q1, q2, k1, k2, KS1, KS2, M1: tl.constexpr, M2: tl.constexpr,
              N1: tl.constexpr, N2: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, PREC: tl.constexpr):
    """The bias of a ``[M1*M2, N1*N2]`` tile (rows: the query box from (q1, q2), columns: the key box from
    (k1, k2), row-major), built from the table loaded once (``[O1, O2]``, padded) instead of gathered per pair:
    regrouped as ``[(query row, key row), (query col, key col)]`` the tile is ``A @ T @ B`` with one-hot ``A``
    (offset along dimension 1 of each row pair) and ``B`` (dimension 2), the inverse of ``_rpb_bins``. Exact: one
    nonzero product per entry (``tf32`` holds a 16-bit table exactly; float32 tables use ``tf32x3`` / ``ieee``)."""
    o1 = tl.arange(0, O1)
    o2 = tl.arange(0, O2)
    table = tl.load(RPB + h * r_sh + o1[:, None] * r_s1 + o2[None, :] * r_s2,
                    mask=(o1[:, None] < 2 * KS1 - 1) & (o2[None, :] < 2 * KS2 - 1), other=0.0).to(tl.float32)
    j = tl.arange(0, M1 * N1)
    off1 = k1 - q1 + (j % N1) - (j // N1) + KS1 - 1
    left = tl.where(off1[:, None] == o1[None, :], 1.0, 0.0)
    i = tl.arange(0, M2 * N2)
    off2 = k2 - q2 + (i % N2) - (i // N2) + KS2 - 1
    right = tl.where(o2[:, None] == off2[None, :], 1.0, 0.0)
    pairs = tl.dot(tl.dot(left, table, input_precision=PREC), right, input_precision=PREC)
    pairs = tl.reshape(pairs, [M1, N1, M2, N2])
    return tl.reshape(tl.permute(pairs, [0, 2, 1, 3]), [M1 * M2, N1 * N2])


@triton.jit
def _cell_pairs(q_valid, s0, e0, s1, e1, s2, e2, kx0, kx1, kx2):
    """``[SUB, CELL]`` mask: the keys of each query's window (padded rows and keys excluded)."""
    return in_box(kx0, kx1, kx2, s0, s1, s2, e0, e1, e2) & q_valid[:, None]


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["B"])
def _cell_fwd_kernel(
    Q, K, V, OUT, LSE, RPB,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, o_sb, o_s0, o_s1, o_s2, o_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2,
    B, H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    qk_scale, HEAD_D, HEAD_DV,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, SUB: tl.constexpr, NB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_PREC: tl.constexpr,
):
    """Masked attention of ``SUB`` query rows of one cell against all of the cell's keys, in one exact softmax, for
    ``NB`` batch items of one head (the mask and the bias tile are built once and reused)."""
    CELL: tl.constexpr = C0 * C1 * C2
    N_SUB: tl.constexpr = CELL // SUB
    pid = tl.program_id(0)
    cell = pid // N_SUB
    sub = pid % N_SUB
    h = tl.program_id(1)
    b_first = tl.program_id(2) * NB
    (g0, G0, f0, lo0, hi0, g1, G1, f1, lo1, hi1, g2, G2, f2, lo2, hi2, kx0, kx1, kx2, k_valid) = _cell_keys(
        cell, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, SH0, SH1, SH2, C0, C1, C2, WINDOW)
    r0, r1, r2 = unflatten(sub * SUB + tl.arange(0, SUB), C1, C2)
    qx0, qv0, s0, e0 = _cell_queries(r0, f0, lo0, hi0, G0, KS0, ST0, SH0, CAUSAL0, WINDOW)
    qx1, qv1, s1, e1 = _cell_queries(r1, f1, lo1, hi1, G1, KS1, ST1, SH1, CAUSAL1, WINDOW)
    qx2, qv2, s2, e2 = _cell_queries(r2, f2, lo2, hi2, G2, KS2, ST2, SH2, CAUSAL2, WINDOW)
    q_valid = qv0 & qv1 & qv2
    pair = _cell_pairs(q_valid, s0, e0, s1, e1, s2, e2, kx0, kx1, kx2)
    if HAS_RPB:  # rank 2: the block is SUB // C2 whole rows of the cell box
        bias = _rpb_tile(RPB, h, r_sh, r_s1, r_s2, f1 + sub * (SUB // C2), f2, f1, f2, KS1, KS2, SUB // C2, C2, C1,
                         C2, O1, O2, BIAS_PREC) * LOG2E
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2) + h * k_sh
    v_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2) + h * v_sh
    q_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2) + h * q_sh
    o_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, o_s0, o_s1, o_s2) + h * o_sh
    l_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2) + h
    for bi in range(NB):
        b, in_b, k, v = _cell_kv(K, V, b_first + bi, B, k_rows, v_rows, k_valid, d_cols, dv_cols, k_sb, k_sd, v_sb,
                                 v_sd, HEAD_D, HEAD_DV)
        q = tl.load(Q + b * q_sb + q_rows[:, None] + d_cols[None, :] * q_sd,
                    mask=in_b & q_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if HAS_RPB:
            s = s + bias
        s = tl.where(pair, s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padded rows: no key, no inf - inf
        p = tl.math.exp2(s - m[:, None])
        den = tl.sum(p, 1)
        den = tl.where(den == 0.0, 1.0, den)
        out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / den[:, None]
        tl.store(OUT + b * o_sb + o_rows[:, None] + dv_cols[None, :], out.to(OUT.dtype.element_ty),
                 mask=in_b & q_valid[:, None] & (dv_cols[None, :] < HEAD_DV))
        tl.store(LSE + b * l_sb + l_rows, m + tl.log2(den), mask=in_b & q_valid)


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["B"])
def _cell_bwd_kernel(
    Q, K, V, DO, GLSE, LSE, DQ, DK, DV, PART, RPB,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, do_sb, do_s0, do_s1, do_s2, do_sh, do_sd,
    dq_sb, dq_s0, dq_s1, dq_s2, dq_sh, dk_sb, dk_s0, dk_s1, dk_s2, dk_sh, dv_sb, dv_s0, dv_s1, dv_s2, dv_sh,
    l_sb, l_s0, l_s1, l_s2, r_sh, r_s0, r_s1, r_s2,
    B, H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    qk_scale, sm_scale, HEAD_D, HEAD_DV,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, SUB: tl.constexpr, NB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_GLSE: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    DOT_PREC: tl.constexpr, BIAS_PREC: tl.constexpr, BINS_PREC: tl.constexpr,
):
    """dQ, dK, dV (and the bias gradient's partial) of one cell in one pass over its query blocks, for ``NB``
    batch items of one head. A one-block cell (``SUB == CELL``) builds its bias tile once and sums dS over the
    batch items before binning it once (binning is linear)."""
    CELL: tl.constexpr = C0 * C1 * C2
    ONE_SUB: tl.constexpr = SUB == CELL
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b_first = tl.program_id(2) * NB
    (g0, G0, f0, lo0, hi0, g1, G1, f1, lo1, hi1, g2, G2, f2, lo2, hi2, kx0, kx1, kx2, k_valid) = _cell_keys(
        pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, SH0, SH1, SH2, C0, C1, C2, WINDOW)
    d_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    k_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2) + h * k_sh
    v_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, v_s0, v_s1, v_s2) + h * v_sh
    dk_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, dk_s0, dk_s1, dk_s2) + h * dk_sh
    dv_rows = _row_offsets(kx0, kx1, kx2, DL0, DL1, DL2, g0, g1, g2, dv_s0, dv_s1, dv_s2) + h * dv_sh
    if HAS_RPB:
        bins = tl.zeros([O1, O2], tl.float32)
        if ONE_SUB:
            bias_one = _rpb_tile(RPB, h, r_sh, r_s1, r_s2, f1, f2, f1, f2, KS1, KS2, SUB // C2, C2, C1, C2, O1, O2,
                                 BIAS_PREC) * LOG2E
            ds_sum = tl.zeros([SUB, CELL], tl.float32)
    # query blocks up to the last valid row of the cell box (trailing padded rows are skipped)
    last = ((tl.minimum(hi0, f0 + C0) - f0 - 1) * C1 + tl.minimum(hi1, f1 + C1) - f1) * C2
    n_sub = tl.cdiv(last, SUB)
    for bi in range(NB):
        b, in_b, k, v = _cell_kv(K, V, b_first + bi, B, k_rows, v_rows, k_valid, d_cols, dv_cols, k_sb, k_sd, v_sb,
                                 v_sd, HEAD_D, HEAD_DV)
        dk = tl.zeros([CELL, BLOCK_D], tl.float32)
        dv = tl.zeros([CELL, BLOCK_DV], tl.float32)
        for sub in range(0, n_sub):
            r0, r1, r2 = unflatten(sub * SUB + tl.arange(0, SUB), C1, C2)
            qx0, qv0, s0, e0 = _cell_queries(r0, f0, lo0, hi0, G0, KS0, ST0, SH0, CAUSAL0, WINDOW)
            qx1, qv1, s1, e1 = _cell_queries(r1, f1, lo1, hi1, G1, KS1, ST1, SH1, CAUSAL1, WINDOW)
            qx2, qv2, s2, e2 = _cell_queries(r2, f2, lo2, hi2, G2, KS2, ST2, SH2, CAUSAL2, WINDOW)
            q_valid = qv0 & qv1 & qv2 & in_b
            q_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2) + h * q_sh
            q = tl.load(Q + b * q_sb + q_rows[:, None] + d_cols[None, :] * q_sd,
                        mask=q_valid[:, None] & (d_cols[None, :] < HEAD_D), other=0.0)
            do_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, do_s0, do_s1, do_s2) + h * do_sh
            do = tl.load(DO + b * do_sb + do_rows[:, None] + dv_cols[None, :] * do_sd,
                         mask=q_valid[:, None] & (dv_cols[None, :] < HEAD_DV), other=0.0)
            l_rows = b * l_sb + h + _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
            lse = tl.load(LSE + l_rows, mask=q_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if HAS_RPB:
                if ONE_SUB:
                    s = s + bias_one
                else:
                    s = s + _rpb_tile(RPB, h, r_sh, r_s1, r_s2, f1 + sub * (SUB // C2), f2, f1, f2, KS1, KS2,
                                      SUB // C2, C2, C1, C2, O1, O2, BIAS_PREC) * LOG2E
            pair = _cell_pairs(q_valid, s0, e0, s1, e1, s2, e2, kx0, kx1, kx2)
            p = tl.where(pair, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            delta = tl.sum(p * dp, 1)  # = rowsum(dO * O): all of a row's keys are in this block
            if HAS_GLSE:  # the log2-LSE output's gradient g adds p * g / ln 2 to each score's gradient
                delta -= tl.load(GLSE + l_rows, mask=q_valid, other=0.0).to(tl.float32) * LOG2E
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * sm_scale
            dq_rows = _row_offsets(qx0, qx1, qx2, DL0, DL1, DL2, g0, g1, g2, dq_s0, dq_s1, dq_s2) + h * dq_sh
            tl.store(DQ + b * dq_sb + dq_rows[:, None] + d_cols[None, :], dq.to(DQ.dtype.element_ty),
                     mask=q_valid[:, None] & (d_cols[None, :] < HEAD_D))
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            if HAS_RPB:
                if ONE_SUB:
                    ds_sum += ds
                else:
                    bins += _rpb_bins(ds, f1 + sub * (SUB // C2), f2, f1, f2, KS1, KS2, SUB // C2, C2, C1, C2, O1,
                                      O2, BINS_PREC)
        tl.store(DK + b * dk_sb + dk_rows[:, None] + d_cols[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=in_b & k_valid[:, None] & (d_cols[None, :] < HEAD_D))
        tl.store(DV + b * dv_sb + dv_rows[:, None] + dv_cols[None, :], dv.to(DV.dtype.element_ty),
                 mask=in_b & k_valid[:, None] & (dv_cols[None, :] < HEAD_DV))
    if HAS_RPB:  # this program's partial bias gradient: [H, batch groups, cells, O1, O2], summed on the host
        if ONE_SUB:
            bins = _rpb_bins(ds_sum, f1, f2, f1, f2, KS1, KS2, SUB // C2, C2, C1, C2, O1, O2, BINS_PREC)
        part = PART + ((h * tl.num_programs(2) + tl.program_id(2)) * tl.num_programs(0) + pid) * (O1 * O2)
        tl.store(part + tl.arange(0, O1)[:, None] * O2 + tl.arange(0, O2)[None, :], bins)
