"""Pruning methods: each is a scorer + a selector, attached to a pipeline by an adapter.

Stages:
* ``"vision"``: scores come from the vision tower ([CLS] attention); tokens are removed (or merged) before the
  projector, so the LLM sees ``keep`` visual tokens per image at every layer (positions re-indexed).
* ``"embedding"``: selection on the projected visual tokens (no attention needed), before the LLM.
* ``"llm"``: scores come from text-token attention inside the LLM; tokens are dropped from a given layer on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, TypeVar

import torch

from visattn.tokenprune.budget import Budget, check_budget, check_increasing, check_layer, resolve_budget
from visattn.tokenprune.capabilities import POSITION_POLICIES, Capabilities
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.selection import contextual_merge, maxmin_diversity, topk_in_order

F = TypeVar("F", bound=Callable[..., Any])


def _check_index(value: object, name: str) -> int:
    """A layer index that may count from the end (negative): any int, bools excluded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: expected an int")
    return value


def _check_positions(value: str, supported: tuple[str, ...] = POSITION_POLICIES) -> str:
    if value not in supported:
        raise ValueError(f"positions={value!r}: expected one of {supported}")
    return value


def unimplemented(fn: F) -> F:
    """Mark a base-class hook that a subclass must override when its capabilities promise it."""
    fn.__tokenprune_unimplemented__ = True  # type: ignore[attr-defined]
    return fn


@dataclass
class LLMStage:
    """Drop visual tokens right before decoder layer ``layer``; scores from ``score_layer``'s attention."""

    layer: int
    budget: Budget
    score_layer: int


class TokenPruner:
    """Base class of every method.

    A subclass sets ``name`` (reports), declares ``capabilities`` (a frozen
    :class:`~visattn.tokenprune.capabilities.Capabilities`: its stage, what it needs, what it produces) and
    implements the hooks those capabilities promise (:meth:`Capabilities.hooks`); ``positions`` is the chosen
    position policy (one of ``capabilities.positions``). Register it with
    :func:`~visattn.tokenprune.registry.register_method` and every adapter serves it; no other edit is needed.
    """

    name = "base"
    capabilities: ClassVar[Capabilities] = Capabilities(stage="vision")
    positions = "reindex"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.__dict__.get("capabilities", cls.capabilities), Capabilities):
            raise TypeError(f"{cls.__name__}.capabilities must be a visattn.tokenprune.capabilities.Capabilities")

    @property
    def stage(self) -> str:
        """``capabilities.stage``: ``"vision"``, ``"embedding"`` or ``"llm"``."""
        return self.capabilities.stage

    @classmethod
    def from_keep(cls, keep: Any, **kwargs: Any) -> TokenPruner:
        """Build the method from a ``keep`` budget (``create(name, keep=...)``); override to map ``keep`` onto
        other arguments (VisionZip: a total token count split into dominant + contextual)."""
        return cls(keep=keep, **kwargs)

    def missing_hooks(self) -> list[str]:
        """Hooks that ``capabilities`` promise but the class does not implement (checked by ``apply``)."""
        missing = []
        for hook in self.capabilities.hooks():
            fn = getattr(type(self), hook, None)
            if fn is None or getattr(fn, "__tokenprune_unimplemented__", False):
                missing.append(hook)
        return missing

    def config(self) -> dict:
        """Constructor arguments, for reports."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------------------------- vision stage
class VisionPruner(TokenPruner):
    """Scores from [CLS] attention of vision-encoder layers (indexed like HF ``attentions[i]``)."""

    capabilities = Capabilities(stage="vision", cls_attention=True, cls_keys=True, standalone_tower=True)

    @unimplemented
    def capture_layers(self, num_layers: int) -> list[int]:
        """Vision layers (0-based, of ``num_layers``) whose [CLS] attention ``reduce`` needs."""
        raise NotImplementedError

    @unimplemented
    def output_count(self, num_patches: int) -> int:
        """Tokens ``reduce`` returns per image of ``num_patches`` patches (>= ``num_patches``: nothing is cut)."""
        raise NotImplementedError

    @unimplemented
    def patch_scores(self, captures: dict) -> torch.Tensor:
        """``output="subset"`` methods: one score per patch (N, P) from ``captures`` (``{idx: (probs, keys)}``)."""
        raise NotImplementedError

    @unimplemented
    def reduce(
        self, patches: torch.Tensor, cls_hidden: torch.Tensor | None, captures: dict
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``patches`` (N, P, C) → (tokens (N, k, C), kept patch indices (N, k'), extra info)."""
        raise NotImplementedError


def _resolve_vision_layer(layer: int, num_layers: int, name: str) -> int:
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"{name}={layer}: the vision tower has {num_layers} layers")
    return layer % num_layers


@register_method("fastervlm", "faster-vlm")
class FasterVLM(VisionPruner):
    """[CLS]→patch attention of one vision layer (default ``attentions[-2]``), heads averaged, top-``keep``."""

    name = "fastervlm"
    capabilities = Capabilities(stage="vision", cls_attention=True, cls_keys=True, standalone_tower=True)

    def __init__(self, keep: Budget = 0.25, layer: int = -2):
        self.keep = check_budget(keep, "keep")
        self.layer = _check_index(layer, "layer")

    def capture_layers(self, num_layers: int) -> list[int]:
        return [_resolve_vision_layer(self.layer, num_layers, "layer")]

    def output_count(self, num_patches: int) -> int:
        return resolve_budget(self.keep, num_patches)

    def patch_scores(self, captures: dict) -> torch.Tensor:
        (probs, _), = captures.values()
        return probs.mean(1)[:, 1:]

    def reduce(self, patches, cls_hidden, captures):
        idx = topk_in_order(self.patch_scores(captures), self.output_count(patches.shape[1]))
        return patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1])), idx, {}


@register_method("vtc-cls", "vtccls", "vtc_cls")
class VTCCLS(FasterVLM):
    """VTC-CLS: [CLS]→patch attention, heads averaged, summed over layers ``start_layer .. last-1`` (exclusive)."""

    name = "vtc-cls"
    # many layers, no keys needed: score them all in one batched call
    capabilities = replace(FasterVLM.capabilities, cls_keys=False, fused_capture=True)

    def __init__(self, keep: Budget = 0.25, start_layer: int = 12, end_layer: int = -1):
        self.keep = check_budget(keep, "keep")
        self.start_layer = _check_index(start_layer, "start_layer")
        self.end_layer = _check_index(end_layer, "end_layer")

    def capture_layers(self, num_layers: int) -> list[int]:
        start = _resolve_vision_layer(self.start_layer, num_layers, "start_layer")
        end = self.end_layer % num_layers if -num_layers <= self.end_layer < 0 else self.end_layer
        if not start < end <= num_layers:
            raise ValueError(f"start_layer={self.start_layer}, end_layer={self.end_layer}: empty layer range")
        return list(range(start, end))

    def patch_scores(self, captures: dict) -> torch.Tensor:
        probs = torch.stack([p for p, _ in captures.values()])  # (L, B, H, S)
        return probs.mean(2)[..., 1:].sum(0)


