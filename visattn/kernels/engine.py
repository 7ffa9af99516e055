"""The attention engine: one forward kernel and one backward (dQ pass + dK/dV pass) for every local pattern.

Layout: every tensor is viewed as ``[B, L0, L1, L2, heads, D]`` (rank < 3 inputs get leading size-1 dims, which
cost nothing) and read in place through its strides. A program owns a box of query rows (M0 x M1 x M2, flattened
row-major into BLOCK_M rows) inside one dilation group; dilation is a strided sub-grid: position = coord*dil + group.
Scores live in the log2 domain (``qk_scale`` includes log2(e)); the saved LSE is log2-based too.
"""

import triton
import triton.language as tl

from visattn.kernels.patterns import in_box, key_interval, split_tile, unflatten

LOG2E = tl.constexpr(1.4426950408889634)
# Pattern integers change from call to call; letting Triton specialise them (value 1, multiple of 16) would compile
# a new kernel for most new shapes. Strides and head dims stay specialised: unit/aligned strides and a head-dim
# bound divisible by 16 (mask constant over 16 columns) are what let Triton emit wide vector loads. The
# neighbourhood strides ST* stay specialised too: stride 1 (nearly every call) folds the per-row integer division
# in ``na_interval`` away, which the dK/dV pass evaluates on every query tile it visits.
# Dimension 0 is the padding dimension of 1-D/2-D problems (length, dilation, tiles and kernel all 1): left
# specialisable, its index arithmetic folds away there.
_PATTERN_ARGS = ["H", "L1", "L2", "DL1", "DL2", "NT1", "NT2", "KS1", "KS2", "SH0", "SH1", "SH2"]


@triton.jit
def _row_offsets(c0, c1, c2, dil0, dil1, dil2, g0, g1, g2, s0, s1, s2):
    """Memory offsets of group coordinates (c0, c1, c2) along the three spatial strides."""
    return (c0 * dil0 + g0) * s0 + (c1 * dil1 + g1) * s1 + (c2 * dil2 + g2) * s2


@triton.jit
def _rpb_offsets(qi0, qi1, qi2, kj0, kj1, kj2, K0, K1, K2, r_s0, r_s1, r_s2):
    """[rows, cols] offsets into the bias table: (key - query + kernel - 1) per dimension."""
    return ((kj0[None, :] - qi0[:, None] + K0 - 1) * r_s0 + (kj1[None, :] - qi1[:, None] + K1 - 1) * r_s1
            + (kj2[None, :] - qi2[:, None] + K2 - 1) * r_s2)


