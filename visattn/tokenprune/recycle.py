"""Token recycling (SparseVLM v1.5): deleted visual tokens merged into a few extra tokens kept after each image."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from visattn.tokenprune import kernels
from visattn.tokenprune.layout import TokenLayout, compact


def append_recycled(pruner, row_of: list[int], lay: TokenLayout, hidden: torch.Tensor, keep: torch.Tensor,
                    scores: torch.Tensor, removed: list[int], made: list[int], last_kept: torch.Tensor,
                    new_len: int | None = None, right: bool | None = None, timed=nullcontext):
    """Append recycled tokens (pruner.recycled) after each image's kept tokens; extends the layout.

    Image ``j`` sits in row ``row_of[j]``, lost ``removed[j]`` tokens and gets ``made[j]`` recycled ones (host ints,
    the caller's counts); ``last_kept`` (images,): flat (row * L + col) index of every image's last kept token;
    ``new_len`` / ``right``: see :func:`compact`. Everything but the token values is known on the host, so all
    index plans go up in one upload and no device value is read back. ``timed()`` wraps the making of the tokens
    (the method's own work; placing them is layout bookkeeping, as every method's compaction).
    """
    if not any(made):
        return lay, hidden, None, None
    bsz, length = lay.valid.shape
    dev, n_img, width = hidden.device, len(removed), hidden.shape[-1]
    slot, used = [], [0] * bsz  # slot of image j's first recycled token in its row's extension
    for j, c in enumerate(made):
        slot.append(used[row_of[j]])
        used[row_of[j]] += c
    n_extra = max(used)
    use_kernel = _recycle_kernel_runs(pruner, hidden, removed)
    if use_kernel:  # the kernel returns every image's tokens in image order
        groups, src_plan, first_out = {}, [], [sum(made[:j]) for j in range(n_img)]
    else:
        groups, src_plan, first_out = _eager_groups(removed, made)
    # every extension slot (B * n_extra): its image (n_img = none), slot in the row, row in the recycled tokens
    # (sum(made) = the zero row appended for padding slots)
    n_slots = bsz * n_extra
    ext_img, ext_slot, ext_src = [n_img] * n_slots, [0] * n_slots, [sum(made)] * n_slots
    for j, c in enumerate(made):
        for i in range(c):
            at = row_of[j] * n_extra + slot[j] + i
            ext_img[at], ext_slot[at], ext_src[at] = j, slot[j] + i, first_out[j] + i
    plan = torch.tensor(src_plan + ext_img + ext_slot + ext_src, dtype=torch.long).to(dev, non_blocking=True)
    src_t, ext_img_t, ext_slot_t, ext_src_t = plan.split([len(src_plan)] + [n_slots] * 3)
    with timed():
        if use_kernel:
            out = kernels.recycle_tokens(hidden, scores, lay.image, lay.valid, keep, row_of,
                                 [pruner.recycle_pick(m) if m else 0 for m in removed], made)
        else:
            out = _recycle_eager(pruner, lay, hidden, keep, scores, groups, src_t, n_img)
    if use_kernel and n_img == bsz and len(set(made)) == 1:  # one image per row, as many tokens: in place
        ext = out.view(bsz, n_extra, width)
    else:
        ext = torch.cat([out, out.new_zeros(1, width)])[ext_src_t].view(bsz, n_extra, width)
    anchor = torch.cat([last_kept % length, last_kept.new_full((1,), -1)])[ext_img_t]
    ext_image = torch.where(ext_img_t < n_img, ext_img_t, -1).view(bsz, n_extra)
    ext_key = (anchor * (n_extra + 1) + 1 + ext_slot_t).view(bsz, n_extra)
    ext_valid = ext_image >= 0
    key = torch.arange(length, device=dev).expand(bsz, -1) * (n_extra + 1)
    valid = torch.cat([lay.valid, ext_valid], 1)
    ext_pos = lay.pos.new_zeros(bsz, n_extra, *lay.pos.shape[2:])
    new = TokenLayout(valid, torch.cat([lay.pos, ext_pos], 1), torch.cat([lay.image, ext_image], 1),
                      torch.cat([lay.orig, torch.full_like(ext_key, -1)], 1))
    keep = torch.cat([keep, ext_valid], 1)
    comp = compact(keep, valid, torch.cat([key, ext_key], 1), new_len, right)
    return new, torch.cat([hidden, ext], 1), comp, None


def _recycle_kernel_runs(pruner, hidden: torch.Tensor, removed: list[int]) -> bool:
    if not pruner.capabilities.recycles:
        return False
    return kernels.runs("tokenprune.recycle",
                        lambda: kernels.recycle_why_not(hidden, [pruner.recycle_pick(m) for m in removed if m]))


def _eager_groups(removed: list[int], made: list[int]) -> tuple[dict, list[int], list[int]]:
    """Images with the same deleted count, recycled in one batched call each: ``{count: images}``, the deleted
    tokens of each group's images (positions in the by-image order of deleted tokens) and every image's first
    row in the recycled tokens (stacked group by group)."""
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(removed):
        if m:
            groups.setdefault(m, []).append(j)
    first = [sum(removed[:j]) for j in range(len(removed))]
    src_plan, first_out, produced = [], [0] * len(removed), 0
    for m, js in groups.items():
        src_plan += [first[j] + i for j in js for i in range(m)]
        for j in js:
            first_out[j] = produced
            produced += made[j]
    return groups, src_plan, first_out


def _recycle_eager(pruner, lay, hidden, keep, scores, groups: dict, src_t: torch.Tensor, n_img: int) -> torch.Tensor:
    """The recycled tokens on eager ops, group by group (see :func:`_eager_groups`)."""
    present = (lay.image >= 0) & lay.valid
    order = torch.sort(torch.where(present & ~keep, lay.image, n_img).flatten(), stable=True).indices  # by image
    flat_h, flat_s = hidden.flatten(0, 1), scores.flatten()
    out, at = [], 0
    for m, js in groups.items():
        src = order[src_t[at : at + len(js) * m]].view(len(js), m)
        at += len(js) * m
        out.append(pruner.recycled(flat_h[src], flat_s[src]).flatten(0, 1).to(hidden.dtype))
    return torch.cat(out)
