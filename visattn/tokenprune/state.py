"""Typed state of the HF adapters: one vision-tower pass, one pruned prefill, and what its decode steps need."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from visattn.tokenprune.layout import TokenLayout

#: per sample, per image: (start, end) of the image's placeholder tokens in the language-model input
Spans = list[list[tuple[int, int]]]


@dataclass
class VisionPass:
    """One vision-tower pass (HF may run it before the model forward, e.g. inside ``generate``)."""

    captures: dict[int, object] = field(default_factory=dict)  # layer -> (probs, keys) or its raw input (fused)
    cls_hidden: torch.Tensor | None = None  # (N, C) [CLS] state of the feature layer (VisionZip)
    kept: list[torch.Tensor] = field(default_factory=list)  # per image: kept patch (or packed) indices
    count: int | None = None  # patches per image before the reduction (-1: LLaVA-NeXT packed); None = untouched
    slots_used: int = 0  # placeholder slots the reduced tokens fill (LLaVA)
    slots: list[int] | None = None  # per image, when images fill different numbers of slots (LLaVA + DyMU)
    groups: torch.Tensor | None = None  # (images, patches): merged slot holding each patch (DyMU's VTU)
    patches: torch.Tensor | None = None  # projector input of LLaVA-NeXT VisionZip (every crop's patches)
    projecting: bool = False  # LLaVA-NeXT VisionZip is running the projector on its own tokens
    report_kept: list[torch.Tensor] | None = None  # LLaVA-NeXT VisionZip: the dominant patch indices per image


@dataclass
class PrefillState:
    """One pruned prefill forward, from the model's pre-hook to the language model's post-hook."""

    image_mask: torch.Tensor  # (B, L) bool: image placeholder tokens of input_ids
    spans: Spans
    image_lengths: list[int] = field(default_factory=list)  # tokens of every image (batch order)
    layout: TokenLayout | None = None  # where every original token sits now
    pos_in: torch.Tensor | None = None  # position ids the language model received, (B, L) or (B, L, 3)
    lm_len: int = 0  # language-model input length before any drop
    kept: list[list[torch.Tensor]] | None = None  # vision / embedding stage: per sample, per image, kept indices
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # LLM stage index -> (B, L) scores
    substitute: dict[str, object] | None = None  # decoder-layer kwargs replaced after the last drop
    per_layer: list[int] = field(default_factory=list)  # per decoder layer: index into ``layouts``
    layouts: list[TokenLayout] = field(default_factory=list)  # distinct layouts the decoder layers saw
    stage_layouts: list[TokenLayout] = field(default_factory=list)  # layout after each drop (for the report)
    stage_selected: list[list[list[torch.Tensor]]] = field(default_factory=list)  # per drop, per sample, per image
    score_rows: torch.Tensor | None = None  # (B, R) current indices of SparseVLM's raters; None: the last token
    score_ok: torch.Tensor | None = None  # (B, R) which of them are real
    image_start: torch.Tensor | None = None  # (images,) first LM-input index of every image
    # host-side bookkeeping of LLM-stage drops (no device readback per stage)
    image_counts: list[int] = field(default_factory=list)  # current tokens per image
    row_tokens: list[int] = field(default_factory=list)  # current valid tokens per row
    right_padded: bool = False
    kv_important: torch.Tensor | None = None  # (B, L) capabilities.kv_quantize: the high-precision cache columns
    kv_bytes: tuple[list[int], list[int]] | None = None  # per sample: KV bytes stored, the same tokens in float16
    # videos (Qwen2-VL): every frame is one "image" of ``spans``; per video: (sample, its frames' indices within
    # the sample's images)
    videos: list[tuple[int, list[int]]] = field(default_factory=list)


@dataclass
class DecodeBinding:
    """What decode steps on the prefill's KV cache need to translate masks and positions."""

    cache: object  # the transformers Cache object the prefill filled
    lm_len: int  # language-model input length of the prefill before pruning
    fed_len: int = 0  # tokens the language model received (its cache length after the prefill)
    lm_valid: torch.Tensor | None = None  # (B, fed_len) set when the LM input itself was compacted
    lm_next_pos: torch.Tensor | None = None  # (B, 1) position of the first generated token
    stages: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (layer, valid, next_pos)
