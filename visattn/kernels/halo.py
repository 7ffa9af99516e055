"""HaloNet blocked attention in Triton (docs/SEMANTICS.md, "Halo attention"): one program per (query block,
batch x head), no unfolded key/value copies and no logits in memory.

A program holds its block's queries in one tile and walks the ``(b + 2h)^2`` window around its key block in chunks
of ``ROWS`` window rows (each padded to ``WP`` columns), online softmax. Keys and values outside the map are read
as zeros through the load mask and stay in the softmax (timm zero-pads them); window slots past ``win`` are masked
out. The relative logits come from per-query rows ``P_h = q . rel_h^T`` and ``P_w = q . rel_w^T`` (one
``[B, Hq, Wq, heads, 2*win0-1 + 2*win1-1]`` float32 tensor, computed by torch so that autograd carries their
gradient to ``q`` and the tables): a chunk adds ``P_h[q, row - i0 + win0 - 1]`` to each of its window rows and
``P_w[q, col - i1 + win1 - 1]`` to each column, as a ``[queries, ROWS, WP]`` broadcast.

Backward, one program per query block again (FA2 recomputation from the saved LSE): dQ accumulates in registers;
the logit gradient summed over a chunk's columns is ``dP_h`` of its rows (written once: every chunk owns its rows)
and summed over its rows accumulates ``dP_w``; dK and dV are written per window (``[B, heads, nh, nw, win0, win1,
D]``, every slot owned by one program: no atomics) and gathered onto the map by ``_halo_fold_kernel``: each key
sums its slots over the few windows that cover it in a fixed order (deterministic) and is written once in its
dtype; padding slots are never read. (``torch.nn.functional.fold`` did the same through a permuted float32 copy
and col2im: 8 of the 12 ms of halonet26t's attention in a B256 train step on an H100.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.kernels.tiles import dot_precision

# Launch options per kernel (Triton's defaults until measured on the device). float32 runs with one stage: a
# 128-key chunk of head_dim 64 float32 keys and values in three stages is over the H100's 227 KiB shared memory.
LAUNCH: dict[str, dict[str, int]] = {"fwd": {}, "bwd": {}}
FP32_LAUNCH: dict[str, int] = {"num_stages": 1}
MAX_WINDOW = 64  # window side (block + 2 * halo) the kernels take: one chunk row is padded to a power of two
MAX_QUERY_BLOCK = 256  # queries per block held in one tile


@triton.jit
def _chunk(q, K, V, b, h, k_b, k_y, k_x, k_h, k_d, v_b, v_y, v_x, v_h, v_d, y0, x0, r0, H, W, WIN0, WIN1, d, dv,
           HEAD_D, HEAD_DV, qk_scale, ph_q, p_r, pw, iy, q_ok, BQ: tl.constexpr, ROWS: tl.constexpr,
           WP: tl.constexpr, HAS_REL: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk of window rows ``[r0, r0 + ROWS)``: logits ``[BQ, ROWS * WP]`` (-inf on slots past the window),
    the key and value tiles (zeros outside the map), and the chunk's window rows / columns / in-window mask."""
    n = tl.arange(0, ROWS * WP)
    ky, kx = r0 + n // WP, n % WP
    in_win = (ky < WIN0) & (kx < WIN1)
    ay, ax = y0 + ky, x0 + kx
    inside = in_win & (ay >= 0) & (ay < H) & (ax >= 0) & (ax < W)
    k = tl.load(K + b.to(tl.int64) * k_b + h * k_h + ay[:, None] * k_y + ax[:, None] * k_x + d[None, :] * k_d,
                mask=inside[:, None] & (d[None, :] < HEAD_D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * v_b + h * v_h + ay[:, None] * v_y + ax[:, None] * v_x + dv[None, :] * v_d,
                mask=inside[:, None] & (dv[None, :] < HEAD_DV), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_REL:
        rows = r0 + tl.arange(0, ROWS)
        ph = tl.load(ph_q[:, None] + (rows[None, :] - iy[:, None] + WIN0 - 1) * p_r,
                     mask=q_ok[:, None] & (rows[None, :] < WIN0), other=0.0)
        s = tl.reshape(tl.reshape(s, (BQ, ROWS, WP)) + ph[:, :, None] + pw[:, None, :], (BQ, ROWS * WP))
    s = tl.where(in_win[None, :], s, float("-inf"))
    return s, k, v, ky, kx, in_win


@triton.jit
def _block_setup(Q, PH, PW, q_b, q_y, q_x, q_h, q_d, p_b, p_y, p_x, p_h, p_r, HEADS, NW, QB0, QB1, B0, B1, H0, H1,
                 WIN1, HEAD_D, BQ: tl.constexpr, BD: tl.constexpr, WP: tl.constexpr, HAS_REL: tl.constexpr):
    """The program's block: batch, head, query tile and its rows, window origin, P_h row pointers, P_w tile."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    by, bx = blk // NW, blk % NW
    b, h = bh // HEADS, bh % HEADS
    qi = tl.arange(0, BQ)
    iy, ix = qi // QB1, qi % QB1
    q_ok = qi < QB0 * QB1
    qy, qx = by * QB0 + iy, bx * QB1 + ix
    d = tl.arange(0, BD)
    q_ptr = Q + b.to(tl.int64) * q_b + h * q_h + qy[:, None] * q_y + qx[:, None] * q_x + d[None, :] * q_d
    q = tl.load(q_ptr, mask=q_ok[:, None] & (d[None, :] < HEAD_D), other=0.0)
    p_off = b.to(tl.int64) * p_b + h * p_h + qy * p_y + qx * p_x
    ph_q = PH + p_off
    cols = tl.arange(0, WP)
    pw = tl.zeros([BQ, WP], tl.float32)
    if HAS_REL:
        pw = tl.load(PW + p_off[:, None] + (cols[None, :] - ix[:, None] + WIN1 - 1) * p_r,
                     mask=q_ok[:, None] & (cols[None, :] < WIN1), other=0.0)
    return b, h, bh, by, bx, qy, qx, iy, ix, q_ok, d, q, ph_q, p_off, cols, pw, by * B0 - H0, bx * B1 - H1


@triton.jit
def _halo_fwd_kernel(Q, K, V, PH, PW, OUT, LSE,
                     q_b, q_y, q_x, q_h, q_d, k_b, k_y, k_x, k_h, k_d, v_b, v_y, v_x, v_h, v_d,
                     p_b, p_y, p_x, p_h, p_r, o_b, o_y, o_x, o_h,
                     HEADS, H, W, NW, QB0, QB1, B0, B1, H0, H1, WIN0, WIN1, HEAD_D, HEAD_DV, HQ, WQ, qk_scale,
                     BQ: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, ROWS: tl.constexpr, WP: tl.constexpr,
                     HAS_REL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Forward of one query block: output and natural-log LSE ``[B, heads, Hq, Wq]`` (float32)."""
    b, h, bh, by, bx, qy, qx, iy, ix, q_ok, d, q, ph_q, p_off, cols, pw, y0, x0 = _block_setup(
        Q, PH, PW, q_b, q_y, q_x, q_h, q_d, p_b, p_y, p_x, p_h, p_r, HEADS, NW, QB0, QB1, B0, B1, H0, H1, WIN1,
        HEAD_D, BQ, BD, WP, HAS_REL)
    dv = tl.arange(0, BDV)
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BDV], tl.float32)
    for r0 in range(0, WIN0, ROWS):  # every chunk has an in-window slot: the running max is finite
        s, k, v, ky, kx, in_win = _chunk(
            q, K, V, b, h, k_b, k_y, k_x, k_h, k_d, v_b, v_y, v_x, v_h, v_d, y0, x0, r0, H, W, WIN0, WIN1, d, dv,
            HEAD_D, HEAD_DV, qk_scale, ph_q, p_r, pw, iy, q_ok, BQ, ROWS, WP, HAS_REL, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    o_ptr = OUT + b.to(tl.int64) * o_b + h * o_h + qy[:, None] * o_y + qx[:, None] * o_x + dv[None, :]
    tl.store(o_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=q_ok[:, None] & (dv[None, :] < HEAD_DV))
    tl.store(LSE + bh.to(tl.int64) * HQ * WQ + qy * WQ + qx, m_i + tl.log(l_i), mask=q_ok)


@triton.jit
def _halo_bwd_kernel(Q, K, V, PH, PW, OUT, LSE, DO, DQ, DKW, DVW, DPH, DPW, dq_b, dq_y, dq_x, dq_h,
                     q_b, q_y, q_x, q_h, q_d, k_b, k_y, k_x, k_h, k_d, v_b, v_y, v_x, v_h, v_d,
                     p_b, p_y, p_x, p_h, p_r, o_b, o_y, o_x, o_h,
                     HEADS, H, W, NW, QB0, QB1, B0, B1, H0, H1, WIN0, WIN1, HEAD_D, HEAD_DV, HQ, WQ, qk_scale,
                     BQ: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, ROWS: tl.constexpr, WP: tl.constexpr,
                     HAS_REL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Backward of one query block: dQ (q's layout and dtype), dK/dV per window slot (float32), dP_h / dP_w."""
    b, h, bh, by, bx, qy, qx, iy, ix, q_ok, d, q, ph_q, p_off, cols, pw, y0, x0 = _block_setup(
        Q, PH, PW, q_b, q_y, q_x, q_h, q_d, p_b, p_y, p_x, p_h, p_r, HEADS, NW, QB0, QB1, B0, B1, H0, H1, WIN1,
        HEAD_D, BQ, BD, WP, HAS_REL)
    dv = tl.arange(0, BDV)
    o_off = b.to(tl.int64) * o_b + h * o_h + qy[:, None] * o_y + qx[:, None] * o_x + dv[None, :]
    o_mask = q_ok[:, None] & (dv[None, :] < HEAD_DV)
    do = tl.load(DO + o_off, mask=o_mask, other=0.0)
    o = tl.load(OUT + o_off, mask=o_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + bh.to(tl.int64) * HQ * WQ + qy * WQ + qx, mask=q_ok, other=0.0)
    dq = tl.zeros([BQ, BD], tl.float32)
    dpw = tl.zeros([BQ, WP], tl.float32)
    win_base = ((bh.to(tl.int64) * (HQ // QB0) + by) * NW + bx) * WIN0 * WIN1
    for r0 in range(0, WIN0, ROWS):
        s, k, v, ky, kx, in_win = _chunk(
            q, K, V, b, h, k_b, k_y, k_x, k_h, k_d, v_b, v_y, v_x, v_h, v_d, y0, x0, r0, H, W, WIN0, WIN1, d, dv,
            HEAD_D, HEAD_DV, qk_scale, ph_q, p_r, pw, iy, q_ok, BQ, ROWS, WP, HAS_REL, DOT_PREC)
        p = tl.where(q_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * qk_scale
        slot = win_base + ky * WIN1 + kx
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * qk_scale
        tl.store(DKW + slot[:, None] * HEAD_D + d[None, :], dk, mask=in_win[:, None] & (d[None, :] < HEAD_D))
        dvw = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        tl.store(DVW + slot[:, None] * HEAD_DV + dv[None, :], dvw, mask=in_win[:, None] & (dv[None, :] < HEAD_DV))
        if HAS_REL:
            ds3 = tl.reshape(ds, (BQ, ROWS, WP))
            rows = r0 + tl.arange(0, ROWS)
            tl.store(DPH + p_off[:, None] + (rows[None, :] - iy[:, None] + WIN0 - 1) * p_r, tl.sum(ds3, 2),
                     mask=q_ok[:, None] & (rows[None, :] < WIN0))
            dpw += tl.sum(ds3, 1)
    dq_ptr = DQ + b.to(tl.int64) * dq_b + h * dq_h + qy[:, None] * dq_y + qx[:, None] * dq_x + d[None, :]
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < HEAD_D))
    if HAS_REL:
        tl.store(DPW + p_off[:, None] + (cols[None, :] - ix[:, None] + WIN1 - 1) * p_r, dpw,
                 mask=q_ok[:, None] & (cols[None, :] < WIN1))


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(n))


def _launch(kernel: str, dtype: torch.dtype) -> dict[str, int]:
    return {**FP32_LAUNCH, **LAUNCH[kernel]} if dtype == torch.float32 else LAUNCH[kernel]


def _geometry(q: Tensor, k: Tensor, block: tuple[int, int], halo: tuple[int, int]) -> dict:
    _, hq, wq, _, _ = q.shape
    height, width = k.shape[1:3]
    nh, nw = height // block[0], width // block[1]
    qb0, qb1 = hq // nh, wq // nw
    win0, win1 = block[0] + 2 * halo[0], block[1] + 2 * halo[1]
    wp = triton.next_power_of_2(win1)
    rows = max(1, min(triton.next_power_of_2(win0), 128 // wp))
    if rows * wp < 16:  # tl.dot needs 16 keys per chunk
        rows = 16 // wp
    return dict(nh=nh, nw=nw, qb=(qb0, qb1), win=(win0, win1), rows=rows, wp=wp)


def _args(q, k, v, rel, out, block, halo, scale, geo) -> tuple[list, dict]:
    """The relative-row pointers (P_h, P_w: views of one ``[.., 2*win0-1 + 2*win1-1]`` tensor, so they share
    strides), the scalar arguments and the constexprs both kernels share."""
    batch, hq, wq, heads, dim = q.shape
    height, width = k.shape[1:3]
    if rel is None:
        ph = pw = q.new_zeros(1, dtype=torch.float32)
        p_strides = (0,) * 5
    else:
        ph, pw, p_strides = rel, rel[..., 2 * geo["win"][0] - 1:], rel.stride()
    scalars = [*q.stride(), *k.stride(), *v.stride(), *p_strides, *out.stride()[:4],
               heads, height, width, geo["nw"], *geo["qb"], *block, *halo, *geo["win"], dim, v.shape[-1], hq, wq,
               float(scale)]
    meta = dict(BQ=_pow2(geo["qb"][0] * geo["qb"][1]), BD=_pow2(dim), BDV=_pow2(v.shape[-1]), ROWS=geo["rows"],
                WP=geo["wp"], HAS_REL=rel is not None, DOT_PREC=dot_precision(q.dtype))
    return [ph, pw, scalars], meta


def forward(q, k, v, rel, block, halo, scale) -> tuple[Tensor, Tensor]:
    """Output ``[B, Hq, Wq, heads, Dv]`` (contiguous) and LSE ``[B, heads, Hq, Wq]`` (float32)."""
    batch, hq, wq, heads, _ = q.shape
    geo = _geometry(q, k, block, halo)
    out = torch.empty(batch, hq, wq, heads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, hq, wq, dtype=torch.float32, device=q.device)
    (rel_h, rel_w, scalars), meta = _args(q, k, v, rel, out, block, halo, scale, geo)
    grid = (geo["nh"] * geo["nw"], batch * heads)
    _halo_fwd_kernel[grid](q, k, v, rel_h, rel_w, out, lse, *scalars, **meta, **_launch("fwd", q.dtype))
    return out, lse


@triton.jit
def _halo_fold_kernel(DKW, DVW, DK, DV, dk_b, dk_y, dk_x, dk_h, dv_b, dv_y, dv_x, dv_h,
                      HEADS, H, W, NH, NW, B0, B1, H0, H1, WIN0, WIN1, HEAD_D, HEAD_DV,
                      BLOCK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, REACH0: tl.constexpr,
                      REACH1: tl.constexpr):
    """Gather-fold: every key position sums its dK / dV slots over the (at most ``REACH0 x REACH1``) windows that
    cover it, in a fixed order (deterministic, no atomics), and stores them once in the key's dtype."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    ok = pos < H * W
    y, x = pos // W, pos % W
    d, dv = tl.arange(0, BD), tl.arange(0, BDV)
    acc_k = tl.zeros([BLOCK, BD], tl.float32)
    acc_v = tl.zeros([BLOCK, BDV], tl.float32)
    last0, last1 = (y + H0) // B0, (x + H1) // B1  # the last window (block index) whose span can hold y / x
    for i in range(REACH0):
        by = last0 - i
        ry = y + H0 - by * B0
        ok0 = ok & (by >= 0) & (by < NH) & (ry < WIN0)
        for j in range(REACH1):
            bx = last1 - j
            rx = x + H1 - bx * B1
            hit = ok0 & (bx >= 0) & (bx < NW) & (rx < WIN1)
            slot = (((bh.to(tl.int64) * NH + by) * NW + bx) * WIN0 + ry) * WIN1 + rx
            acc_k += tl.load(DKW + slot[:, None] * HEAD_D + d[None, :], mask=hit[:, None] & (d[None, :] < HEAD_D),
                             other=0.0)
            acc_v += tl.load(DVW + slot[:, None] * HEAD_DV + dv[None, :],
                             mask=hit[:, None] & (dv[None, :] < HEAD_DV), other=0.0)
    b64 = b.to(tl.int64)
    tl.store(DK + b64 * dk_b + h * dk_h + y[:, None] * dk_y + x[:, None] * dk_x + d[None, :],
             acc_k.to(DK.dtype.element_ty), mask=ok[:, None] & (d[None, :] < HEAD_D))
    tl.store(DV + b64 * dv_b + h * dv_h + y[:, None] * dv_y + x[:, None] * dv_x + dv[None, :],
             acc_v.to(DV.dtype.element_ty), mask=ok[:, None] & (dv[None, :] < HEAD_DV))


def _fold(dkw: Tensor, dvw: Tensor, k: Tensor, v: Tensor, block: tuple[int, int], halo: tuple[int, int]
          ) -> tuple[Tensor, Tensor]:
    """Per-window gradients ``[B, heads, nh, nw, win0, win1, D]`` (float32) summed onto ``[B, H, W, heads, D]``
    maps in ``k``'s / ``v``'s dtypes by :func:`_halo_fold_kernel` (one read of every slot, one write per key)."""
    batch, heads, nh, nw, win0, win1, dim = dkw.shape
    height, width = k.shape[1:3]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    reach = [triton.cdiv(w, b) + 1 for w, b in zip((win0, win1), block, strict=True)]
    tile = 64
    _halo_fold_kernel[(triton.cdiv(height * width, tile), batch * heads)](
        dkw, dvw, dk, dv, *dk.stride()[:4], *dv.stride()[:4], heads, height, width, nh, nw, *block, *halo, win0,
        win1, dim, v.shape[-1], BLOCK=tile, BD=_pow2(dim), BDV=_pow2(v.shape[-1]), REACH0=reach[0],
        REACH1=reach[1])
    return dk, dv


def backward(do, q, k, v, rel, out, lse, block, halo, scale):
    """dq, dk, dv (the inputs' dtypes) and the relative rows' gradient (float32, None without relative logits)."""
    batch, hq, wq, heads, dim = q.shape
    geo = _geometry(q, k, block, halo)
    do = do.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    win0, win1 = geo["win"]
    dkw = torch.empty(batch, heads, geo["nh"], geo["nw"], win0, win1, dim, dtype=torch.float32, device=q.device)
    dvw = torch.empty(batch, heads, geo["nh"], geo["nw"], win0, win1, v.shape[-1], dtype=torch.float32,
                      device=q.device)
    drel = torch.zeros_like(rel) if rel is not None else None  # rows no query reads stay zero
    (rel_h, rel_w, scalars), meta = _args(q, k, v, rel, out, block, halo, scale, geo)
    (d_h, d_w, _), _ = _args(q, k, v, drel, out, block, halo, scale, geo)
    grid = (geo["nh"] * geo["nw"], batch * heads)
    _halo_bwd_kernel[grid](q, k, v, rel_h, rel_w, out, lse, do, dq, dkw, dvw, d_h, d_w, *dq.stride()[:4],
                           *scalars, **meta, **_launch("bwd", q.dtype))
    dk, dv = _fold(dkw, dvw, k, v, block, halo)
    return dq, dk, dv, drel


class _HaloAttention(torch.autograd.Function):
    """Eager forward/backward of the fused kernels (the relative rows' gradients flow on through torch)."""

    @staticmethod
    def forward(ctx, q, k, v, rel, block, halo, scale: float):
        out, lse = forward(q, k, v, rel, block, halo, scale)
        ctx.save_for_backward(q, k, v, rel, out, lse)
        ctx.geometry = (block, halo, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rel, out, lse = ctx.saved_tensors
        dq, dk, dv, drel = backward(grad_out, q, k, v, rel, out, lse, *ctx.geometry)
        return dq, dk, dv, drel, None, None, None


@torch.library.custom_op("visattn::halo_fwd", mutates_args=())
def halo_forward(q: Tensor, k: Tensor, v: Tensor, rel: Tensor | None, block: list[int], halo: list[int],
                 scale: float) -> tuple[Tensor, Tensor]:
    """The forward as a custom op (what ``torch.compile`` traces): ``(out, natural-log LSE [B, heads, Hq, Wq])``."""
    return forward(q, k, v, rel, tuple(block), tuple(halo), scale)


@halo_forward.register_fake
def _(q, k, v, rel, block, halo, scale):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    return out, q.new_empty(q.shape[0], q.shape[3], q.shape[1], q.shape[2], dtype=torch.float32)


@torch.library.custom_op("visattn::halo_bwd", mutates_args=())
def halo_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rel: Tensor | None, out: Tensor, lse: Tensor,
                  block: list[int], halo: list[int], scale: float) -> list[Tensor]:
    """The backward as a custom op: ``[dq, dk, dv]``, plus the relative rows' gradient when ``rel`` is given."""
    dq, dk, dv, drel = backward(grad_out, q, k, v, rel, out, lse, tuple(block), tuple(halo), scale)
    return [dq, dk, dv] if drel is None else [dq, dk, dv, drel]


@halo_backward.register_fake
def _(grad_out, q, k, v, rel, out, lse, block, halo, scale):
    grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    return grads if rel is None else [*grads, torch.empty_like(rel)]


def _setup_context(ctx, inputs, output):
    q, k, v, rel, block, halo, scale = inputs
    ctx.save_for_backward(q, k, v, rel, output[0], output[1])
    ctx.geometry = (list(block), list(halo), scale)


def _custom_op_backward(ctx, grad_out, grad_lse):
    q, k, v, rel, out, lse = ctx.saved_tensors
    grads = halo_backward(grad_out, q, k, v, rel, out, lse, *ctx.geometry)
    return (*grads[:3], grads[3] if rel is not None else None, None, None, None)


halo_forward.register_autograd(_custom_op_backward, setup_context=_setup_context)


def halo_attention(q: Tensor, k: Tensor, v: Tensor, block: tuple[int, int], halo: tuple[int, int],
                   rel_h: Tensor | None, rel_w: Tensor | None, scale: float) -> Tensor:
    """Backend entry: heads-last ``[B, Hq, Wq, heads, D]`` queries, ``[B, H, W, heads, D]`` keys/values; the
    relative rows ``q . [rel_h; rel_w]^T`` are computed here in float32 by torch, one ``[B, Hq, Wq, heads,
    2*win0-1 + 2*win1-1]`` tensor (differentiable in ``q`` and the tables)."""
    rel = None
    if rel_h is not None:
        tables = torch.cat([rel_h, rel_w]).float()
        rel = torch.einsum("bxynd,rd->bxynr", q.float(), tables).contiguous()
    if torch.compiler.is_compiling():  # one opaque node per call in a compiled graph
        return halo_forward(q, k, v, rel, [int(b) for b in block], [int(h) for h in halo], float(scale))[0]
    return _HaloAttention.apply(q, k, v, rel, tuple(block), tuple(halo), float(scale))
