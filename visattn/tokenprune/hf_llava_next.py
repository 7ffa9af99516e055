"""LLaVA-NeXT (anyres) support of the vision-stage methods whose output is a subset of the patches (FasterVLM,
VTC-CLS): the [CLS] scores of every crop are packed exactly like the features (HF's own ``pack_image_features``
run on the scores: base crop, unpadded crop grid, newline tokens), then every image keeps its newline tokens and
the top ``resolve_budget(keep, P)`` of its ``P`` packed patch tokens (base + unpadded grid; newlines excluded
from candidates and from the budget).
"""

from __future__ import annotations

import torch

from visattn.tokenprune.budget import resolve_budget
from visattn.tokenprune.selection import topk_in_order


def packed_kept(pruner, scores: list[torch.Tensor], pack, image_sizes, strategy: str) -> list[torch.Tensor]:
    """Kept packed indices per image; ``scores[i]`` is (crops_i, P) of image i, ``pack`` HF's packing function."""
    feats = [s.float()[..., None] for s in scores]
    newline = torch.full((1,), float("inf"), device=feats[0].device)
    packed, _ = pack(feats, image_sizes, vision_feature_select_strategy=strategy, image_newline=newline)
    kept = []
    for p in packed:
        v = p[:, 0]
        is_nl = torch.isinf(v)
        cand = (~is_nl).nonzero()[:, 0]
        sel = cand[topk_in_order(v[cand], resolve_budget(pruner.keep, cand.numel()))]
        kept.append(torch.cat([sel, is_nl.nonzero()[:, 0]]).sort().values)
    return kept


def install_pack_wrapper(adapter) -> None:
    """Wrap the instance's ``pack_image_features`` to compute the kept packed indices of every image."""
    core = adapter.core
    original = core.pack_image_features

    def wrapped(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        out = original(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        vis = adapter.vision
        if vis is not None and vis.captures:
            with adapter._timed():
                scores = adapter.pruner.patch_scores(vis.captures)
                counts = [f.shape[0] for f in image_features]
                vis.kept = packed_kept(adapter.pruner, list(scores.split(counts)), original, image_sizes,
                                       vision_feature_select_strategy)
            vis.count, vis.captures = -1, {}
        return out

    core.pack_image_features = wrapped
    adapter.handles.append(_Restore(core))


class _Restore:
    """Handle that removes the instance-level wrapper (the class method shows through again)."""

    def __init__(self, core: torch.nn.Module):
        self.core = core

    def remove(self) -> None:
        self.core.__dict__.pop("pack_image_features", None)


def next_keep(image_id: torch.Tensor, spans: list, vis) -> tuple[torch.Tensor, list]:
    """LM-input keep mask (text + kept packed tokens) and kept indices per sample / image."""
    keep, kept, j = image_id < 0, [], 0
    for b, row in enumerate(spans):
        kept_row = []
        for s, e in row:
            idx = vis.kept[j] if vis.count is not None else torch.arange(e - s, device=image_id.device)
            if vis.count is not None and int(idx.max()) >= e - s:
                raise RuntimeError("tokenprune: LLaVA-NeXT packing does not match the image placeholders")
            keep[b, s + idx] = True
            kept_row.append(idx)
            j += 1
        kept.append(kept_row)
    return keep, kept
