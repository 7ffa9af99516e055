"""Host-side bookkeeping of a pruned prefill: where every original token sits after each drop, which rows score
(SparseVLM's raters), per-image kept indices for the report. Index plans are built on the host from what is
known there (image spans, row lengths) so that a drop stage reads nothing back from the device."""

from __future__ import annotations

import torch

from visattn.tokenprune.layout import TokenLayout as _Layout


def last_valid(valid: torch.Tensor) -> torch.Tensor:
    ar = torch.arange(valid.shape[1], device=valid.device)
    return (valid.long() * (ar + 1)).argmax(1)


def per_sample(spans: list, flat: list) -> list[list[torch.Tensor]]:
    out, j = [], 0
    for row in spans:
        out.append(flat[j : j + len(row)])
        j += len(row)
    return out


def kept_now(spans: list, lay: _Layout, start: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, per image: original indices (within the image) still present in layout ``lay``.

    ``start`` (images,) holds every image's first index in the LM input. Two host syncs for the whole batch.
    """
    sel = (lay.image >= 0) & lay.valid & (lay.orig >= 0)
    rows, cols = sel.nonzero().unbind(1)
    ids = lay.image[rows, cols]
    order = torch.sort(ids, stable=True).indices  # images are contiguous and ordered; stays a no-op reorder
    ids, orig = ids[order], lay.orig[rows, cols][order]
    counts = torch.bincount(ids, minlength=start.shape[0]).tolist()
    return per_sample(spans, list((orig - start[ids]).split(counts)))


def rater_candidates(spans: list, row_tokens: list[int], right: bool, length: int) -> tuple[list, int, int]:
    """Per row, the LM-input indices of the text tokens after its first image (host lists: the gaps after each
    image up to the next one or the row's end), and the column range [lo, hi) that holds every image."""
    cands = []
    for row, n in zip(spans, row_tokens, strict=False):
        end = n if right else length
        cand: list[int] = []
        for i, (_, e) in enumerate(row):
            cand += range(e, row[i + 1][0] if i + 1 < len(row) else end)
        cands.append(cand)
    lo = min((row[0][0] for row in spans if row), default=0)
    hi = max((row[-1][1] for row in spans if row), default=0)
    return cands, lo, hi


def rater_rows(rater_scores, embeds, image, valid, cands, lo, hi, last: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's query rows (B, T): every text candidate, real where ``rater_scores`` (``SparseVLM.rater_scores``)
    calls it a rater (unused slots hold the row's last valid token ``last[b]``, which also scores a row without
    raters). No host sync: the candidates are known on the host."""
    width = max(max((len(c) for c in cands), default=0), 1)
    padded = [p for c, z in zip(cands, last, strict=True) for p in c + [z] * (width - len(c))]
    flat = padded + [len(c) for c in cands] + last
    plan = torch.tensor(flat, dtype=torch.long).to(embeds.device, non_blocking=True)
    bsz = len(cands)
    t_idx, counts, last_t = plan[: bsz * width].view(bsz, width), plan[bsz * width : -bsz], plan[-bsz:]
    t_ok = torch.arange(width, device=embeds.device)[None] < counts[:, None]
    if hi > lo:
        ok = rater_scores(embeds[:, lo:hi], ((image >= 0) & valid)[:, lo:hi], t_idx, t_ok, embeds)
    else:
        ok = torch.zeros_like(t_ok)
    none = ~ok.any(1)
    ok[:, 0] |= none
    t_idx[:, 0] = torch.where(none, last_t, t_idx[:, 0])
    return t_idx, ok


def moved_rows(rows: torch.Tensor, comp, old_len: int) -> torch.Tensor:
    """Indices ``rows`` (B, R) of kept tokens, mapped through compaction ``comp`` to the new layout."""
    slot = torch.arange(comp.gather.shape[1], device=rows.device).expand_as(comp.gather)
    new_index = torch.full((rows.shape[0], old_len), -1, dtype=torch.long, device=rows.device)
    # padding slots repeat some old index: "amax" with -1 for them keeps the real slot
    new_index.scatter_reduce_(1, comp.gather, torch.where(comp.valid, slot, -1), "amax")
    return new_index.gather(1, rows)


def image_starts(image_id: torch.Tensor, n_images: int) -> torch.Tensor:
    """First LM-input index (n_images,) of every image of the (B, L) ``image_id`` map (-1 = text); no sync."""
    length = image_id.shape[1]
    pos = torch.arange(length, device=image_id.device).expand_as(image_id)
    out = torch.full((n_images + 1,), length, dtype=torch.long, device=image_id.device)
    return out.scatter_reduce_(0, (image_id + 1).flatten(), pos.flatten(), "amin")[1:]


def layout_index(call, lay: _Layout) -> int:
    """Index of ``lay`` in ``call.layouts`` (appended once per distinct layout; counted only for the report)."""
    if not call.layouts or call.layouts[-1] is not lay:
        call.layouts.append(lay)
    return len(call.layouts) - 1
