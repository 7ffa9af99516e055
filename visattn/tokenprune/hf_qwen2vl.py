"""Adapter for unmodified Hugging Face Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``), forward hooks only, a sibling of the LLaVA adapters on
:class:`~visattn.tokenprune.hf_base.HFVisionLanguageAdapter`.

Qwen2-VL feeds the LLM 3-D M-RoPE position ids (temporal, height, width) computed by the model from
``image_grid_thw`` (``get_rope_index``; 2×2 merged patches per visual token); decode steps continue at
``rope_deltas`` + text position. The adapter never recomputes them: it takes the ids the language model receives
(``(3, B, L)``, or ``(4, B, L)`` with the text row first, or ``(B, L)``) and carries them as a ``(B, L, 3)``
layout through the pruning:

* **FastV / PyramidDrop / DART** (LLM stage): ``positions="original"`` keeps every kept token's 3-D position ids
  (rotary embeddings recomputed from the gathered ids for the layers after the drop); decode positions are the
  model's own (``rope_deltas``), so nothing changes in decode but the shorter KV mask. ``positions="reindex"``
  numbers the pruned sequence 0..n−1 on all three axes (like text) and continues decode after the pruned length.
* **DivPrune / Uniform / Random / CDPruner** (on the merged visual embeddings, before the LLM): the kept tokens keep
  their **original** 3-D position ids (the M-RoPE grid of the image is not re-derived for a subset); decode
  continues at ``max(position) + 1`` of the unpruned prompt, exactly the model's ``rope_deltas`` continuation.

Not supported (``NotImplementedError``, decided from ``pruner.capabilities`` by :func:`qwen_vl_adapter`):
vision-stage methods (FasterVLM, VTC-CLS, VisionZip, VisPruner: Qwen2-VL's vision tower has no [CLS] token to score
patches with; Pooling: a pooled token has no M-RoPE position; ToMe: no CLIP-style tower), LLM-stage methods with
``text_raters`` or ``recycles`` (SparseVLM: recycled tokens have no M-RoPE position, the raters are untested here),
inputs_embeds-only calls.

Videos (``pixel_values_videos`` + ``video_grid_thw``): every frame (temporal grid step, ``h*w/merge²`` tokens) is
one "image" of the prefill, so every supported method prunes each frame to its per-image budget; kept tokens keep
their original 3-D positions. ``capabilities.video_merge`` methods (``temporal-merge``) see each video's frames
together (:class:`QwenVLVideoMergeAdapter`). The report's ``extra["frame_kept"]``: per sample, per video, the kept
tokens of every frame.
"""

from __future__ import annotations

import torch

from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.hf_embedding import EmbeddingStage, VideoMergeStage
from visattn.tokenprune.hf_llm import LLMStage
from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import frame_spans, positions_from_valid
from visattn.tokenprune.methods import TokenPruner