# Helpers shared by the forward, dQ and dK/dV kernels (backward.py): each fact of the tile walk is written once.
@triton.jit
def _program_head(H):
    """This program's batch item (int64: it scales the batch strides) and head; grid axis 1 runs over B x H."""
    bh = tl.program_id(1)
    return (bh // H).to(tl.int64), bh % H


@triton.jit
def _load_rows(ptr, rows, row_stride, valid, cols, col_stride, n_cols):
    """``[rows, cols]`` tile at ``ptr + rows * row_stride + cols * col_stride`` (``rows`` are offsets, stride 1, or
    token indices); invalid rows and columns >= n_cols read 0."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=valid[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _load_cols(ptr, rows, row_stride, valid, cols, col_stride, n_cols):
    """The transposed tile ``[cols, rows]`` of ``_load_rows`` (a K or V tile read as an operand of Q K^T / dO V^T)."""
    return tl.load(ptr + rows[None, :] * row_stride + cols[:, None] * col_stride,
                   mask=valid[None, :] & (cols[:, None] < n_cols), other=0.0)


@triton.jit
def _box_load(desc, b, L0, lo0, lo1, lo2, h, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The ``[ROWS, COLS]`` tile of one box (rows row-major from (lo0, lo1, lo2) of batch item ``b``, head ``h``)
    through a tensor descriptor over the 5-D view ``[B * L0, L1, L2, heads, D]`` (``ops.kv_descriptor``)."""
    return tl.reshape(desc.load([(b * L0 + lo0).to(tl.int32), lo1, lo2, h, 0]), [ROWS, COLS])


@triton.jit
def _walked_tile(DESC: tl.constexpr, desc, ptr, b, L0, lo0, lo1, lo2, h, i0, i1, i2, valid, DL0, DL1, DL2, g0, g1,
                 g2, s0, s1, s2, sd, HEAD, ROWS: tl.constexpr, COLS: tl.constexpr, TRANS: tl.constexpr):
    """One operand tile of a walked box, ``[ROWS, COLS]`` or transposed (``TRANS``): through the tensor descriptor
    ``desc`` with ``DESC``, else gathered from ``ptr`` at the rows' coordinates (i0, i1, i2) of dilation group
    (g0, g1, g2), invalid rows and columns past the head dim ``HEAD`` reading 0."""
    if DESC:
        tile = _box_load(desc, b, L0, lo0, lo1, lo2, h, ROWS, COLS)
        if TRANS:
            tile = tl.trans(tile)
    else:
        rows = _row_offsets(i0, i1, i2, DL0, DL1, DL2, g0, g1, g2, s0, s1, s2)
        if TRANS:
            tile = _load_cols(ptr, rows, 1, valid, tl.arange(0, COLS), sd, HEAD)
        else:
            tile = _load_rows(ptr, rows, 1, valid, tl.arange(0, COLS), sd, HEAD)
    return tile


@triton.jit
def _walked_pair(DESC: tl.constexpr, desc_a, desc_b, ptr_a, ptr_b, b, L0, lo0, lo1, lo2, h, i0, i1, i2, valid,
                 DL0, DL1, DL2, g0, g1, g2, a_s0, a_s1, a_s2, a_sd, b_s0, b_s1, b_s2, b_sd, HEAD_A, HEAD_B,
                 ROWS: tl.constexpr, COLS_A: tl.constexpr, COLS_B: tl.constexpr, TRANS_A: tl.constexpr,
                 TRANS_B: tl.constexpr):
    """The two operand tiles of one walked box (keys and values, or queries and output gradients), each as
    ``_walked_tile`` reads it."""
    a = _walked_tile(DESC, desc_a, ptr_a, b, L0, lo0, lo1, lo2, h, i0, i1, i2, valid, DL0, DL1, DL2, g0, g1, g2,
                     a_s0, a_s1, a_s2, a_sd, HEAD_A, ROWS, COLS_A, TRANS_A)
    c = _walked_tile(DESC, desc_b, ptr_b, b, L0, lo0, lo1, lo2, h, i0, i1, i2, valid, DL0, DL1, DL2, g0, g1, g2,
                     b_s0, b_s1, b_s2, b_sd, HEAD_B, ROWS, COLS_B, TRANS_B)
    return a, c


@triton.jit
def _store_rows(ptr, rows, row_stride, valid, cols, n_cols, value):
    """Store a ``[rows, cols]`` tile (columns contiguous) in ``ptr``'s dtype: valid rows, columns < n_cols."""
    tl.store(ptr + rows[:, None] * row_stride + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < n_cols))