@register_method("visionzip", "vision-zip")
class VisionZip(VisionPruner):
    """VisionZip: ``dominant`` tokens ([CLS] + top [CLS]-attention patches, heads summed) + ``contextual`` tokens
    merged by key similarity, all from vision layer ``layer`` (default -2, as LLaVA's feature layer)."""

    name = "visionzip"
    capabilities = Capabilities(stage="vision", cls_attention=True, cls_keys=True, cls_hidden=True,
                                output="dominant_contextual", standalone_tower=True)

    def __init__(self, dominant: int = 54, contextual: int = 10, layer: int = -2):
        self.dominant = check_layer(dominant, "dominant", 2)
        self.contextual = check_layer(contextual, "contextual", 1)
        self.layer = _check_index(layer, "layer")

    @classmethod
    def from_keep(cls, keep: int = 64, **kwargs) -> VisionZip:
        """``keep`` tokens in total, split as the paper does for 64 / 128 / 192 (``dominant = round(54/64 keep)``)."""
        if isinstance(keep, float):
            raise ValueError(f"keep={keep!r}: VisionZip needs a token count (dominant + contextual)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 3:
            raise ValueError(f"keep={keep!r}: VisionZip needs an int >= 3")
        dominant = max(2, round(keep * 54 / 64))
        return cls(dominant=dominant, contextual=max(1, keep - dominant), **kwargs)

    def capture_layers(self, num_layers: int) -> list[int]:
        return [_resolve_vision_layer(self.layer, num_layers, "layer")]

    def output_count(self, num_patches: int) -> int:
        return min(self.dominant + self.contextual, num_patches + 1)

    def reduce(self, patches, cls_hidden, captures):
        (probs, keys), = captures.values()
        n_patches = patches.shape[1]
        n_dom = min(self.dominant - 1, n_patches)
        dom = topk_in_order(probs.sum(1)[:, 1:], n_dom)
        tokens = [cls_hidden[:, None], patches.gather(1, dom[..., None].expand(-1, -1, patches.shape[-1]))]
        info: dict = {"dominant": dom}
        rest_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        rest_mask.scatter_(1, dom, False)
        n_rest = n_patches - n_dom
        if n_rest > 0:
            rest = torch.sort((~rest_mask).to(torch.int8), dim=1, stable=True).indices[:, :n_rest]  # no sync
            metric = keys[:, 1:].mean(2)
            hid = patches.gather(1, rest[..., None].expand(-1, -1, patches.shape[-1]))
            met = metric.gather(1, rest[..., None].expand(-1, -1, metric.shape[-1]))
            ctx, targets, assign = contextual_merge(hid, met, self.contextual)
            tokens.append(ctx)
            info.update(contextual_targets=rest[:, targets], rest=rest, assignment=assign)
        return torch.cat(tokens, 1), dom, info


# -------------------------------------------------------------------------------------------- embedding stage
class EmbeddingPruner(TokenPruner):
    """Selects ``keep`` tokens per image from the projected visual tokens (before the LLM)."""

    capabilities = Capabilities(stage="embedding", standalone_tower=True)

    def __init__(self, keep: Budget = 0.25):
        self.keep = check_budget(keep, "keep")

    @unimplemented
    def select(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` (G, N, D) of G images → kept indices (G, k), ascending."""
        raise NotImplementedError


@register_method("divprune", "div-prune")
class DivPrune(EmbeddingPruner):
    """DivPrune: greedy max–min cosine diversity on the projected visual tokens of each image."""

    name = "divprune"

    def select(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` (G, N, D) of G images → kept indices (G, k)."""
        return maxmin_diversity(embeddings, resolve_budget(self.keep, embeddings.shape[-2]))


@register_method("uniform")
class Uniform(EmbeddingPruner):
    """Baseline without scores: ``keep`` evenly spaced visual tokens per image (scoring-overhead reference)."""

    name = "uniform"

    def select(self, embeddings: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[-2]
        k = resolve_budget(self.keep, n)
        idx = torch.linspace(0, n - 1, k, device=embeddings.device).round().long().unique()
        return idx.expand(*embeddings.shape[:-2], -1)


# -------------------------------------------------------------------------------------------------- LLM stage
class LLMPruner(TokenPruner):
    """Scores from the last text token's attention to visual tokens inside the LLM."""

    capabilities = Capabilities(stage="llm", positions=("original", "reindex"))

    @unimplemented
    def stages(self) -> list[LLMStage]:
        """The drops, in layer order."""
        raise NotImplementedError

    def bind(self, num_layers: int) -> None:
        """Called at ``apply`` with the language model's depth (resolve depth-relative layers; raise ValueError
        if impossible). Default: nothing to resolve."""

    def stage_keep(self, stage_index: int, n_current: int, num_original: int) -> int:
        """How many of an image's ``n_current`` tokens stage ``stage_index`` keeps (``num_original`` before any
        drop): the top-scoring ones."""
        return min(resolve_budget(self.stages()[stage_index].budget, num_original), n_current)

    def select(self, stage_index: int, scores: torch.Tensor, num_original: int) -> torch.Tensor:
        """Kept indices within one image's current tokens given their ``scores`` (..., n), ascending."""
        return topk_in_order(scores, self.stage_keep(stage_index, scores.shape[-1], num_original))

    # hooks of the optional capabilities (called only when ``capabilities`` declare them)
    @unimplemented
    def rater_scores(self, embeds: torch.Tensor, visual: torch.Tensor, t_idx: torch.Tensor, t_ok: torch.Tensor,
                     text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``text_raters``: which candidate text tokens ``t_idx`` (B, T) are raters, (B, T) bool (see
        :meth:`visattn.tokenprune.sparsevlm.SparseVLM.rater_scores`)."""
        raise NotImplementedError

    @unimplemented
    def recycled_count(self, m: int) -> int:
        """``recycles``: recycled tokens made from ``m`` deleted ones (host int)."""
        raise NotImplementedError

    @unimplemented
    def recycle_pick(self, m: int) -> int:
        """``recycles``: how many of ``m`` deleted tokens (the best-scoring) the recycling uses."""
        raise NotImplementedError

    @unimplemented
    def recycled(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``recycles``: recycled tokens (..., c, C) from deleted tokens' hidden states (..., m, C) and scores."""
        raise NotImplementedError


@register_method("fastv")
class FastV(LLMPruner):
    """FastV: at layer ``layer`` (K ≥ 1) keep the ``keep`` visual tokens that the last token attends to most in
    layer K-1 (heads averaged); the rest are dropped before layer K. Original positions are kept."""

    name = "fastv"

    def __init__(self, layer: int = 2, keep: Budget = 0.25, positions: str = "original"):
        self.layer = check_layer(layer, "layer", 1)
        self.keep = check_budget(keep, "keep")
        self.positions = _check_positions(positions, self.capabilities.positions)

    def stages(self) -> list[LLMStage]:
        return [LLMStage(self.layer, self.keep, self.layer - 1)]


@register_method("pdrop", "pyramiddrop", "pyramid-drop")
class PyramidDrop(LLMPruner):
    """PyramidDrop: after each layer in ``layers`` keep ``ratios[i]`` of the image's original visual tokens,
    ranked by the last instruction token's attention computed with that layer's own q/k; positions re-indexed."""

    name = "pdrop"
    capabilities = Capabilities(stage="llm", positions=("reindex", "original"))

    def __init__(
        self,
        layers: tuple[int, ...] | list[int] = (8, 16, 24),
        ratios: tuple[float, ...] | list[float] = (0.5, 0.25, 0.125),
        positions: str = "reindex",
    ):
        self.layers = check_increasing(list(layers), "layers")
        if self.layers[0] < 1:
            raise ValueError(f"layers={list(layers)!r}: the first pruning layer must be >= 1")
        ratios = [check_budget(float(r), "ratios") for r in ratios]
        if len(ratios) != len(self.layers):
            raise ValueError(f"ratios={ratios!r}: expected {len(self.layers)} values (one per layer)")
        if any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
            raise ValueError(f"ratios={ratios!r}: ratios must not increase")
        self.ratios = ratios
        self.positions = _check_positions(positions, self.capabilities.positions)

    def stages(self) -> list[LLMStage]:
        return [LLMStage(layer, ratio, layer) for layer, ratio in zip(self.layers, self.ratios, strict=False)]

    def stage_keep(self, stage_index: int, n_current: int, num_original: int) -> int:
        return min(max(1, int(self.ratios[stage_index] * num_original)), n_current)  # PDrop truncates: int(N * r)
