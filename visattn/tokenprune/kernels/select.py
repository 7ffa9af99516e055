"""Per-image top-k token selection for LLM-side pruning, one program per image.

Dropping visual tokens inside the LLM needs, per image, the ``k`` highest-scoring of its current tokens, the keep
mask of the row (text always kept) and the kept indices in order. In eager PyTorch that is ~15 small ops (group
by image, gather, topk, sort, scatter) per stage; here one launch. The k-th largest score is found by a bitwise
radix select on the order-preserving bits of the float scores (32 steps), ties at the threshold going to the
earlier tokens, so no sort is needed and exactly ``k`` tokens are kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _score_key(scores):
    """int64 keys in 0 .. 2^32 - 1 ordered like the float32 ``scores``."""
    bits = scores.to(tl.int32, bitcast=True)
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed int32 order
    return signed.to(tl.int64) + 2147483648


@triton.jit
def _ordered_key(scores, offs):
    """Distinct non-negative int64 keys, ordered like (score, -position)."""
    return (_score_key(scores) << 31) | (2147483647 - offs).to(tl.int64)


@triton.jit
def _top_k(scores, mine, k):
    """Mask of the ``k`` highest ``scores`` among ``mine`` (all of them if fewer), ties to the earlier position."""
    key = tl.where(mine, _score_key(scores), -1)
    threshold = tl.zeros((), tl.int64)
    for i in range(32):  # bit 31 down to 0: the largest t with at least k keys >= t is the k-th largest key
        candidate = threshold | (tl.full((), 1, tl.int64) << (31 - i))
        enough = tl.sum((key >= candidate).to(tl.int32), 0) >= k
        threshold = tl.where(enough, candidate, threshold)
    above = mine & (key > threshold)
    tied = mine & (key == threshold)
    room = k - tl.sum(above.to(tl.int32), 0)
    return above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))


@triton.jit
def _topk_images_kernel(SCORES, IMAGE, VALID, PLAN, KEEP, SEL, LAST, L, n_images, sel_stride,
                        BLOCK_L: tl.constexpr):
    j = tl.program_id(0)
    k = tl.load(PLAN + j)
    row = tl.load(PLAN + n_images + j)
    writes_text = tl.load(PLAN + 2 * n_images + j)  # 1: the row's first image also writes its text tokens
    offs = tl.arange(0, BLOCK_L)
    inside = offs < L
    base = row.to(tl.int64) * L
    image = tl.load(IMAGE + base + offs, mask=inside, other=-1)
    valid = tl.load(VALID + base + offs, mask=inside, other=0) != 0
    mine = valid & (image == j)
    picked = _top_k(tl.load(SCORES + base + offs, mask=inside, other=0.0).to(tl.float32), mine, k)
    index_in_image = tl.cumsum(mine.to(tl.int32), 0) - 1
    slot = tl.cumsum(picked.to(tl.int32), 0) - 1
    tl.store(SEL + j * sel_stride + slot, index_in_image.to(tl.int64), mask=picked)
    tl.store(LAST + j, tl.max(tl.where(picked, base + offs, -1), 0))
    tl.store(KEEP + base + offs, picked.to(tl.int8), mask=mine)
    others = inside & ((image < 0) | ~valid) & (offs * 0 + writes_text != 0)  # text and padding
    tl.store(KEEP + base + offs, (valid & (image < 0)).to(tl.int8), mask=others)


def topk_per_image(scores: Tensor, image: Tensor, valid: Tensor, ks: list[int], images_per_row: list[int]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``ks[j]`` highest ``scores`` among the valid tokens of image ``j`` (``image == j``) in every row.

    ``images_per_row``: how many images each row holds (images are numbered row by row). Returns the keep mask
    (B, L) (text and picked tokens), the picked indices within each image's current tokens in ascending order
    (images, max k; row ``j`` valid up to ``ks[j]``) and each image's last picked flat index (row * L + col).
    """
    bsz, length = scores.shape
    n_images = len(ks)
    row_of = [r for r, n in enumerate(images_per_row) for _ in range(n)]
    first = [int(j == 0 or row_of[j - 1] != row_of[j]) for j in range(n_images)]
    plan = torch.tensor(ks + row_of + first, dtype=torch.int32).to(scores.device, non_blocking=True)
    if min(images_per_row, default=0) == 0:  # rows without images: no program writes them
        keep = valid & (image < 0)
    else:
        keep = torch.empty(bsz, length, dtype=torch.bool, device=scores.device)
    sel = torch.empty(n_images, max(ks, default=1), dtype=torch.long, device=scores.device)
    last = torch.empty(n_images, dtype=torch.long, device=scores.device)
    if n_images == 0:
        return keep, sel, last
    block = triton.next_power_of_2(length)
    _topk_images_kernel[(n_images,)](scores.contiguous(), image.contiguous(), valid.contiguous().view(torch.int8),
                                     plan, keep.view(torch.int8), sel, last, length, n_images, sel.stride(0),
                                     BLOCK_L=block, num_warps=4 if block <= 2048 else 8)
    return keep, sel, last