@triton.jit
def _query_dim(t, r, L, dil, n_tiles, ks, st, sh, M: tl.constexpr, N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """One dimension of a query tile: rows, their key intervals, and the key range the whole tile needs."""
    g, group_len, first, lo, hi = split_tile(t, L, dil, n_tiles, ks, sh, M, WINDOW)
    qi = first + r
    valid = (qi >= lo) & (qi < hi)
    start, end = key_interval(qi, group_len, ks, st, sh, CAUSAL, WINDOW)
    qa = tl.maximum(first, lo)
    qb = tl.minimum(first + M, hi) - 1
    ka, common_hi = key_interval(qa, group_len, ks, st, sh, CAUSAL, WINDOW)
    common_lo, kb = key_interval(qb, group_len, ks, st, sh, CAUSAL, WINDOW)
    n_key_tiles = tl.where(qb >= qa, (kb - ka + N) // N, 0)
    # keys in [common_lo, common_hi] are seen by every row of the tile: tiles inside it need no element mask.
    return g, group_len, qi, valid, start, end, ka, n_key_tiles, common_lo, common_hi


@triton.jit
def _query_tile(pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
                M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
                N2: tl.constexpr, CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr,
                WINDOW: tl.constexpr):
    """Query tile ``pid`` (M0 x M1 x M2 rows of one dilation group, row-major) of the forward and dQ passes.

    Returns the tile numbers of dimensions 1 and 2, then per dimension (each as three values, dimension 0 first):
    dilation group, group length, the rows' coordinates; the rows' validity; each row's key interval [start, end];
    the walk over key tiles (first key, number of N-row tiles); the interval every row sees, [common lo, hi]; and
    the coordinates of a key tile's N0 x N1 x N2 columns relative to its first key.
    """
    t0, t1, t2 = unflatten(pid, DL1 * NT1, DL2 * NT2)
    r0, r1, r2 = unflatten(tl.arange(0, M0 * M1 * M2), M1, M2)
    c0, c1, c2 = unflatten(tl.arange(0, N0 * N1 * N2), N1, N2)
    g0, G0, qi0, qv0, st0, en0, ka0, nk0, cl0, ch0 = _query_dim(
        t0, r0, L0, DL0, NT0, KS0, ST0, SH0, M0, N0, CAUSAL0, WINDOW)
    g1, G1, qi1, qv1, st1, en1, ka1, nk1, cl1, ch1 = _query_dim(
        t1, r1, L1, DL1, NT1, KS1, ST1, SH1, M1, N1, CAUSAL1, WINDOW)
    g2, G2, qi2, qv2, st2, en2, ka2, nk2, cl2, ch2 = _query_dim(
        t2, r2, L2, DL2, NT2, KS2, ST2, SH2, M2, N2, CAUSAL2, WINDOW)
    q_valid = qv0 & qv1 & qv2
    return (t1, t2, g0, g1, g2, G0, G1, G2, qi0, qi1, qi2, q_valid, st0, st1, st2, en0, en1, en2,
            ka0, ka1, ka2, nk0, nk1, nk2, cl0, cl1, cl2, ch0, ch1, ch2, c0, c1, c2)


@triton.jit
def _tile_walk(t, n1, n2, first0, first1, first2, r0, r1, r2, S0: tl.constexpr, S1: tl.constexpr,
               S2: tl.constexpr):
    """Tile ``t`` (row-major) of a walk over ``n0 x n1 x n2`` tiles of S0 x S1 x S2 rows starting at (first0,
    first1, first2): the tile's first coordinates, then its rows' coordinates (first + r per dimension)."""
    a0, a1, a2 = t // (n1 * n2), (t // n2) % n1, t % n2
    lo0 = first0 + a0 * S0
    lo1 = first1 + a1 * S1
    lo2 = first2 + a2 * S2
    return lo0, lo1, lo2, lo0 + r0, lo1 + r1, lo2 + r2


@triton.jit
def _key_tile(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, G0, G1, G2, N0: tl.constexpr, N1: tl.constexpr,
              N2: tl.constexpr):
    """Key tile ``t`` of a query tile's walk: its first coordinates, its keys' coordinates and which keys lie inside
    the dilation group."""
    lo0, lo1, lo2, kj0, kj1, kj2 = _tile_walk(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, N0, N1, N2)
    k_in = (kj0 < G0) & (kj1 < G1) & (kj2 < G2)
    return lo0, lo1, lo2, kj0, kj1, kj2, k_in


@triton.jit
def _on_border(lo0, lo1, lo2, in_lo0, in_lo1, in_lo2, in_hi0, in_hi1, in_hi2, S0: tl.constexpr, S1: tl.constexpr,
               S2: tl.constexpr):
    """Whether the S0 x S1 x S2 tile starting at (lo0, lo1, lo2) reaches outside [in_lo, in_hi] along a dimension
    (a tile inside needs no element mask)."""
    return ((lo0 < in_lo0) | (lo0 + S0 - 1 > in_hi0) | (lo1 < in_lo1) | (lo1 + S1 - 1 > in_hi1)
            | (lo2 < in_lo2) | (lo2 + S2 - 1 > in_hi2))


@triton.jit
def _bias_tile(BT, h, pid, t, NKMAX, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``t`` of query tile ``pid``'s walk from the expanded bias (``bias_tiles.py``): ``[BLOCK_M, BLOCK_N]``
    float32, log2 domain, ``-inf`` off the windows."""
    cells = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    row = (h * tl.num_programs(0) + pid).to(tl.int64) * NKMAX + t
    return tl.load(BT + row * (BLOCK_M * BLOCK_N) + cells).to(tl.float32)


@triton.jit
def _tile_scores(s, q_valid, qi0, qi1, qi2, st0, st1, st2, en0, en1, en2, lo0, lo1, lo2, kj0, kj1, kj2,
                 cl0, cl1, cl2, ch0, ch1, ch2, RPB, h, r_sh, r_s0, r_s1, r_s2, KS0, KS1, KS2,
                 N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, HAS_RPB: tl.constexpr,
                 BT, pid, t, NKMAX, BIAS_TILES: tl.constexpr):
    """Mask (and bias) a ``[query rows, keys]`` tile of log2-domain scores ``s`` of the forward / dQ walk.

    With a bias: every pair outside a row's window, or of an invalid row, is -inf, and each real pair gets the
    table entry (key - query + kernel - 1 per dimension) times log2(e). Without one: only a tile reaching outside
    the interval every row sees, [cl, ch], is masked to the windows. With ``BIAS_TILES``: tile ``t`` of query tile
    ``pid``'s walk read from the expanded bias ``BT``, bias and mask in one load. Returns the scores and the mask of
    real pairs (with a gathered bias; ``False`` otherwise, where no caller needs it).
    """
    if BIAS_TILES:
        s = s + _bias_tile(BT, h, pid, t, NKMAX, s.shape[0], s.shape[1])
        pair = tl.constexpr(False)
    elif HAS_RPB:
        pair = in_box(kj0, kj1, kj2, st0, st1, st2, en0, en1, en2)
        pair = pair & q_valid[:, None]
        offs = _rpb_offsets(qi0, qi1, qi2, kj0, kj1, kj2, KS0, KS1, KS2, r_s0, r_s1, r_s2)
        bias = tl.load(RPB + h * r_sh + offs, mask=pair, other=0.0).to(tl.float32)
        s = tl.where(pair, s + bias * LOG2E, float("-inf"))
    else:
        border = _on_border(lo0, lo1, lo2, cl0, cl1, cl2, ch0, ch1, ch2, N0, N1, N2)
        if border:
            inside = in_box(kj0, kj1, kj2, st0, st1, st2, en0, en1, en2)
            s = tl.where(inside, s, float("-inf"))
        pair = tl.constexpr(False)
    return s, pair


@triton.jit(do_not_specialize=_PATTERN_ARGS + ["N_EXTRA", "NKMAX"])
def _fwd_kernel(
    Q, K, V, OUT, LSE, RPB, EK, EV, BT, KD, VD, OUT_LOW,
    q_sb, q_s0, q_s1, q_s2, q_sh, q_sd, k_sb, k_s0, k_s1, k_s2, k_sh, k_sd,
    v_sb, v_s0, v_s1, v_s2, v_sh, v_sd, o_sb, o_s0, o_s1, o_s2, o_sh, l_sb, l_s0, l_s1, l_s2,
    r_sh, r_s0, r_s1, r_s2, ek_sb, ek_sn, ek_sh, ek_sd, ev_sb, ev_sn, ev_sh, ev_sd,
    H, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
    N_EXTRA, NKMAX, qk_scale, HEAD_D, HEAD_DV,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL0: tl.constexpr, CAUSAL1: tl.constexpr, CAUSAL2: tl.constexpr, WINDOW: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, DOT_PREC: tl.constexpr, BIAS_TILES: tl.constexpr,
    KV_DESC: tl.constexpr, DUAL_OUT: tl.constexpr,
):
    """Online-softmax forward over the key tiles covering the union of the query tile's windows. With
    ``BIAS_TILES`` the bias (and mask) of each tile is read from the expanded tiles ``BT`` instead of gathered
    from ``RPB`` per pair. With ``KV_DESC`` (Hopper, no dilation) each key box is one tensor-descriptor (TMA) load
    of ``KD`` / ``VD``, 5-D views ``[B * L0, L1, L2, heads, D]`` whose block is the key box; the copy engine
    zero-fills whatever lies outside the map, and keys outside a row's window are masked as on the pointer path.
    With ``DUAL_OUT`` the output is stored twice: in ``OUT`` (float32, kept for the backward) and ``OUT_LOW`` (the
    inputs' 16-bit dtype, same strides), which saves the caller a conversion kernel."""
    BLOCK_M: tl.constexpr = M0 * M1 * M2
    BLOCK_N: tl.constexpr = N0 * N1 * N2
    pid = tl.program_id(0)
    b, h = _program_head(H)
    (_t1, _t2, g0, g1, g2, G0, G1, G2, qi0, qi1, qi2, q_valid, st0, st1, st2, en0, en1, en2,
     ka0, ka1, ka2, nk0, nk1, nk2, cl0, cl1, cl2, ch0, ch1, ch2, c0, c1, c2) = _query_tile(
        pid, L0, L1, L2, DL0, DL1, DL2, NT0, NT1, NT2, KS0, KS1, KS2, ST0, ST1, ST2, SH0, SH1, SH2,
        M0, M1, M2, N0, N1, N2, CAUSAL0, CAUSAL1, CAUSAL2, WINDOW)
    dq_cols = tl.arange(0, BLOCK_D)
    dv_cols = tl.arange(0, BLOCK_DV)
    q_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, q_s0, q_s1, q_s2)
    q = _load_rows(Q + b * q_sb + h * q_sh, q_rows, 1, q_valid, dq_cols, q_sd, HEAD_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_base = K + b * k_sb + h * k_sh
    v_base = V + b * v_sb + h * v_sh
    for t in range(0, nk0 * nk1 * nk2):
        lo0, lo1, lo2, kj0, kj1, kj2, k_in = _key_tile(t, nk1, nk2, ka0, ka1, ka2, c0, c1, c2, G0, G1, G2,
                                                       N0, N1, N2)
        kT, v = _walked_pair(KV_DESC, KD, VD, k_base, v_base, b, L0, lo0, lo1, lo2, h, kj0, kj1, kj2, k_in,
                             DL0, DL1, DL2, g0, g1, g2, k_s0, k_s1, k_s2, k_sd, v_s0, v_s1, v_s2, v_sd, HEAD_D,
                             HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, True, False)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        s, _ = _tile_scores(s, q_valid, qi0, qi1, qi2, st0, st1, st2, en0, en1, en2, lo0, lo1, lo2, kj0, kj1, kj2,
                            cl0, cl1, cl2, ch0, ch1, ch2, RPB, h, r_sh, r_s0, r_s1, r_s2, KS0, KS1, KS2,
                            N0, N1, N2, HAS_RPB, BT, pid, t, NKMAX, BIAS_TILES)
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, DOT_PREC)

    if HAS_EXTRA:
        e_cols = tl.arange(0, BLOCK_N)
        for n0 in range(0, N_EXTRA, BLOCK_N):
            e_in = (n0 + e_cols) < N_EXTRA
            kT = _load_cols(EK + b * ek_sb + h * ek_sh, n0 + e_cols, ek_sn, e_in, dq_cols, ek_sd, HEAD_D)
            v = _load_rows(EV + b * ev_sb + h * ev_sh, n0 + e_cols, ev_sn, e_in, dv_cols, ev_sd, HEAD_DV)
            s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
            s = tl.where(e_in[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, o_s0, o_s1, o_s2)
    _store_rows(OUT + b * o_sb + h * o_sh, o_rows, 1, q_valid, dv_cols, HEAD_DV, out)
    if DUAL_OUT:  # the float32 output (for the backward's delta) and the 16-bit one the caller returns
        _store_rows(OUT_LOW + b * o_sb + h * o_sh, o_rows, 1, q_valid, dv_cols, HEAD_DV, out)
    l_rows = _row_offsets(qi0, qi1, qi2, DL0, DL1, DL2, g0, g1, g2, l_s0, l_s1, l_s2)
    tl.store(LSE + b * l_sb + h + l_rows, m_i + tl.log2(l_safe), mask=q_valid)


@triton.jit
def _online_update(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One flash-attention step on a [rows, keys] tile of log2-domain scores (masked entries are -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet must not produce inf - inf
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc
