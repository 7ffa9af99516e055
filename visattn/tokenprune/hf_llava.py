"""Adapter for unmodified Hugging Face LLaVA-1.5 models (``LlavaForConditionalGeneration`` / ``LlavaModel``).

Vision-stage methods (:mod:`visattn.tokenprune.hf_vision` scores them): a pre-hook on the projector replaces the
patch features with the ``k`` kept / merged ones, a post-hook writes the ``k`` projected tokens into the first
``k`` placeholder slots of each image (so HF's placeholder check holds); the language-model pre-hook then removes
the unused slots. ``capabilities.tower_merge`` methods (ToMe) merge inside the CLIP tower and feed the projector
the same way (:class:`ToMeLlavaAdapter`; DyMU's virtual unmerging, ``capabilities.virtual_unmerge``, also carries
each image's merge map to the language model: :mod:`visattn.tokenprune.hf_vtu`). Embedding- and LLM-stage
methods: :mod:`visattn.tokenprune.hf_embedding`, :mod:`visattn.tokenprune.hf_llm`. :func:`llava_adapter` picks
the class from the method's capabilities.
"""

from __future__ import annotations

import torch

from visattn.tokenprune import hf_vtu
from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.hf_embedding import EmbeddingStage
from visattn.tokenprune.hf_llm import LLMStage
from visattn.tokenprune.hf_vision import VisionStage
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.state import Spans, VisionPass
from visattn.tokenprune.tome import ToMeAdapter


