"""Sequence layout helpers: compacting kept tokens per row, padding side, masks and position ids.

Rows keep their padding side: left-padded (or unpadded) batches stay left-padded after compaction, right-padded
batches stay right-padded. Kept tokens keep their relative order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    """Result of :func:`compact`: ``gather`` indexes the old layout, ``valid`` marks real tokens of the new one."""

    gather: torch.Tensor  # (B, L') long
    valid: torch.Tensor  # (B, L') bool

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """Gather a ``(B, L, ...)`` tensor into the new layout."""
        idx = self.gather
        if x.dim() > 2:
            idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
        if x.shape[0] == 1 and idx.shape[0] > 1:
            x = x.expand(idx.shape[0], *x.shape[1:])
        return x.gather(1, idx)


def is_right_padded(valid: torch.Tensor) -> bool:
    """True if some row ends with padding (HF right padding)."""
    return bool((~valid[:, -1]).any())


def compact(keep: torch.Tensor, valid: torch.Tensor, order_key: torch.Tensor | None = None,
            new_len: int | None = None, right: bool | None = None) -> Compaction:
    """Pack the tokens with ``keep & valid`` of every row, preserving order and padding side.

    ``order_key`` (B, L) long, optional: kept tokens are ordered by it (ties by index) instead of by index.
    ``new_len`` (the largest row's kept count) and ``right`` (right padding), when the caller knows them on the
    host, save the one device readback.
    """
    sel = keep & valid
    counts = sel.sum(1)
    if new_len is None or right is None:
        new_len, right = torch.stack([counts.max(), (~valid[:, -1]).any().long()]).tolist()  # one host sync
    new_len = max(new_len, 1)
    if order_key is None:
        order = torch.sort((~sel).to(torch.int8), dim=1, stable=True).indices[:, :new_len]
    else:
        big = order_key.max() + 1
        order = torch.sort(torch.where(sel, order_key, big), dim=1, stable=True).indices[:, :new_len]
    ar = torch.arange(new_len, device=keep.device)
    if right:
        new_valid = ar[None, :] < counts[:, None]
        return Compaction(order, new_valid)
    shift = (new_len - counts)[:, None]
    new_valid = ar[None, :] >= shift
    src = (ar[None, :] - shift).clamp(min=0)
    return Compaction(order.gather(1, src), new_valid)


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """HF-style position ids: cumulative count of real tokens minus one; padding gets 0."""
    pos = valid.long().cumsum(-1) - 1
    return pos.masked_fill(~valid, 0)


def attention_mask_4d(
    kv_valid: torch.Tensor, q_len: int, impl: str, dtype: torch.dtype, all_valid: bool | None = None
) -> torch.Tensor | None:
    """Causal + padding mask for the last ``q_len`` queries over ``kv_valid`` (B, Lk) keys.

    Returns a bool mask (True = attend) for SDPA-like implementations, an additive float mask for ``eager``,
    the 2D key mask for flash attention, or ``None`` when SDPA can use its causal kernel. ``all_valid``: whether
    every key is valid, if the caller knows (else read from the device).
    """
    bsz, kv_len = kv_valid.shape
    if all_valid is None:
        all_valid = bool(kv_valid.all())
    if impl.startswith("flash"):
        return None if all_valid else kv_valid.long()
    if impl != "eager" and all_valid and q_len in (1, kv_len):
        return None
    q_abs = torch.arange(kv_len - q_len, kv_len, device=kv_valid.device)
    k_abs = torch.arange(kv_len, device=kv_valid.device)
    allowed = (k_abs[None, :] <= q_abs[:, None])[None] & kv_valid[:, None, :]
    allowed = allowed | (k_abs[None, :] == q_abs[:, None])[None]  # padded query rows see themselves (no NaN)
    allowed = allowed[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=kv_valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def image_spans(image_mask: torch.Tensor, tokens_per_image: int | None = None) -> list[list[tuple[int, int]]]:
    """Per row, ``(start, end)`` of every image: contiguous runs of image tokens, split by ``tokens_per_image``."""
    spans: list[list[tuple[int, int]]] = []
    m = image_mask.to(torch.int8).cpu()
    for row in m:
        padded = torch.cat([torch.zeros(1, dtype=torch.int8), row, torch.zeros(1, dtype=torch.int8)])
        diff = padded[1:] - padded[:-1]
        starts = (diff == 1).nonzero().flatten().tolist()
        ends = (diff == -1).nonzero().flatten().tolist()
        row_spans = []
        for s, e in zip(starts, ends, strict=False):
            if tokens_per_image and (e - s) % tokens_per_image == 0:
                row_spans += [(b, b + tokens_per_image) for b in range(s, e, tokens_per_image)]
            else:
                row_spans.append((s, e))
        spans.append(row_spans)
    return spans


def frame_spans(images: list[list[tuple[int, int]]], videos: list[list[tuple[int, int]]], frame_bounds
                ) -> tuple[list[list[tuple[int, int]]], list[tuple[int, list[int]]]]:
    """Interleave every row's image spans and its videos' frame spans in sequence order (each frame one "image" of
    the prefill).

    ``frame_bounds(row, start, end)`` gives the frame boundaries of one video token run ``[start, end)`` (called
    once per run, rows in order, runs in sequence order): ``[start, b1, ..., last]``, frame ``f`` spanning
    ``[b_f, b_{f+1})``; tokens of the run after ``last`` (LLaVA-OneVision's trailing newline) belong to no frame.
    Returns (per row, the spans; per video, (row, its frames' indices among the row's spans))."""
    spans: list[list[tuple[int, int]]] = []
    frames_of: list[tuple[int, list[int]]] = []
    for b, (img_row, vid_row) in enumerate(zip(images, videos, strict=True)):
        items = sorted([(s, e, False) for s, e in img_row] + [(s, e, True) for s, e in vid_row])
        row: list[tuple[int, int]] = []
        for s, e, is_video in items:
            if not is_video:
                row.append((s, e))
                continue
            bounds = frame_bounds(b, s, e)
            frames_of.append((b, list(range(len(row), len(row) + len(bounds) - 1))))
            row += list(zip(bounds[:-1], bounds[1:], strict=True))
        spans.append(row)
    return spans, frames_of


def select_per_image(image: torch.Tensor, valid: torch.Tensor, counts: list[int], lengths: list[int],
                     select) -> tuple:
    """Run ``select(image_index_or_0, flat)`` on the flat (row * L + col) indices of every image's current tokens.

    ``counts`` (host ints the caller tracks) holds every image's current token count, so no device readback is
    needed: a stable sort by image id groups the tokens. ``flat`` is (G, c) when all images have ``c`` current
    tokens and the same original length (one batched call), else (1, c_j) per image. Returns (keep mask with
    text kept, kept per image, flat index of every image's last kept token).
    """
    present = (image >= 0) & valid
    keep = ~present & valid
    flat_image = torch.where(present, image, len(counts)).flatten()
    flat = torch.sort(flat_image, stable=True).indices[: sum(counts)]  # by image, then position
    flat_keep = keep.view(-1)
    if len(set(counts)) == 1 and len(set(lengths)) == 1 and counts[0] > 0:
        grid = flat.view(len(counts), counts[0])
        sel = select(0, grid)
        picked = grid.gather(1, sel)
        flat_keep[picked.flatten()] = True
        return keep, list(sel), picked[:, -1]
    kept, last = [], []
    start = 0
    for j, c in enumerate(counts):
        grid = flat[start : start + c][None]
        sel = select(j, grid)[0]
        picked = grid[0, sel]
        flat_keep[picked] = True
        kept.append(sel)
        last.append(picked[-1:])
        start += c
    return keep, kept, torch.cat(last)


@dataclass
class TokenLayout:
    """Current LLM-side layout of a prefill: which original token sits where."""

    valid: torch.Tensor  # (B, L) bool
    pos: torch.Tensor  # (B, L) long position ids
    image: torch.Tensor  # (B, L) long: image index within the batch, -1 for text
    orig: torch.Tensor  # (B, L) long: index in the LM input (-1 for merged / recycled tokens)

    def apply(self, comp: Compaction, reindex: bool) -> TokenLayout:
        valid = comp.valid
        vmask = valid.view(*valid.shape, *([1] * (self.pos.dim() - 2)))  # pos is (B, L) or (B, L, 3) (M-RoPE)
        if reindex:
            pos = positions_from_valid(valid)
            pos = pos[..., None].expand(-1, -1, self.pos.shape[2]) if self.pos.dim() == 3 else pos
        else:
            pos = comp.take(self.pos).masked_fill(~vmask, 0)
        return TokenLayout(valid, pos, comp.take(self.image).masked_fill(~valid, -1), comp.take(self.orig))
