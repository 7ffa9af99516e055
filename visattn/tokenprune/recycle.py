"""Token recycling (SparseVLM v1.5): deleted visual tokens merged into a few extra tokens kept after each image."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from visattn.tokenprune.layout import TokenLayout, compact


def append_recycled(pruner, spans: list, lay: TokenLayout, hidden: torch.Tensor, keep: torch.Tensor,
                    scores: torch.Tensor, removed: list[int], last_kept: torch.Tensor, new_len: int | None = None,
                    right: bool | None = None, timed=nullcontext):
    """Append recycled tokens (pruner.recycled) after each image's kept tokens; extends the layout.

    ``removed[j]``: deleted tokens of image ``j`` (host ints); ``last_kept`` (images,): flat (row * L + col) index
    of every image's last kept token; ``new_len`` / ``right``: see :func:`compact`. Images with the same count are
    recycled in one batched call. Everything but the token values is known on the host, so all index plans go up
    in one upload and no device value is read back. ``timed()`` wraps the making of the tokens (the method's own
    work; placing them is layout bookkeeping, as every method's compaction).
    """
    if not getattr(pruner, "recycle", False) or not any(removed):
        return lay, hidden, None, None
    bsz, length = lay.valid.shape
    dev, n_img, width = hidden.device, len(removed), hidden.shape[-1]
    row_of = [b for b, row in enumerate(spans) for _ in row]
    made = [pruner.recycled_count(m) for m in removed]
    slot, used = [], [0] * bsz  # slot of image j's first recycled token in its row's extension
    for j, c in enumerate(made):
        slot.append(used[row_of[j]])
        used[row_of[j]] += c
    n_extra = max(used)
    if n_extra == 0:
        return lay, hidden, None, None
    ext_img, ext_slot = [n_img] * (bsz * n_extra), [0] * (bsz * n_extra)  # every extension slot's image, slot
    for j, c in enumerate(made):
        for i in range(c):
            at = row_of[j] * n_extra + slot[j] + i
            ext_img[at], ext_slot[at] = j, slot[j] + i
    if _recycle_kernel_can_run(pruner, hidden, removed):
        from visattn.kernels.recycle import recycle_tokens

        made_before = [sum(made[:j]) for j in range(n_img)]
        ext_src = [made_before[-1] + made[-1]] * (bsz * n_extra)  # every slot's recycled token (last: zeros)
        for j, c in enumerate(made):
            for i in range(c):
                ext_src[row_of[j] * n_extra + slot[j] + i] = made_before[j] + i
        plan = torch.tensor(ext_img + ext_slot + ext_src, dtype=torch.long).to(dev, non_blocking=True)
        ext_img_t, ext_slot_t, ext_src_t = plan.split(bsz * n_extra)
        with timed():
            out = recycle_tokens(hidden, scores, lay.image, lay.valid, keep, row_of,
                                 [pruner.recycle_pick(m) if m else 0 for m in removed], made)
        if n_img == bsz and len(set(made)) == 1:  # one image per row, as many tokens each: already in place
            ext = out.view(bsz, n_extra, width)
        else:
            ext = torch.cat([out, out.new_zeros(1, width)])[ext_src_t].view(bsz, n_extra, width)
    else:
        with timed():
            ext, ext_img_t, ext_slot_t = _recycle_eager(pruner, lay, hidden, keep, scores, removed, made, row_of,
                                                        slot, n_extra, ext_img, ext_slot)
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


def _recycle_kernel_can_run(pruner, hidden: torch.Tensor, removed: list[int]) -> bool:
    from visattn.kernels import recycle as kernel
    from visattn.tokenprune import scoring

    if scoring.LLM_KERNELS == "eager" or not hasattr(pruner, "recycle_pick"):
        return False
    why = kernel.why_not(hidden, [pruner.recycle_pick(m) for m in removed if m])
    if why is not None and scoring.LLM_KERNELS == "triton":
        raise ValueError(f"LLM_KERNELS='triton': the recycling kernel cannot run: {why}")
    return why is None


def _recycle_eager(pruner, lay, hidden, keep, scores, removed, made, row_of, slot, n_extra, ext_img, ext_slot):
    """The recycled tokens (B, n_extra, C) on eager ops (images with the same deleted count batched), and the
    uploaded per-slot image / slot plans."""
    bsz, length = lay.valid.shape
    dev, n_img, width = hidden.device, len(removed), hidden.shape[-1]
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(removed):
        if m:
            groups.setdefault(m, []).append(j)
    # host plan: the deleted tokens of each group's images (positions in the by-image order), then for every
    # extension slot its row in the recycled tokens (stacked group by group; the last row = padding zeros)
    first = [sum(removed[:j]) for j in range(n_img)]
    src_plan, produced, row_in_out = [], 0, {}
    for m, js in groups.items():
        src_plan += [first[j] + i for j in js for i in range(m)]
        for j in js:
            row_in_out[j] = produced
            produced += made[j]
    ext_src = [produced] * (bsz * n_extra)
    for j, c in enumerate(made):
        for i in range(c):
            ext_src[row_of[j] * n_extra + slot[j] + i] = row_in_out[j] + i
    plan = torch.tensor(src_plan + ext_src + ext_img + ext_slot, dtype=torch.long).to(dev, non_blocking=True)
    src_all, ext_src_t, ext_img_t, ext_slot_t = plan.split([len(src_plan)] + [bsz * n_extra] * 3)
    present = (lay.image >= 0) & lay.valid
    order = torch.sort(torch.where(present & ~keep, lay.image, n_img).flatten(), stable=True).indices
    flat_h, flat_s = hidden.flatten(0, 1), scores.flatten()
    out, at = [], 0
    for m, js in groups.items():
        src = order[src_all[at : at + len(js) * m]].view(len(js), m)
        at += len(js) * m
        out.append(pruner.recycled(flat_h[src], flat_s[src]).flatten(0, 1).to(hidden.dtype))
    out.append(hidden.new_zeros(1, width))  # the padding slots' source
    return torch.cat(out)[ext_src_t].view(bsz, n_extra, width), ext_img_t, ext_slot_t
