"""Adapter for unmodified Hugging Face LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type
``llava_onevision``): :func:`llava_onevision_adapter` picks the class from the method's capabilities.

**Images** are anyres like LLaVA-NeXT (base crop, unpadded crop grid with a newline token per row, bilinearly
shrunk when it exceeds ``vision_aspect_ratio``'s ``anyres_max_N`` crops), so every image has its own number of
placeholder tokens: LLM-stage methods (FastV, PyramidDrop, SparseVLM, DART, ZipVL) and embedding-stage methods
(DivPrune, Uniform, Random, CDPruner; newline tokens are candidates, as on LLaVA-NeXT) run as on LLaVA-NeXT, with 1-D
positions. Vision-stage methods are refused (``NotImplementedError``): OneVision checkpoints use a SigLIP tower, which
has no [CLS] token to score patches with, and the ``anyres_max`` interpolation mixes neighbouring patches, so the
packed tokens are no subset of the crops' patches.

**Videos** (``pixel_values_videos`` (B, F, 3, H, W)): every frame goes through the tower and the projector, is
2×2-bilinearly pooled to ``ceil(side/2)²`` tokens (``side`` = ``image_size // patch_size``), the frames are
concatenated and one newline token closes the video; the prompt holds ``F·P + 1`` video placeholder tokens per
video. Every frame (``P`` tokens, raster order) is one "image" of the prefill, so every method above prunes each
frame to its per-image budget; the closing newline belongs to no frame and is kept like text. ``capabilities.
video_merge`` methods (``temporal-merge``) see each video's ``F × P`` tokens together
(:class:`LlavaOnevisionVideoMergeAdapter`); images of the same prompt pass unchanged. The report's
``extra["frame_kept"]``: per sample, per video, the kept tokens of every frame.
"""

from __future__ import annotations

import math

import torch

from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.hf_embedding import EmbeddingStage, VideoMergeStage
from visattn.tokenprune.hf_llm import LLMStage
from visattn.tokenprune.layout import frame_spans
from visattn.tokenprune.methods import TokenPruner


def _config_id(cfg, name: str) -> int:
    """``cfg.<name>_id`` (``<name>_index`` on configs that only carry the old name)."""
    value = getattr(cfg, f"{name}_id", None)
    return int(value if value is not None else getattr(cfg, f"{name}_index"))


class LlavaOnevisionAdapter(HFVisionLanguageAdapter):
    """The LLaVA-OneVision family part: anyres images, videos split into frames (module docstring)."""

    _PIXEL_VALUES_ARG = None  # images and videos read by keyword, as HF's wrapper passes them

    def frame_tokens(self) -> int:
        """Visual tokens of one video frame: the ``side × side`` patch grid after 2×2 bilinear pooling."""
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return math.ceil(side / 2) ** 2

    def _video_token_id(self) -> int:
        return _config_id(self.model.config, "video_token")

    def _video_frames(self, images: list, videos: list, kwargs: dict) -> tuple[list, list]:
        per = self.frame_tokens()

        def bounds_of(b: int, s: int, e: int) -> list[int]:
            if e - s < per + 1 or (e - s - 1) % per:
                raise ValueError(f"input_ids: a run of {e - s} video tokens in row {b}; LLaVA-OneVision videos "
                                 f"have frames x {per} tokens + 1 newline token")
            return list(range(s, e, per))  # the last bound e - 1: the newline belongs to no frame

        return frame_spans(images, videos, bounds_of)


class LlavaOnevisionEmbeddingAdapter(EmbeddingStage, LlavaOnevisionAdapter):
    """Embedding-stage methods on LLaVA-OneVision images and video frames (positions re-indexed)."""


class LlavaOnevisionLLMAdapter(LLMStage, LlavaOnevisionAdapter):
    """LLM-stage methods on LLaVA-OneVision images and video frames."""


class LlavaOnevisionVideoMergeAdapter(VideoMergeStage, LlavaOnevisionAdapter):
    """``capabilities.video_merge`` methods (TemporalMerge) on LLaVA-OneVision videos (positions re-indexed;
    images and each video's closing newline pass unchanged)."""


#: ``capabilities.stage`` -> LLaVA-OneVision adapter class (no vision stage: SigLIP has no [CLS] token)
STAGE_ADAPTERS: dict[str, type[HFVisionLanguageAdapter]] = {
    "embedding": LlavaOnevisionEmbeddingAdapter,
    "llm": LlavaOnevisionLLMAdapter,
}


def llava_onevision_adapter(model: torch.nn.Module, pruner: TokenPruner,
                            timing: bool = False) -> HFVisionLanguageAdapter:
    """The LLaVA-OneVision adapter for ``pruner``'s capabilities (NotImplementedError for vision-stage methods)."""
    caps = pruner.capabilities
    if caps.video_merge:
        return LlavaOnevisionVideoMergeAdapter(model, pruner, timing=timing)
    if caps.stage not in STAGE_ADAPTERS:
        why = ("its SigLIP vision tower has no [CLS] token to score patches with" if caps.needs_cls_token else
               "the anyres_max packing interpolates patches, so merged or reduced tower tokens have no place in it")
        raise NotImplementedError(f"{pruner.name} on LLaVA-OneVision is not supported: {why}")
    return STAGE_ADAPTERS[caps.stage](model, pruner, timing=timing)