class LlavaAdapter(HFVisionLanguageAdapter):
    """The LLaVA-1.5 family part: one image = ``(image_size / patch_size)**2`` placeholder tokens."""

    def _tokens_per_image(self) -> int | None:
        cfg = self.core.vision_tower.config
        return (cfg.image_size // cfg.patch_size) ** 2


class LlavaEmbeddingAdapter(EmbeddingStage, LlavaAdapter):
    """Embedding-stage methods on LLaVA-1.5."""


class LlavaLLMAdapter(LLMStage, LlavaAdapter):
    """LLM-stage methods on LLaVA-1.5."""


class LlavaVisionAdapter(VisionStage, LlavaAdapter):
    """Vision-stage methods on LLaVA-1.5: the reduced tokens go through the projector into the first slots."""

    def _validate_vision(self) -> None:
        self.pruner.output_count(self._tokens_per_image())  # a budget the grid cannot give raises here, at apply

    def _install_vision_output(self) -> None:
        if self.capabilities.cls_hidden:
            layers = self._vision_layers()
            self.handles.append(layers[self.feature_layer].register_forward_hook(self._vision_feature_post))
        proj = self.core.multi_modal_projector
        self.handles.append(proj.register_forward_pre_hook(self._proj_pre))
        self.handles.append(proj.register_forward_hook(self._proj_post))

    def _proj_pre(self, module, args):
        vis = self.vision
        if vis is None or vis.count is not None or (self.capture_layers and not vis.captures):
            return None  # no vision pass, already reduced, or the scored layers did not run
        patches = args[0]
        k = self.pruner.output_count(patches.shape[1])
        if k >= patches.shape[1]:
            vis.captures = {}
            return None
        with self._timed():
            tokens, kept, info = self.pruner.reduce(patches, vis.cls_hidden, self._captures(vis))
        vis.count, vis.kept, vis.captures = patches.shape[1], list(kept), {}
        return (tokens.to(patches.dtype), *args[1:])

    def _proj_post(self, module, args, output):
        vis = self.vision
        if vis is None or vis.count is None or vis.slots_used:
            return None
        full = output.new_zeros(output.shape[0], vis.count, output.shape[-1])
        full[:, : output.shape[1]] = output
        vis.slots_used = output.shape[1]
        return full

    def _vision_keep(self, image_id: torch.Tensor, spans: Spans, vis: VisionPass) -> tuple[torch.Tensor, list]:
        keep, kept, j = image_id < 0, [], 0
        for b, row in enumerate(spans):
            kept_row = []
            for s, e in row:
                n_slots = e - s if vis.count is None else vis.slots_used if vis.slots is None else vis.slots[j]
                keep[b, s : s + n_slots] = True
                kept_row.append(torch.arange(e - s, device=image_id.device) if vis.count is None else vis.kept[j])
                j += 1
            kept.append(kept_row)
        return keep, kept


class ToMeLlavaAdapter(LlavaVisionAdapter):
    """ToMe / DyMU (``capabilities.tower_merge``) in the CLIP tower of a HF LLaVA-1.5 model: the projector's merged
    tokens fill the first slots of each image's placeholder span (DyMU: each image its own count); the unused
    slots are removed before the language model. With ``capabilities.virtual_unmerge`` (DyMU's VTU) the tower
    also reports which patches each merged token of the feature layer holds, and the language model attends as
    over the full sequence (:mod:`visattn.tokenprune.hf_vtu`)."""

    vtu: hf_vtu.VirtualPrefill | None = None
    _vtu_patched: list | None = None

    def _validate(self) -> None:
        if not self.capabilities.tower_merge:
            raise ValueError(f"pruner={self.pruner!r}: ToMeLlavaAdapter needs a method with capabilities.tower_merge")
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
            raise ValueError("model: ToMe needs vision_feature_select_strategy='default' and one feature layer")
        n_vis = len(self._vision_layers())
        hs_index = cfg.vision_feature_layer % (n_vis + 1)
        if hs_index == 0:
            raise ValueError("model: vision_feature_layer selects the embeddings; nothing is merged")
        self.feature_layer = hs_index - 1
        if self.capabilities.virtual_unmerge:
            hf_vtu.check_attention_layers(self.layers)
            if not callable(getattr(self.lm, "rotary_emb", None)):
                raise ValueError(f"model: {type(self.lm).__name__} has no rotary_emb (DyMU's virtual unmerging "
                                 "needs RoPE at the full positions)")
        source_layer = self.feature_layer if self.capabilities.virtual_unmerge else None
        self.tome = ToMeAdapter(self.core.vision_tower, self.pruner, source_layer=source_layer)

    def _install(self) -> None:
        super()._install()
        if self.capabilities.virtual_unmerge:
            self._vtu_patched = hf_vtu.install(self.layers, lambda: self.vtu, self.pruner.virtual_attention)

    def _install_vision(self) -> None:
        self.handles.append(self.core.vision_tower.register_forward_pre_hook(self._vision_start))
        proj = self.core.multi_modal_projector
        self.handles.append(proj.register_forward_pre_hook(self._tome_proj_pre))
        self.handles.append(proj.register_forward_hook(self._proj_post))

    def _tome_proj_pre(self, module, args):
        vis = self.vision
        rep = self.tome.last_report
        if vis is None or rep is None:
            return None
        cfg = self.core.vision_tower.config
        vis.count = (cfg.image_size // cfg.patch_size) ** 2
        origin = rep.extra["origins"][self.feature_layer]
        if self.capabilities.dynamic_merge:  # rows of different lengths: each image fills its own count of slots
            counts = [row[self.feature_layer] for row in rep.extra["row_tokens_per_layer"]]
            vis.kept = [origin[i, 1:c] - 1 for i, c in enumerate(counts)]
            vis.slots = [c - 1 for c in counts]
        else:
            vis.kept = list(origin[:, 1:] - 1)
        if self.capabilities.virtual_unmerge:  # the merged slot of every patch: argmax over each patch's holder
            vis.groups = rep.extra["layer_source"][:, 1:, 1:].argmax(1)
        return None

    def _prefill(self, call, args, kwargs, image_id, valid):
        if not self.capabilities.virtual_unmerge:
            return super()._prefill(call, args, kwargs, image_id, valid)
        groups = None if self.vision is None or self.vision.count is None else self.vision.groups
        full = call.layout
        embeds = kwargs["inputs_embeds"]
        args, kwargs = super()._prefill(call, args, kwargs, image_id, valid)
        cos, sin = self._rope(embeds, full.pos)
        ok = None if bool(full.valid.all()) else full.valid  # no padding: the fused causal attention
        self.vtu = hf_vtu.VirtualPrefill(hf_vtu.merge_map(full, call.layout, call.spans, groups), ok, cos, sin)
        bound = self.bound  # the cache holds the full sequence: decode steps run as after a stock prefill
        bound.fed_len, bound.lm_valid, bound.lm_next_pos = full.valid.shape[1], None, None
        return args, kwargs

    def _core_pre(self, module, args, kwargs):
        self.vtu = None  # a prefill that raised leaves no map behind
        return super()._core_pre(module, args, kwargs)

    def _lm_post(self, module, args, kwargs, output):
        self.vtu = None
        return super()._lm_post(module, args, kwargs, output)

    def remove(self) -> None:
        super().remove()
        self.tome.remove()
        if self._vtu_patched:
            hf_vtu.uninstall(self._vtu_patched)
        self.vtu = None


#: ``capabilities.stage`` -> LLaVA-1.5 adapter class
STAGE_ADAPTERS: dict[str, type[HFVisionLanguageAdapter]] = {
    "vision": LlavaVisionAdapter,
    "embedding": LlavaEmbeddingAdapter,
    "llm": LlavaLLMAdapter,
}


def llava_adapter(model: torch.nn.Module, pruner: TokenPruner, timing: bool = False) -> HFVisionLanguageAdapter:
    """The LLaVA-1.5 adapter for ``pruner``'s capabilities (every stage; ``tower_merge`` in the CLIP tower)."""
    cls = ToMeLlavaAdapter if pruner.capabilities.tower_merge else STAGE_ADAPTERS[pruner.capabilities.stage]
    return cls(model, pruner, timing=timing)
