"""Token recycling (SparseVLM v1.5): deleted visual tokens merged into a few extra tokens kept after each image."""

from __future__ import annotations

import torch

from visattn.tokenprune.layout import TokenLayout, compact


def append_recycled(pruner, spans: list, lay: TokenLayout, hidden: torch.Tensor, keep: torch.Tensor,
                    scores: torch.Tensor, removed: list[int]):
    """Append recycled tokens (pruner.recycled) after each image's kept tokens; extends the layout.

    ``removed[j]``: deleted tokens of image ``j`` (host ints). Images with the same count are recycled in one
    batched call; the only host-device transfer is one upload of the (host-known) slot indices.
    """
    if not getattr(pruner, "recycle", False) or not any(removed):
        return lay, hidden, None, None
    bsz, length = lay.valid.shape
    dev, n_img = hidden.device, len(removed)
    row_of = [b for b, row in enumerate(spans) for _ in row]
    made = [pruner.recycled_count(m) for m in removed]
    slot, used = [], [0] * bsz  # slot of image j's first recycled token in its row's extension
    for j, c in enumerate(made):
        slot.append(used[row_of[j]])
        used[row_of[j]] += c
    n_extra = max(used)
    if n_extra == 0:
        return lay, hidden, None, None
    start = [sum(removed[:j]) for j in range(n_img)]
    groups: dict[int, list[int]] = {}
    for j, m in enumerate(removed):
        if m:
            groups.setdefault(m, []).append(j)
    # one upload: per group its images, their first deleted token in the sorted order and their first slot
    meta = [v for js in groups.values() for v in (*js, *(start[j] for j in js),
                                                  *(row_of[j] * n_extra + slot[j] for j in js))]
    meta = torch.tensor(meta, dtype=torch.long).to(dev, non_blocking=True)
    present = (lay.image >= 0) & lay.valid
    ar = torch.arange(length, device=dev).expand(bsz, -1)
    flat_ids = torch.where(present & ~keep, lay.image, n_img).flatten()
    order = torch.sort(flat_ids, stable=True).indices  # deleted tokens by image, then position
    kept_pos = torch.where(present & keep, ar, -1).flatten()
    anchor = torch.full((n_img + 1,), -1, dtype=torch.long, device=dev).scatter_reduce_(
        0, torch.where(present & keep, lay.image, n_img).flatten(), kept_pos, "amax")
    ext = hidden.new_zeros(bsz * n_extra, hidden.shape[-1])
    ext_image = torch.full((bsz * n_extra,), -1, dtype=torch.long, device=dev)
    ext_key = torch.zeros(bsz * n_extra, dtype=torch.long, device=dev)
    flat_h, flat_s, off = hidden.flatten(0, 1), scores.flatten(), 0
    for m, js in groups.items():
        g, c = len(js), pruner.recycled_count(m)
        img, first, dest0 = meta[off : off + g], meta[off + g : off + 2 * g], meta[off + 2 * g : off + 3 * g]
        off += 3 * g
        src = order[first[:, None] + torch.arange(m, device=dev)]
        tokens = pruner.recycled(flat_h[src], flat_s[src])
        dest = (dest0[:, None] + torch.arange(c, device=dev)).flatten()
        ext[dest] = tokens.flatten(0, 1).to(ext.dtype)
        ext_image[dest] = img.repeat_interleave(c)
        ext_key[dest] = anchor[img].repeat_interleave(c) * (n_extra + 1) + 1 + dest % n_extra
    ext, ext_image, ext_key = ext.view(bsz, n_extra, -1), ext_image.view(bsz, -1), ext_key.view(bsz, -1)
    ext_valid = ext_image >= 0
    key = ar * (n_extra + 1)
    valid = torch.cat([lay.valid, ext_valid], 1)
    ext_pos = lay.pos.new_zeros(bsz, n_extra, *lay.pos.shape[2:])
    new = TokenLayout(valid, torch.cat([lay.pos, ext_pos], 1), torch.cat([lay.image, ext_image], 1),
                  torch.cat([lay.orig, torch.full_like(ext_key, -1)], 1))
    keep = torch.cat([keep, ext_valid], 1)
    comp = compact(keep, valid, torch.cat([key, ext_key], 1))
    return new, torch.cat([hidden, ext], 1), comp, None