class QwenVLAdapter(HFVisionLanguageAdapter):
    """The Qwen2-VL / Qwen2.5-VL family part: M-RoPE positions, image-only prefills."""

    # -------------------------------------------------------------------------------------- positions
    def _reindex(self) -> bool:
        return self.capabilities.stage == "llm" and self.pruner.positions == "reindex"

    def _positions_in(self, pos_in: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """The LM's position ids as (B, L, 3)."""
        if pos_in is None:
            return positions_from_valid(valid)[..., None].expand(-1, -1, 3)
        if pos_in.dim() == 2:
            return pos_in.expand(valid.shape[0], -1)[..., None].expand(-1, -1, 3)
        if pos_in.shape[0] == 4:  # text row + 3-D rows (transformers >= 5.2x generate)
            pos_in = pos_in[1:]
        return pos_in.expand(3, valid.shape[0], -1).permute(1, 2, 0)

    def _lm_position_kwarg(self, pos: torch.Tensor) -> torch.Tensor:
        return pos.permute(2, 0, 1)

    def _layer_position_kwarg(self, pos: torch.Tensor) -> None:
        return None  # Qwen2-VL decoder layers get text positions only for packed flash-attention inputs

    def _rope(self, hidden: torch.Tensor, pos: torch.Tensor):
        ids = pos.permute(2, 0, 1) if pos.dim() == 3 else pos[None].expand(3, -1, -1)  # 5.17 needs (3, B, L)
        return self.lm.rotary_emb(hidden, ids)

    def _next_pos(self, lay: _Layout) -> torch.Tensor:
        return lay.pos.masked_fill(~lay.valid[..., None], -1).amax((1, 2))[:, None] + 1

    def decode_layers(self):
        """Not for Qwen2-VL: its decode positions are the model's M-RoPE ids with rope deltas, not one (B, 1)
        position per layer layout."""
        raise NotImplementedError("decode_layers: Qwen2-VL / Qwen2.5-VL decode positions (M-RoPE with rope deltas) "
                                  "are not described per layer; decode them with generate()")

    # --------------------------------------------------------------------------------------- prefill
    _PIXEL_VALUES_ARG = None  # the core model's second argument is attention_mask

    def _video_token_id(self) -> int:
        return self.model.config.video_token_id

    def _video_frames(self, images: list, videos: list, kwargs: dict) -> tuple[list, list]:
        """Per row, the images' spans and every video frame's span in sequence order (each frame one "image" of
        the prefill); per video, (row, its frames' indices among the row's spans).

        Frames come from ``video_grid_thw`` (``h*w/merge²`` tokens each) when the call has it; ``generate``
        encodes the videos beforehand and passes neither pixels nor grid, only the 3-D position ids: there a new
        frame starts wherever the (height, width) ids return to the video's first token's (each frame numbers its
        own grid; the temporal id alone may repeat on Qwen2.5-VL)."""
        grid_thw, position_ids = kwargs.get("video_grid_thw"), kwargs.get("position_ids")
        grids = grid_thw.tolist() if grid_thw is not None else None
        hw = None
        if grids is None:
            if position_ids is None or position_ids.dim() != 3:
                raise ValueError("video_grid_thw: needed to split video tokens into frames (got None, and no 3-D "
                                 "position_ids)")
            hw = position_ids[-2:].expand(2, len(videos), -1).permute(1, 2, 0).tolist()  # (B, L, (h, w))
        merge = self.model.config.vision_config.spatial_merge_size
        g = 0

        def bounds_of(b: int, s: int, e: int) -> list[int]:
            nonlocal g
            if grids is not None:
                if g >= len(grids):
                    raise ValueError(f"video_grid_thw: {len(grids)} rows for more video token runs")
                t, h, w = grids[g]
                per = h * w // merge**2
                if per * t != e - s:
                    raise ValueError(f"video_grid_thw: row {g} {grids[g]} means {per * t} video tokens, the "
                                     f"prompt has a run of {e - s}")
                g += 1
                return [s + f * per for f in range(t + 1)]
            ids = hw[b]  # every frame restarts the (height, width) grid of M-RoPE ids
            return [i for i in range(s, e) if ids[i] == ids[s]] + [e]

        return frame_spans(images, videos, bounds_of)


class QwenVLEmbeddingAdapter(EmbeddingStage, QwenVLAdapter):
    """Embedding-stage methods on Qwen2-VL (kept tokens keep their original 3-D positions)."""


class QwenVLLLMAdapter(LLMStage, QwenVLAdapter):
    """LLM-stage methods on Qwen2-VL (3-D positions kept or re-indexed)."""


class QwenVLVideoMergeAdapter(VideoMergeStage, QwenVLAdapter):
    """``capabilities.video_merge`` methods (TemporalMerge) on Qwen2-VL videos: kept tokens keep their original
    3-D positions, merged ones their first occurrence's; images pass unchanged."""


#: ``capabilities.stage`` -> Qwen2-VL adapter class (no vision stage: the tower has no [CLS] token)
STAGE_ADAPTERS: dict[str, type[HFVisionLanguageAdapter]] = {
    "embedding": QwenVLEmbeddingAdapter,
    "llm": QwenVLLLMAdapter,
}


def qwen_vl_adapter(model: torch.nn.Module, pruner: TokenPruner, timing: bool = False) -> HFVisionLanguageAdapter:
    """The Qwen2-VL adapter for ``pruner``'s capabilities (NotImplementedError for what it cannot serve)."""
    caps = pruner.capabilities
    if caps.video_merge:
        return QwenVLVideoMergeAdapter(model, pruner, timing=timing)
    if caps.tower_merge:
        raise NotImplementedError(f"{type(pruner).__name__} on Qwen2-VL is not supported (no CLIP-style vision "
                                  "tower)")
    if caps.stage not in STAGE_ADAPTERS:
        why = "its vision tower has no [CLS] token to score patches with" if caps.needs_cls_token else (
            "vision-stage methods have no hook point in its vision tower")
        raise NotImplementedError(f"{pruner.name} on Qwen2-VL is not supported: {why}")
    if caps.text_raters or caps.recycles:
        raise NotImplementedError(f"{pruner.name} on Qwen2-VL is not supported (recycled tokens have no M-RoPE "
                                  "position; text raters are untested with M-RoPE)")
    return STAGE_ADAPTERS[caps.stage](model, pruner, timing=timing)
