"""[CLS]-attention (and embedding-stage) pruning on an open_clip ``VisionTransformer`` built with
``output_tokens=True``: ``visual(images)`` then returns ``(pooled, tokens)`` with only the kept patch tokens, in
spatial order, ready for a LLaVA-style projector.

>>> visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
>>> visual.output_tokens = True
>>> tp.apply(visual, tp.FasterVLM(keep=16, layer=-1))
>>> pooled, tokens = visual(images)          # tokens: (N, 16, width)
>>> tp.last_report(visual).kept_indices      # per image, the kept patch indices

Scores are exact [CLS] rows recomputed from each scored block's own ``in_proj`` weights
(:func:`visattn.tokenprune.scoring.open_clip_cls_attention`; for ``capabilities.fused_capture`` methods such as
VTC-CLS the block inputs are only stored and all blocks are scored at once by
:func:`visattn.tokenprune.scoring.clip_cls_attention_layers`); the blocks themselves run unchanged. Which methods
run here, and which hooks, is read from ``pruner.capabilities`` (vision or embedding stage, ``standalone_tower``).
"""

from __future__ import annotations

import time

import torch

from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.report import PruneReport
from visattn.tokenprune.scoring import cls_attention_captures, open_clip_cls_attention


class OpenClipTowerAdapter:
    """Hooks on an open_clip ``VisionTransformer``: scoring pre-hooks on the scored blocks, a forward hook on the
    tower that replaces its patch tokens by the pruner's kept (or merged) tokens."""

    def __init__(self, model: torch.nn.Module, pruner: TokenPruner, timing: bool = False):
        if type(model).__name__ != "VisionTransformer" or not hasattr(model, "transformer"):
            raise ValueError(f"model={type(model).__name__}: pass the open_clip vision tower (``clip.visual``)")
        if not getattr(model, "output_tokens", False):
            raise ValueError("model: the open_clip tower must be built with output_tokens=True to return tokens")
        if getattr(model, "attn_pool", None) is not None or model.pool_type != "tok":
            raise ValueError("model: needs pool_type='tok' and no attentional pooling (a [CLS] token at index 0)")
        if not model.transformer.batch_first:
            raise ValueError("model: open_clip transformer with batch_first=False is not supported")
        caps = pruner.capabilities
        if caps.stage == "llm" or not caps.standalone_tower:
            raise ValueError(f"pruner={pruner.name!r}: open_clip towers take vision- or embedding-stage methods")
        self.model, self.pruner, self.timing = model, pruner, timing
        self.blocks = model.transformer.resblocks
        self.captures: dict = {}
        self._cls_cache: dict = {}  # stacked q/k weights of fused [CLS] scoring
        self.hidden: torch.Tensor | None = None
        self.events: list = []
        self.last_report: PruneReport | None = None
        self.handles: list = []
        if caps.stage == "vision":
            for idx in pruner.capture_layers(len(self.blocks)):
                self.handles.append(self.blocks[idx].register_forward_pre_hook(self._make_pre(idx)))
            if caps.cls_hidden:
                self.handles.append(model.transformer.register_forward_hook(self._transformer_post))
        self.handles.append(model.register_forward_hook(self._tower_post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _timed_start(self):
        return time.perf_counter() if self.timing else None

    def _make_pre(self, idx: int):
        def hook(module, args):
            if self.pruner.capabilities.fused_capture:  # no ops: scored in _tower_post, all blocks at once
                self.captures[idx] = args[0]
                return
            start = self._timed_start()
            self.captures[idx] = open_clip_cls_attention(module, args[0])
            if start is not None:
                self.events.append((start, time.perf_counter()))

        return hook

    def _transformer_post(self, module, args, output) -> None:
        cls = output[:, 0]
        self.hidden = cls if self.model.final_ln_after_pool else self.model.ln_post(cls)

    def _tower_post(self, module, args, output):
        captures, self.captures = self.captures, {}
        cls_hidden, self.hidden = self.hidden, None
        pooled, tokens = output
        n, p = tokens.shape[:2]
        start = self._timed_start()
        if self.pruner.capabilities.stage == "vision":
            k = self.pruner.output_count(p)
            if k >= p:
                kept_t, idx = tokens, torch.arange(p, device=tokens.device).expand(n, p)
            else:
                if self.pruner.capabilities.fused_capture:
                    captures = cls_attention_captures(self.blocks, captures, self._cls_cache)
                kept_t, idx, _ = self.pruner.reduce(tokens, cls_hidden, captures)
        else:
            idx = self.pruner.select(tokens)
            kept_t = tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))
        events = list(self.events)
        if start is not None:
            events.append((start, time.perf_counter()))
        self.events = []
        kept = kept_t.shape[1]
        rep = PruneReport(
            method=self.pruner.name,
            visual_tokens=[p] * n,
            visual_tokens_kept=[kept] * n,
            visual_tokens_layer_avg=[float(kept)] * n,
            flops_saved=[0.0] * n,
            kept_indices=[[i] for i in idx],
            extra={"flops_scope": "none: the tower runs in full; savings are downstream of it"},
        )
        rep._scoring_events = events
        self.last_report = rep
        return pooled, kept_t.to(tokens.dtype)
