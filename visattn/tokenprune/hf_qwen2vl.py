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
videos (``pixel_values_videos``), inputs_embeds-only calls.
"""

from __future__ import annotations

import torch

from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.hf_embedding import EmbeddingStage
from visattn.tokenprune.hf_llm import LLMStage
from visattn.tokenprune.layout import TokenLayout as _Layout
from visattn.tokenprune.layout import image_spans, positions_from_valid
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.state import PrefillState


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

    # --------------------------------------------------------------------------------------- prefill
    def _core_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self.call = None
        if kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None:
            raise NotImplementedError("tokenprune on Qwen2-VL: videos are not supported (images only)")
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            return None
        if input_ids is None:
            raise NotImplementedError("tokenprune needs input_ids (not inputs_embeds) to locate image tokens")
        image_mask = input_ids == self.image_token_id
        spans = image_spans(image_mask, None)
        lengths = [e - s for row in spans for s, e in row]
        self.call = PrefillState(image_mask=image_mask, spans=spans, image_lengths=lengths)
        return None


class QwenVLEmbeddingAdapter(EmbeddingStage, QwenVLAdapter):
    """Embedding-stage methods on Qwen2-VL (kept tokens keep their original 3-D positions)."""


class QwenVLLLMAdapter(LLMStage, QwenVLAdapter):
    """LLM-stage methods on Qwen2-VL (3-D positions kept or re-indexed)."""


#: ``capabilities.stage`` -> Qwen2-VL adapter class (no vision stage: the tower has no [CLS] token)
STAGE_ADAPTERS: dict[str, type[HFVisionLanguageAdapter]] = {
    "embedding": QwenVLEmbeddingAdapter,
    "llm": QwenVLLLMAdapter,
}


def qwen_vl_adapter(model: torch.nn.Module, pruner: TokenPruner, timing: bool = False) -> HFVisionLanguageAdapter:
    """The Qwen2-VL adapter for ``pruner``'s capabilities (NotImplementedError for what it cannot serve)."""
    caps = pruner.capabilities
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
