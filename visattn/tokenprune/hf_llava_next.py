"""Adapter for unmodified Hugging Face LLaVA-NeXT (anyres) models: :func:`llava_next_adapter` picks the class.

LLM- and embedding-stage methods work as on LLaVA-1.5 (:mod:`visattn.tokenprune.hf_llm`,
:mod:`visattn.tokenprune.hf_embedding`); vision-stage ones by ``capabilities.output``:

* ``"subset"`` (FasterVLM, VTC-CLS: a subset of the patches): the [CLS] scores (``patch_scores``) of every crop
  are packed exactly like the features (HF's own ``pack_image_features`` run on the scores: base crop, unpadded
  crop grid, newline tokens), then every image keeps its newline tokens and the top ``output_count(P)`` (=
  ``resolve_budget(keep, P)``) of its ``P`` packed patch tokens (base + unpadded grid; newlines excluded from
  candidates and from the budget).
* ``"dominant_contextual"`` (VisionZip): every crop is reduced on its own ([CLS] + dominant + contextual tokens,
  projected), then laid out as the official VisionZip LLaVA-NeXT code does (see :func:`visionzip_layout`); the
  tokens fill the first slots of the image's placeholder span and the unused slots are removed before the
  language model.
* ``"merged"`` and ``tower_merge`` (ToMe): refused (their tokens have no place in the packed crop grid).
"""

from __future__ import annotations

import torch

from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.hf_embedding import EmbeddingStage
from visattn.tokenprune.hf_llava import LlavaAdapter
from visattn.tokenprune.hf_llm import LLMStage
from visattn.tokenprune.hf_vision import VisionStage
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.selection import topk_in_order
from visattn.tokenprune.state import Spans, VisionPass


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
        sel = cand[topk_in_order(v[cand], pruner.output_count(cand.numel()))]
        kept.append(torch.cat([sel, is_nl.nonzero()[:, 0]]).sort().values)
    return kept


