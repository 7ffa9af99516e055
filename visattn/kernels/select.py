"""Per-image top-k token selection for LLM-side pruning, one program per batch row.

Dropping visual tokens inside the LLM needs, per image, the ``k`` highest-scoring of its current tokens, the keep
mask of the row (text always kept) and the kept indices in order. In eager PyTorch that is ~15 small ops (group
by image, gather, topk, sort, scatter) per stage; here one launch. The k-th largest score is found by a bitwise
radix select on 63-bit keys (order-preserving float bits, then the position, so ties go to the earlier token), so
no sort is needed and exactly ``k`` tokens are kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_TOKENS = 16384  # one row lives in registers


@triton.jit
def _ordered_key(scores, offs):
    """Distinct non-negative int64 keys, ordered like (score, -position)."""
    bits = scores.to(tl.int32, bitcast=True)
    flipped = tl.where(bits < 0, ~bits, bits | -2147483648)  # float order as unsigned 32-bit order
    return ((flipped.to(tl.int64) & 0xFFFFFFFF) << 31) | (2147483647 - offs).to(tl.int64)


@triton.jit
def _topk_rows_kernel(SCORES, IMAGE, VALID, PLAN, KEEP, SEL, LAST, L, n_rows, n_images, sel_stride,
                      BLOCK_L: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_L)
    inside = offs < L
    base = row.to(tl.int64) * L
    image = tl.load(IMAGE + base + offs, mask=inside, other=-1)
    valid = tl.load(VALID + base + offs, mask=inside, other=0) != 0
    key = _ordered_key(tl.load(SCORES + base + offs, mask=inside, other=0.0).to(tl.float32), offs)
    keep = valid & (image < 0)
    first = tl.load(PLAN + n_images + row)  # the row's first image and its image count
    count = tl.load(PLAN + n_images + n_rows + row)
    for j in range(first, first + count):
        k = tl.load(PLAN + j)
        mine = valid & (image == j)
        key_j = tl.where(mine, key, -1)
        threshold = tl.zeros((), tl.int64)
        for i in range(63):  # bit 62 down to 0: the largest t with at least k keys >= t is the k-th largest key
            candidate = threshold | (tl.full((), 1, tl.int64) << (62 - i))
            enough = tl.sum((key_j >= candidate).to(tl.int32), 0) >= k
            threshold = tl.where(enough, candidate, threshold)
        picked = mine & (key_j >= threshold)
        keep = keep | picked
        index_in_image = tl.cumsum(mine.to(tl.int32), 0) - 1
        slot = tl.cumsum(picked.to(tl.int32), 0) - 1
        tl.store(SEL + j * sel_stride + slot, index_in_image.to(tl.int64), mask=picked)
        tl.store(LAST + j, tl.max(tl.where(picked, base + offs, -1), 0))
    tl.store(KEEP + base + offs, keep.to(tl.int8), mask=inside)


def why_not(scores: Tensor) -> str | None:
    """None if :func:`topk_per_image` can run on ``scores``, else the reason."""
    import os

    if not (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "not a CUDA tensor"
    if scores.shape[1] > MAX_TOKENS:
        return f"{scores.shape[1]} tokens per row > {MAX_TOKENS}"
    return None


def topk_per_image(scores: Tensor, image: Tensor, valid: Tensor, ks: list[int], images_per_row: list[int]
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``ks[j]`` highest ``scores`` among the valid tokens of image ``j`` (``image == j``) in every row.

    ``images_per_row``: how many images each row holds (images are numbered row by row). Returns the keep mask
    (B, L) (text and picked tokens), the picked indices within each image's current tokens in ascending order
    (images, max k; row ``j`` valid up to ``ks[j]``) and each image's last picked flat index (row * L + col).
    """
    bsz, length = scores.shape
    n_images = len(ks)
    firsts = [sum(images_per_row[:r]) for r in range(bsz)]
    plan = torch.tensor(ks + firsts + list(images_per_row), dtype=torch.int32).to(scores.device, non_blocking=True)
    keep = torch.empty(bsz, length, dtype=torch.bool, device=scores.device)
    sel = torch.empty(n_images, max(ks, default=1), dtype=torch.long, device=scores.device)
    last = torch.empty(n_images, dtype=torch.long, device=scores.device)
    block = triton.next_power_of_2(length)
    _topk_rows_kernel[(bsz,)](scores.contiguous(), image.contiguous(), valid.contiguous().view(torch.int8), plan,
                              keep.view(torch.int8), sel, last, length, bsz, n_images, sel.stride(0),
                              BLOCK_L=block, num_warps=4 if block <= 2048 else 8)
    return keep, sel, last
