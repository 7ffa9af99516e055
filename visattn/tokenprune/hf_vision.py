"""Vision stage of the HF adapters: methods that score patches in the vision tower and reduce them before the
projector (FasterVLM, VTC-CLS, VisionZip, VisPruner, Pooling, ToMe in LLaVA's tower, any ``capabilities.stage ==
"vision"`` method).

Pre-hooks on the vision layers that ``pruner.capture_layers`` names recompute the [CLS] attention row
(``capabilities.fused_capture``: they only store the layer input, and all layers are scored in one batched call
before the reduction); ``capabilities.cls_hidden`` adds a hook on the feature layer for its [CLS] state. Where
the reduced tokens go is the family's part (``_install_vision_output``, ``_vision_keep``: the projector hooks
of :mod:`~visattn.tokenprune.hf_llava`, the packing wrapper of :mod:`~visattn.tokenprune.hf_llava_next`); the
language-model pre-hook then removes the unused placeholder slots.
"""

from __future__ import annotations

import torch

from visattn.tokenprune.hf_base import HFVisionLanguageAdapter, _hidden_arg
from visattn.tokenprune.scoring import clip_cls_attention, cls_attention_captures
from visattn.tokenprune.state import Spans, VisionPass


class VisionStage(HFVisionLanguageAdapter):
    """Stage piece for ``capabilities.stage == "vision"``; a family subclass supplies the output side."""

    def __init__(self, model: torch.nn.Module, pruner, timing: bool = False):
        self._cls_cache: dict = {}  # stacked q/k weights of fused [CLS] scoring
        super().__init__(model, pruner, timing)

    def _vision_layers(self):
        vt = self.core.vision_tower
        vm = getattr(vt, "vision_model", vt)
        return vm.encoder.layers

    def _validate(self) -> None:
        super()._validate()
        self._validate_vision()
        if self.model.config.vision_feature_select_strategy != "default":
            raise NotImplementedError("vision-stage pruning needs vision_feature_select_strategy='default'")
        feat = self.model.config.vision_feature_layer
        if not isinstance(feat, int):
            raise NotImplementedError("vision-stage pruning needs a single vision_feature_layer")
        n_vis = len(self._vision_layers())
        self.capture_layers = self.pruner.capture_layers(n_vis)
        hs_index = feat % (n_vis + 1)
        if hs_index == 0:
            raise NotImplementedError("vision_feature_layer selects the embeddings; nothing to score")
        self.feature_layer = hs_index - 1

    def _validate_vision(self) -> None:
        """Family-specific checks of a vision-stage method (raise NotImplementedError)."""

    def _install(self) -> None:
        super()._install()
        self._install_vision()

    def _install_vision(self) -> None:
        """Capture hooks on the scored layers, then the family's output hooks."""
        layers = self._vision_layers()
        self.handles.append(self.core.vision_tower.register_forward_pre_hook(self._vision_start))
        for idx in self.capture_layers:
            self.handles.append(layers[idx].register_forward_pre_hook(self._make_vision_pre(idx), with_kwargs=True))
        self._install_vision_output()

    def _install_vision_output(self) -> None:
        """Hooks that hand the reduced visual tokens of a vision-stage method to the language model."""
        raise NotImplementedError(f"{self.pruner.name}: vision-stage methods are not supported on "
                                  f"{type(self.model).__name__}")

    def _vision_start(self, module, args):
        self.vision = VisionPass()

    def _make_vision_pre(self, idx: int):
        fused = self.capabilities.fused_capture

        def hook(module, args, kwargs):
            if self.vision is not None and fused:
                self.vision.captures[idx] = _hidden_arg(args, kwargs)  # no ops: scored in _captures
            elif self.vision is not None:
                with self._timed():
                    self.vision.captures[idx] = clip_cls_attention(module, _hidden_arg(args, kwargs))
            return None

        return hook

    def _vision_feature_post(self, module, args, output):
        if self.vision is not None:
            out = output[0] if isinstance(output, tuple) else output
            self.vision.cls_hidden = out[:, 0]

    def _captures(self, vis: VisionPass) -> dict:
        """``{idx: (probs, keys)}``; a fused pruner's raw layer inputs are scored here, in one batched call."""
        if not self.capabilities.fused_capture:
            return vis.captures
        return cls_attention_captures(self._vision_layers(), vis.captures, self._cls_cache)

    def _prefill(self, call, args, kwargs, image_id, valid):
        vis, self.vision = self.vision, None
        if vis is None:
            raise RuntimeError("tokenprune: the vision tower did not run through the pruning hooks")
        keep, call.kept = self._vision_keep(image_id, call.spans, vis)
        return self._drop_lm_input(call, args, kwargs, keep, valid)

    def _vision_keep(self, image_id: torch.Tensor, spans: Spans, vis: VisionPass) -> tuple[torch.Tensor, list]:
        """LM-input keep mask (text + the slots the reduced visual tokens fill) and kept indices per sample / image."""
        raise NotImplementedError
