"""Attention scores of a few query rows of a decoder layer, fused: RoPE on the keys, the rows' logits, the masked
softmax over each full row, and the mean over the rows — one launch per layer instead of ~60 eager ops.

LLM-side token pruning (FastV, PyramidDrop, SparseVLM) needs, at a few layers, how much some query rows attend to
every key, averaged over heads and rows. The eager version is launch-bound at batch 1–8 (it recomputes RoPE on all
keys, materialises (B, H, R, S) logits and runs ~60 small ops). One program per (head, sample) holds the rows'
queries, streams the raw keys twice (row max/sum, then probabilities) and writes that head's row-averaged
probabilities; the caller sums over heads. Inference only: scores are never differentiated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.tokenprune.kernels import MAX_SCORE_ROWS


@triton.jit
def _rope_half_pair(x_ptr, c_ptr, s_ptr, ok, HALF):
    """Rotate-half RoPE of a tile of vectors: pointers to their first halves in ``x``, ``cos`` and ``sin``;
    returns the two rotated halves in float32."""
    x1 = tl.load(x_ptr, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _row_logits(q1, q2, K, COS, SIN, VALID, t, s0, S, HALF, sk_s, sc_s,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits (BLOCK_R, BLOCK_S) of the roped rows against keys s0.. (RoPE applied here), -inf where masked."""
    s = s0 + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    key_ok = (s < S) & (tl.load(VALID + s, mask=s < S, other=0) != 0)
    tile = s[:, None] * sk_s + d[None, :]
    cs = s[:, None] * sc_s + d[None, :]
    ok = (s < S)[:, None] & (d < HALF)[None, :]
    k1, k2 = _rope_half_pair(K + tile, COS + cs, SIN + cs, ok, HALF)
    k1, k2 = k1.to(q1.dtype), k2.to(q2.dtype)
    logits = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC) + tl.dot(q2, tl.trans(k2), input_precision=DOT_PREC)
    allowed = key_ok[None, :] & (s[None, :] <= t[:, None])
    return tl.where(allowed, logits, float("-inf"))


@triton.jit
def _row_scores_kernel(Q, K, COS, SIN, ROWS, ROW_OK, VALID, OUT,
                       S, R, H, n_rep, qk_scale,
                       sq_b, sq_r, sq_h, sk_b, sk_s, sk_h, sc_b, sc_s, so_b, so_h,
                       HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_in = r < R
    t = tl.load(ROWS + b * R + r, mask=r_in, other=0)  # each row's token index (its causal limit)
    row_ok = r_in & (tl.load(ROW_OK + b * R + r, mask=r_in, other=0) != 0)
    weight = row_ok.to(tl.float32) / (tl.maximum(tl.sum(row_ok.to(tl.float32), 0), 1.0) * H)
    # the rows' queries, roped at their own positions, pre-scaled for exp2
    q_ptr = Q + b.to(tl.int64) * sq_b + h * sq_h + r[:, None] * sq_r + d[None, :]
    c_off = b.to(tl.int64) * sc_b + t[:, None] * sc_s + d[None, :]
    q_ok = r_in[:, None] & (d < HALF)[None, :]
    q1, q2 = _rope_half_pair(q_ptr, COS + c_off, SIN + c_off, q_ok, HALF)
    q1 = (q1 * qk_scale).to(K.dtype.element_ty)
    q2 = (q2 * qk_scale).to(K.dtype.element_ty)
    k_base = K + b.to(tl.int64) * sk_b + (h // n_rep) * sk_h
    cos_base, sin_base = COS + b.to(tl.int64) * sc_b, SIN + b.to(tl.int64) * sc_b
    valid_base = VALID + b.to(tl.int64) * S
    last = tl.max(tl.where(r_in, t, 0), 0)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_R,), tl.float32)
    for s0 in range(0, last + 1, BLOCK_S):  # pass 1: running max / sum per row (keys after every row skipped)
        x = _row_logits(q1, q2, k_base, cos_base, sin_base, valid_base, t, s0, S, HALF, sk_s, sc_s,
                        BLOCK_S, BLOCK_D, DOT_PREC)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp2(tl.where(m == float("-inf"), 0.0, m - m_safe))
        row_sum = row_sum * rescale + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    scale = weight / tl.where(row_sum > 0, row_sum, 1.0)
    out_base = OUT + b.to(tl.int64) * so_b + h * so_h
    for s0 in range(0, S, BLOCK_S):  # pass 2: probabilities, averaged over the rows (zeros past the last row)
        x = _row_logits(q1, q2, k_base, cos_base, sin_base, valid_base, t, s0, S, HALF, sk_s, sc_s,
                        BLOCK_S, BLOCK_D, DOT_PREC)
        p = tl.exp2(x - m[:, None]) * scale[:, None]
        s = s0 + tl.arange(0, BLOCK_S)
        tl.store(out_base + s, tl.sum(p, 0), mask=s < S)


def row_scores(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, row_ok: Tensor, key_valid: Tensor,
               scale: float) -> Tensor:
    """Mean over heads and over the ``row_ok`` rows of the causal softmax attention rows; (B, S) float32.

    ``q`` (B, R, H, D): raw (un-roped) query projections of the rows ``rows`` (B, R) (token indices);
    ``k`` (B, S, Hkv, D): raw key projections; ``cos``/``sin`` (B or 1, S, D): the layer's rotary tables;
    ``key_valid`` (B, S) bool. Row ``r`` sees keys ``s <= rows[:, r]`` with ``key_valid``.
    """
    bsz, n_rows, heads, head_dim = q.shape
    seq = k.shape[1]
    if n_rows > MAX_SCORE_ROWS:
        raise ValueError(f"q: {n_rows} query rows > {MAX_SCORE_ROWS} (see rowscore_why_not)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(bsz, heads, seq, dtype=torch.float32, device=q.device)
    half = head_dim // 2
    block_d = max(16, triton.next_power_of_2(half))
    block_r = max(16, triton.next_power_of_2(n_rows))
    block_s = 32 if block_r * block_d <= 64 * 64 else 16
    _row_scores_kernel[(heads, bsz)](
        q, k, cos, sin, rows.contiguous(), row_ok.contiguous().view(torch.int8),
        key_valid.contiguous().view(torch.int8), out,
        seq, n_rows, heads, heads // k.shape[2], scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), out.stride(0), out.stride(1),
        HALF=half, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_D=block_d,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out.sum(1)
