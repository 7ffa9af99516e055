"""What a pruning method declares about itself, so that adapters ask capabilities instead of classes.

Every :class:`~visattn.tokenprune.methods.TokenPruner` subclass carries one frozen :class:`Capabilities` record as
the class attribute ``capabilities``. The adapters read only this record (and call the hooks it promises) to
choose the stage pipeline, install the hooks a method needs and refuse a model / method pair they cannot serve;
no adapter tests a method's class or probes it with ``hasattr``. A leaf module: it imports nothing from visattn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["vision", "embedding", "llm"]
Output = Literal["subset", "dominant_contextual", "merged"]

STAGES: tuple[str, ...] = ("vision", "embedding", "llm")
OUTPUTS: tuple[str, ...] = ("subset", "dominant_contextual", "merged")
POSITION_POLICIES: tuple[str, ...] = ("reindex", "original")


@dataclass(frozen=True)
class Capabilities:
    """A pruning method's declared needs and behaviour (read by the adapters; see docs/TOKENPRUNE.md).

    Attributes:
        stage: where the method runs and which base class's hooks it implements. ``"vision"``: on the vision
            tower's output, before the projector (:class:`~visattn.tokenprune.methods.VisionPruner`:
            ``capture_layers``, ``output_count``, ``reduce``); ``"embedding"``: on the projected visual tokens,
            before the language model (``select(embeddings)``); ``"llm"``: inside the language model's decoder
            layers (:class:`~visattn.tokenprune.methods.LLMPruner`: ``stages``, ``stage_keep``, ``select``).
        cls_attention: scores are the [CLS]→patch attention rows of the vision layers ``capture_layers`` names
            (needs a CLIP-style tower with a [CLS] token at index 0).
        cls_keys: ``reduce`` also needs each captured layer's keys (``captures[idx] = (probs, keys)``).
        fused_capture: the capture hooks only store each layer's input; the adapter scores all of them in one
            batched call (``captures[idx] = (probs, None)``); excludes ``cls_keys``.
        cls_hidden: ``reduce`` needs the feature layer's [CLS] hidden state (``cls_hidden`` argument).
        output: what a vision-stage method's tokens are. ``"subset"``: the top ``output_count`` patches of
            ``patch_scores(captures)``, in patch order (the LLaVA-NeXT packing scores them per packed token);
            ``"dominant_contextual"``: [CLS], the dominant patches ``reduce`` returns the indices of, then
            contextual merged tokens (VisionZip's layout; LLaVA-NeXT lays them out per crop); ``"merged"``: any
            other merge (LLaVA-1.5 only). Embedding- and LLM-stage methods keep a subset.
        tower_merge: the method merges tokens inside the vision tower's encoder layers (ToMe's bipartite soft
            matching: ``schedule(num_layers)``, ``trace_source``, ``prop_attn``); the adapter patches the
            tower's layers instead of hooking [CLS] scores.
        dynamic_merge: ``tower_merge`` with a per-layer similarity threshold instead of a fixed ``r``
            (``layer_thresholds(num_layers)``, ``match(layer, metric, valid, threshold)``): every image merges
            every pair above the threshold, so images of one batch keep different token counts (padded, with a
            key mask) (DyMU).
        virtual_unmerge: ``tower_merge`` whose merged tokens the language model attends as the full, unmerged
            sequence (DyMU's virtual token unmerging): the adapter carries each image's merge map (which patches
            every merged token stands for) to the language model and substitutes every decoder layer's attention
            by the method's ``virtual_attention`` (:mod:`visattn.tokenprune.vtu`); needs a language model (no
            bare tower).
        text_raters: LLM stage: the query rows are text raters picked once per prefill by ``rater_scores``
            (instead of the last token).
        hidden_select: LLM stage: the method scores and selects by itself instead of the attention rows and the
            per-image top-k: at ``score_layer`` the adapter stores ``layer_scores(layer, hidden, cos, sin,
            valid)`` (``valid``: the (B, L) padding mask; any per-token (B, L, ...) tensor), at the drop layer it
            calls ``select_image`` once per image with that image's and its sample's instruction tokens' scores
            and hidden states (the drop layer's input through the language model's final norm) and keeps what it
            returns, any number of tokens (DART, ZipVL); a method that also has ``select_images`` gets all images
            of the batch in one call instead (DART; :func:`visattn.tokenprune.hf_llm.select_hidden_batched`).
        kv_quantize: LLM stage with ``hidden_select``: the selection is not dropped; every token stays, and after the
            prefill the adapter stores the KV cache of the selected (and text) tokens at ``kv_bits[0]`` bits and
            of the unselected visual tokens at ``kv_bits[1]``, in groups of ``kv_group_size``
            (:mod:`~visattn.tokenprune.kvquant`, ZipVL v1).
        recycles: LLM stage: deleted tokens may be recycled into extra tokens placed after each image's kept
            ones (``recycled_count``, ``recycle_pick``, ``recycled``).
        positions: the position policies the method accepts as its ``positions`` argument (the first is its
            default). ``"original"`` keeps the kept tokens' RoPE positions; ``"reindex"`` numbers the pruned
            sequence contiguously.
        text_condition: embedding stage: ``select`` also gets each image's instruction, the language-model input
            embeddings of its sample's text tokens after the sample's first image (``select(embeddings, text,
            text_ok)``: (G, T, D) and (G, T) bool, padded); not served on bare vision towers.
        video_merge: embedding stage, videos only: instead of ``select`` per image the adapter calls
            ``merge_video(frames)`` once per video with its (F, P, D) projected tokens (F frames of P tokens,
            raster order) and feeds the language model the kept tokens with the embeddings it returns (merged
            tokens replace their representative's embedding); images of the same prompt pass unchanged
            (TemporalMerge; Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision only).
        standalone_tower: the method also runs on a bare vision tower (open_clip ``VisionTransformer``, HF
            ``CLIPVisionModel`` for ``tower_merge``) without a language model.
    """

    stage: Stage
    cls_attention: bool = False
    cls_keys: bool = False
    fused_capture: bool = False
    cls_hidden: bool = False
    output: Output = "subset"
    tower_merge: bool = False
    dynamic_merge: bool = False
    virtual_unmerge: bool = False
    text_raters: bool = False
    hidden_select: bool = False
    recycles: bool = False
    kv_quantize: bool = False
    positions: tuple[str, ...] = field(default=("reindex",))
    standalone_tower: bool = False
    text_condition: bool = False
    video_merge: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r}: expected one of {STAGES}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}: expected one of {OUTPUTS}")
        for name in ("cls_attention", "cls_keys", "fused_capture", "cls_hidden", "tower_merge", "text_raters",
                     "recycles", "standalone_tower", "text_condition", "hidden_select", "dynamic_merge", "video_merge",
                     "virtual_unmerge", "kv_quantize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: expected a bool")
        if not isinstance(self.positions, tuple) or not self.positions or any(
                p not in POSITION_POLICIES for p in self.positions):
            raise ValueError(f"positions={self.positions!r}: expected a non-empty tuple of {POSITION_POLICIES}")
        vision_only = ("cls_attention", "cls_keys", "fused_capture", "cls_hidden", "tower_merge")
        if self.stage != "vision" and any(getattr(self, n) for n in vision_only):
            raise ValueError(f"stage={self.stage!r}: {', '.join(n for n in vision_only if getattr(self, n))} "
                             "only apply to vision-stage methods")
        if self.stage != "vision" and self.output != "subset":
            raise ValueError(f"output={self.output!r}: only vision-stage methods merge tokens")
        if self.stage != "llm" and (self.text_raters or self.recycles or self.hidden_select):
            raise ValueError(f"stage={self.stage!r}: text_raters / recycles / hidden_select only apply to LLM-stage "
                             "methods")
        if self.hidden_select and (self.text_raters or self.recycles):
            raise ValueError("hidden_select: the method selects by itself (no text raters, no recycling)")
        if self.kv_quantize and not self.hidden_select:
            raise ValueError("kv_quantize: only for LLM-stage hidden_select methods (their selection marks the "
                             "important tokens)")
        if self.text_condition and (self.stage != "embedding" or self.standalone_tower):
            raise ValueError("text_condition: only embedding-stage methods get the instruction, and a bare tower "
                             "has none (standalone_tower must be False)")
        if self.fused_capture and (self.cls_keys or not self.cls_attention):
            raise ValueError("fused_capture: needs cls_attention and excludes cls_keys (fused scoring keeps no keys)")
        if self.video_merge and (self.stage != "embedding" or self.standalone_tower or self.text_condition):
            raise ValueError("video_merge: only embedding-stage methods without a bare tower or an instruction")
        if self.dynamic_merge and not self.tower_merge:
            raise ValueError("dynamic_merge: only for tower_merge methods (it replaces their fixed r)")
        if self.virtual_unmerge and (not self.tower_merge or self.standalone_tower):
            raise ValueError("virtual_unmerge: only for tower_merge methods served with their language model "
                             "(standalone_tower must be False)")
        if self.tower_merge and self.cls_attention:
            raise ValueError("tower_merge: excludes cls_attention (the tower's own layers merge the tokens)")

    @property
    def merges(self) -> bool:
        """The method's output tokens are not all original tokens (merged / contextual / recycled ones)."""
        return self.output != "subset" or self.tower_merge or self.recycles or self.video_merge

    @property
    def needs_cls_token(self) -> bool:
        """The vision tower must have a [CLS] token (scores, hidden state or ToMe's protected token)."""
        return self.cls_attention or self.cls_hidden or self.tower_merge

    def hooks(self) -> tuple[str, ...]:
        """The method hooks (besides its stage's) that these capabilities promise and the adapters call."""
        out: list[str] = []
        if self.stage == "vision" and not self.tower_merge:
            out += ["capture_layers", "output_count", "reduce"]
        if self.stage == "vision" and self.output == "subset" and not self.tower_merge:
            out.append("patch_scores")
        if self.tower_merge:
            out.append("schedule")
        if self.dynamic_merge:
            out += ["layer_thresholds", "match"]
        if self.virtual_unmerge:
            out.append("virtual_attention")
        if self.stage == "embedding":
            out.append("merge_video" if self.video_merge else "select")
        if self.stage == "llm":
            out += ["stages", "stage_keep", "select"]
        if self.text_raters:
            out.append("rater_scores")
        if self.hidden_select:
            out += ["layer_scores", "select_image"]
        if self.kv_quantize:
            out += ["kv_bits", "kv_group_size"]
        if self.recycles:
            out += ["recycled_count", "recycle_pick", "recycled"]
        return tuple(out)