def visionzip_layout(
    tokens: torch.Tensor, dominant: torch.Tensor, grid: tuple[int, int], side: int, newline: torch.Tensor | None
) -> torch.Tensor:
    """Official VisionZip LLaVA-NeXT sequence of one image from its per-crop tokens.

    ``tokens`` (crops, 1 + d + c, D): per crop [CLS], ``d`` dominant tokens (ascending patch index), ``c``
    contextual tokens; ``dominant`` (crops, d) their patch indices; ``grid`` = (rows, cols) of the crop grid;
    ``side`` patches per crop side. Layout: base crop's tokens as they are; then the grid crops' dominant tokens
    in raster order of the whole (rows·side) × (cols·side) patch grid (not unpadded, no newline tokens); then
    the grid crops' [CLS] tokens (crop order); then their contextual tokens (crop order). One crop only: its
    tokens + the newline token (as HF / LLaVA do for a single crop).
    """
    if tokens.shape[0] == 1:
        extra = [] if newline is None else [newline[None].to(tokens)]
        return torch.cat([tokens[0], *extra])
    rows, cols = grid
    d = dominant.shape[1]
    crop = torch.arange(tokens.shape[0] - 1, device=tokens.device)[:, None]
    dom = dominant[1:]
    big_row = (crop // cols) * side + dom // side
    big_col = (crop % cols) * side + dom % side
    order = (big_row * cols * side + big_col).flatten().argsort()
    grid_dom = tokens[1:, 1 : 1 + d].flatten(0, 1)[order]
    return torch.cat([tokens[0], grid_dom, tokens[1:, 0], tokens[1:, 1 + d :].flatten(0, 1)])


def _visionzip_pack(adapter, vis, image_features: list, image_sizes, packed: list) -> list[torch.Tensor]:
    """Replace every image's packed features by its VisionZip tokens (first slots, zeros after)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    pruner, core = adapter.pruner, adapter.core
    patches, vis.patches = vis.patches, None
    n_patches = patches.shape[1]
    if pruner.output_count(n_patches) >= n_patches:
        return packed
    tokens, dom, _ = pruner.reduce(patches, vis.cls_hidden, vis.captures)
    vis.projecting = True
    try:
        tokens = core.multi_modal_projector(tokens.to(patches.dtype))
    finally:
        vis.projecting = False
    vcfg = core.config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    counts = [f.shape[0] for f in image_features]
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes  # one sync, not per image
    out, slots, kept = [], [], []
    for i, (t, d) in enumerate(zip(tokens.split(counts), dom.split(counts), strict=False)):
        grid = get_anyres_image_grid_shape(sizes[i], core.config.image_grid_pinpoints, vcfg.image_size)
        seq = visionzip_layout(t, d, tuple(int(g) for g in grid), side, core.image_newline)
        if seq.shape[0] > packed[i].shape[0]:
            raise ValueError(f"{pruner!r}: image {i} would get {seq.shape[0]} tokens but has only "
                             f"{packed[i].shape[0]} placeholder tokens")
        full = packed[i].new_zeros(packed[i].shape)
        full[: seq.shape[0]] = seq.to(full.dtype)
        out.append(full)
        slots.append(torch.arange(seq.shape[0], device=full.device))
        kept.append(d)
    vis.count, vis.kept, vis.report_kept = n_patches, slots, kept
    return out


def _install_visionzip_hooks(adapter) -> None:
    """Capture the feature layer's [CLS] hidden state and the projector's input (the crops' patch features)."""
    layers = adapter._vision_layers()
    adapter.handles.append(layers[adapter.feature_layer].register_forward_hook(adapter._vision_feature_post))

    def stash(module, args):
        vis = adapter.vision
        if vis is not None and vis.captures and not vis.projecting:
            vis.patches = args[0]

    adapter.handles.append(adapter.core.multi_modal_projector.register_forward_pre_hook(stash))


def install_pack_wrapper(adapter) -> None:
    """Wrap the instance's ``pack_image_features`` to compute the kept packed indices of every image."""
    core = adapter.core
    original = core.pack_image_features
    is_zip = adapter.capabilities.output == "dominant_contextual"
    if is_zip:
        _install_visionzip_hooks(adapter)

    def wrapped(image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        out = original(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        vis = adapter.vision
        if vis is not None and vis.captures:
            with adapter._timed():
                if is_zip:
                    out = (_visionzip_pack(adapter, vis, image_features, image_sizes, out[0]), out[1])
                else:
                    scores = adapter.pruner.patch_scores(adapter._captures(vis))
                    counts = [f.shape[0] for f in image_features]
                    vis.kept = packed_kept(adapter.pruner, list(scores.split(counts)), original, image_sizes,
                                           vision_feature_select_strategy)
                    vis.count = -1
            vis.captures = {}
        return out

    core.pack_image_features = wrapped
    adapter.handles.append(_Restore(core))


class _Restore:
    """Handle that removes the instance-level wrapper (the class method shows through again)."""

    def __init__(self, core: torch.nn.Module):
        self.core = core

    def remove(self) -> None:
        self.core.__dict__.pop("pack_image_features", None)


def next_keep(image_id: torch.Tensor, spans: Spans, vis: VisionPass) -> tuple[torch.Tensor, list]:
    """LM-input keep mask (text + kept packed tokens) and kept indices per sample / image.

    Reported indices: packed positions (FasterVLM, VTC-CLS) or, for VisionZip, the (crops, dominant - 1) patch
    indices of every crop's dominant tokens (row 0 = base crop).
    """
    keep, kept, j = image_id < 0, [], 0
    report = vis.report_kept
    over = []  # per image: largest kept index minus the span length (checked with one host sync)
    for b, row in enumerate(spans):
        kept_row = []
        for s, e in row:
            idx = vis.kept[j] if vis.count is not None else torch.arange(e - s, device=image_id.device)
            if vis.count is not None:
                over.append(idx.max() - (e - s))
            keep[b, s + idx.clamp(max=e - s - 1)] = True
            kept_row.append(report[j] if report is not None else idx)
            j += 1
        kept.append(kept_row)
    if over and bool(torch.stack(over).max() >= 0):
        raise RuntimeError("tokenprune: LLaVA-NeXT packing does not match the image placeholders")
    return keep, kept


class LlavaNextAdapter(LlavaAdapter):
    """The LLaVA-NeXT family part: every image has its own number of placeholder tokens (anyres)."""

    def _tokens_per_image(self) -> int | None:
        return None  # anyres: every image has its own number of placeholder tokens


class LlavaNextEmbeddingAdapter(EmbeddingStage, LlavaNextAdapter):
    """Embedding-stage methods on LLaVA-NeXT (newline tokens are candidates)."""


class LlavaNextLLMAdapter(LLMStage, LlavaNextAdapter):
    """LLM-stage methods on LLaVA-NeXT."""


class LlavaNextVisionAdapter(VisionStage, LlavaNextAdapter):
    """Vision-stage methods on LLaVA-NeXT: scores packed like the features, or VisionZip's per-crop layout."""

    def _validate_vision(self) -> None:
        if self.capabilities.output not in ("subset", "dominant_contextual"):
            raise NotImplementedError(f"{self.pruner.name} on LLaVA-NeXT (anyres packing) is not supported: its "
                                      "merged tokens have no place in the packed crop grid")

    def _install_vision_output(self) -> None:
        install_pack_wrapper(self)

    def _vision_keep(self, image_id: torch.Tensor, spans: Spans, vis: VisionPass) -> tuple[torch.Tensor, list]:
        return next_keep(image_id, spans, vis)


#: ``capabilities.stage`` -> LLaVA-NeXT adapter class
STAGE_ADAPTERS: dict[str, type[HFVisionLanguageAdapter]] = {
    "vision": LlavaNextVisionAdapter,
    "embedding": LlavaNextEmbeddingAdapter,
    "llm": LlavaNextLLMAdapter,
}


def llava_next_adapter(model: torch.nn.Module, pruner: TokenPruner, timing: bool = False) -> HFVisionLanguageAdapter:
    """The LLaVA-NeXT adapter for ``pruner``'s capabilities (``tower_merge`` methods: ValueError)."""
    if pruner.capabilities.tower_merge:
        raise ValueError(f"model={type(model).__name__}: {type(pruner).__name__} on LLaVA-NeXT is not supported "
                         "(it merges inside the vision tower; the anyres packing needs every crop's patches)")
    return STAGE_ADAPTERS[pruner.capabilities.stage](model, pruner, timing=timing)
