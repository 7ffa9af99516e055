"""SparseVLM v1.5 token recycling: two Triton programs per image around two batched matmuls.

After a drop, each image's deleted tokens are ranked by score, the top ``int(0.3 m) + 1`` are clustered with
DPC-KNN on their hidden states and every cluster's mean becomes one recycled token. In eager PyTorch that is ~45
small ops per stage; here:

1. ``_pick_kernel``: the deleted tokens' top ``p`` by score (radix select, ties to the earlier token), listed by
   descending score as the eager ``topk`` lists them;
2. the picks' hidden states are gathered and their Gram matrix taken with one batched matmul (cuBLAS);
3. ``_dpc_kernel``: distances ``||x_a - x_b|| / sqrt(C)`` from the Gram matrix (both triangles averaged, so they
   are exactly symmetric and mutual nearest neighbours get exactly equal densities, as in the eager code),
   density ``exp(-mean(c smallest d²))``, parent distance (nearest denser pick, else the largest distance),
   centres = the ``c`` best density × parent (ties to the earlier pick), every pick joins its nearest centre
   (ties to the first), a centre joins itself -> a membership matrix divided by ``count + 1e-6``;
4. one batched matmul of the memberships with the picks gives the cluster means, in centre order.

One program per image suffices for the selection and the clustering (hundreds of picks); the two matmuls carry
the FLOPs (an earlier single-program version that also did them was 6x slower than eager).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.tokenprune.kernels.select import _ordered_key, _top_k


@triton.jit
def _pick_kernel(SCORES, IMAGE, VALID, KEEP, PLAN, KEYS, PICKS, L, n_images, P, BLOCK_L: tl.constexpr,
                 BLOCK_M: tl.constexpr, TILE: tl.constexpr):
    """Image j: flat indices of its ``n_pick`` best-scoring deleted tokens, by descending score -> PICKS[j]."""
    j = tl.program_id(0)
    row = tl.load(PLAN + j)
    n_pick = tl.load(PLAN + n_images + j)
    offs = tl.arange(0, BLOCK_L)
    inside = offs < L
    base = row.to(tl.int64) * L
    image = tl.load(IMAGE + base + offs, mask=inside, other=-1)
    valid = tl.load(VALID + base + offs, mask=inside, other=0) != 0
    kept = tl.load(KEEP + base + offs, mask=inside, other=1) != 0
    scores = tl.load(SCORES + base + offs, mask=inside, other=0.0).to(tl.float32)
    picked = _top_k(scores, valid & (image == j) & ~kept, n_pick)
    key = _ordered_key(scores, offs)
    key_base = KEYS + j * BLOCK_M
    tl.store(key_base + tl.cumsum(picked.to(tl.int32), 0) - 1, key, mask=picked)
    tl.debug_barrier()
    # rank = number of picked keys above a key: descending score, ties to the earlier token
    m_idx = tl.arange(0, BLOCK_M)
    t = tl.arange(0, TILE)
    all_keys = tl.load(key_base + m_idx, mask=m_idx < n_pick, other=-1)
    for r0 in range(0, P, TILE):
        r_ok = r0 + t < n_pick
        mine = tl.load(key_base + r0 + t, mask=r_ok, other=-1)
        rank = tl.where(r_ok, tl.sum((all_keys[None, :] > mine[:, None]).to(tl.int32), 1), r0 + t)
        position = tl.where(r_ok, 2147483647 - (mine & 2147483647), 0)  # low 31 key bits: 2^31 - 1 - offs
        tl.store(PICKS + j * P + rank, base + position, mask=r0 + t < P)


@triton.jit
def _distance_block(g_base, sq, rows, rows_ok, m_idx, m_ok, P, inv_c):
    """||x_r - x_m|| / sqrt(C) for picks ``rows`` x all picks, from the Gram matrix, symmetric bit for bit
    (both Gram triangles averaged); +inf outside the picks."""
    mask = rows_ok[:, None] & m_ok[None, :]
    g = tl.load(g_base + rows[:, None] * P + m_idx[None, :], mask=mask, other=0.0)
    g_t = tl.load(g_base + m_idx[None, :] * P + rows[:, None], mask=mask, other=0.0)
    sq_rows = tl.load(g_base + rows * (P + 1), mask=rows_ok, other=0.0)
    d2 = tl.maximum(sq_rows[:, None] + sq[None, :] - (g + g_t), 0.0)
    d = tl.where(rows[:, None] == m_idx[None, :], 0.0, tl.sqrt(d2) * inv_c)
    return tl.where(mask, d, float("inf"))


@triton.jit
def _distance_rows(g_base, sq, r0, t, m_idx, n_pick, P, inv_c):
    return _distance_block(g_base, sq, r0 + t, r0 + t < n_pick, m_idx, m_idx < n_pick, P, inv_c)


@triton.jit
def _dpc_kernel(GRAM, PLAN, AUX, MEMBER, n_images, P, inv_c, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                TILE: tl.constexpr):
    """Image j: DPC-KNN on the Gram matrix of its picks -> MEMBER[j] (clusters x picks) = membership / size."""
    j = tl.program_id(0)
    n_pick = tl.load(PLAN + n_images + j)
    n_clusters = tl.load(PLAN + 2 * n_images + j)
    g_base = GRAM + j.to(tl.int64) * P * P
    aux_base = AUX + j * 2 * BLOCK_M
    m_idx = tl.arange(0, BLOCK_M)
    m_ok = m_idx < n_pick
    t = tl.arange(0, TILE)
    sq = tl.load(g_base + m_idx * (P + 1), mask=m_ok, other=0.0)  # the Gram diagonal: squared norms
    largest = tl.zeros((), tl.float32)
    for r0 in range(0, n_pick, TILE):  # pass 1: the largest distance
        d = _distance_rows(g_base, sq, r0, t, m_idx, n_pick, P, inv_c)
        largest = tl.maximum(largest, tl.max(tl.max(tl.where(d == float("inf"), 0.0, d), 1), 0))
    for r0 in range(0, n_pick, TILE):  # pass 2: density = exp(-mean of the n_clusters smallest d^2), self included
        d = _distance_rows(g_base, sq, r0, t, m_idx, n_pick, P, inv_c)
        nearest_sq = tl.zeros((TILE,), tl.float32)
        for _ in range(0, n_clusters):
            smallest = tl.min(d, 1)
            nearest_sq += tl.where(smallest == float("inf"), 0.0, smallest * smallest)
            first = tl.argmin(d, 1, tie_break_left=True)
            d = tl.where(m_idx[None, :] == first[:, None], float("inf"), d)
        tl.store(aux_base + r0 + t, tl.exp(-nearest_sq / n_clusters.to(tl.float32)), mask=r0 + t < n_pick)
    tl.debug_barrier()
    density = tl.load(aux_base + m_idx, mask=m_ok, other=float("-inf"))
    for r0 in range(0, n_pick, TILE):  # pass 3: parent = nearest denser token (else the largest); score
        d = _distance_rows(g_base, sq, r0, t, m_idx, n_pick, P, inv_c)
        mine = tl.load(aux_base + r0 + t, mask=r0 + t < n_pick, other=0.0)
        parent = tl.min(tl.where(density[None, :] > mine[:, None], d, largest), 1)
        tl.store(aux_base + BLOCK_M + r0 + t, parent * mine, mask=r0 + t < n_pick)
    tl.debug_barrier()
    score = tl.load(aux_base + BLOCK_M + m_idx, mask=m_ok, other=float("-inf"))
    k_idx = tl.arange(0, BLOCK_C)
    centres = tl.zeros((BLOCK_C,), tl.int32)
    for k in range(0, n_clusters):  # centres: the best scores in descending order, ties to the earlier token
        best = tl.argmax(score, 0, tie_break_left=True)
        centres = tl.where(k_idx == k, best, centres)
        score = tl.where(m_idx == best, float("-inf"), score)
    k_ok = k_idx < n_clusters
    to_centre = _distance_block(g_base, sq, centres, k_ok, m_idx, m_ok, P, inv_c)
    assign = tl.argmin(to_centre, 0, tie_break_left=True)  # nearest centre, ties to the first
    own = tl.max(tl.where((centres[:, None] == m_idx[None, :]) & k_ok[:, None], k_idx[:, None], -1), 0)
    assign = tl.where(own >= 0, own, assign)  # a centre joins itself
    member = ((assign[None, :] == k_idx[:, None]) & m_ok[None, :] & k_ok[:, None]).to(tl.float32)
    member = member / (tl.sum(member, 1) + 1e-6)[:, None]
    tl.store(MEMBER + j.to(tl.int64) * BLOCK_C * P + k_idx[:, None] * P + m_idx[None, :], member,
             mask=(k_idx[:, None] < BLOCK_C) & (m_idx[None, :] < P))


def recycle_tokens(hidden: Tensor, scores: Tensor, image: Tensor, valid: Tensor, keep: Tensor, rows: list[int],
                   picked: list[int], clusters: list[int]) -> Tensor:
    """Recycled tokens of every image ``j`` (tokens with ``image == j`` in row ``rows[j]``, valid, not kept):
    the ``clusters[j]`` DPC-KNN cluster means of its ``picked[j]`` best-scoring deleted tokens, image by image,
    (sum(clusters), C) in ``hidden``'s dtype."""
    bsz, length, width = hidden.shape
    n_images, dev = len(rows), hidden.device
    n_pick = max(max(picked), 1)
    block_m = max(16, triton.next_power_of_2(n_pick))
    block_c = max(16, triton.next_power_of_2(max(clusters)))
    plan = torch.tensor(rows + picked + clusters, dtype=torch.int32).to(dev, non_blocking=True)
    keys = torch.empty(n_images, block_m, dtype=torch.int64, device=dev)
    picks = torch.empty(n_images, n_pick, dtype=torch.int64, device=dev)
    _pick_kernel[(n_images,)](scores.contiguous(), image.contiguous(), valid.contiguous().view(torch.int8),
                              keep.contiguous().view(torch.int8), plan, keys, picks, length, n_images, n_pick,
                              BLOCK_L=triton.next_power_of_2(length), BLOCK_M=block_m, TILE=32,
                              num_warps=4 if length <= 2048 else 8)
    x = hidden.flatten(0, 1)[picks].float()  # (images, picks, C); the pad picks point at real tokens
    gram = torch.bmm(x, x.transpose(1, 2))
    aux = torch.empty(n_images, 2, block_m, dtype=torch.float32, device=dev)
    member = torch.empty(n_images, block_c, n_pick, dtype=torch.float32, device=dev)
    _dpc_kernel[(n_images,)](gram, plan, aux, member, n_images, n_pick, width**-0.5, BLOCK_M=block_m,
                             BLOCK_C=block_c, TILE=16, num_warps=4)
    means = torch.bmm(member, x).to(hidden.dtype)  # (images, BLOCK_C, C), the first clusters[j] rows are real
    if len(set(clusters)) == 1:
        return means[:, : clusters[0]].flatten(0, 1)
    index = torch.tensor([j * block_c + k for j, c in enumerate(clusters) for k in range(c)], device=dev)
    return means.flatten(0, 1)[index]
