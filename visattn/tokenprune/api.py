"""Public entry points: ``apply`` / ``remove`` / ``last_report`` and the method registry (``create``)."""

from __future__ import annotations

from typing import Any

import torch

from visattn.tokenprune.methods import (
    VTCCLS,
    DivPrune,
    FastV,
    FasterVLM,
    PyramidDrop,
    TokenPruner,
    Uniform,
    VisionZip,
)
from visattn.tokenprune.report import PruneReport

_ATTR = "_visattn_tokenprune"
REGISTRY: dict[str, type] = {}


def register(name: str, cls: type, *aliases: str) -> None:
    """Register a pruner class under ``name`` (and aliases) for :func:`create`."""
    for key in (name, *aliases):
        REGISTRY[key.lower()] = cls


def available() -> list[str]:
    """Registered method names."""
    return sorted(REGISTRY)


def _visionzip_from_keep(keep: int | float = 64, **kw: Any) -> VisionZip:
    if isinstance(keep, float):
        raise ValueError(f"keep={keep!r}: VisionZip needs a token count (dominant + contextual)")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 3:
        raise ValueError(f"keep={keep!r}: VisionZip needs an int >= 3")
    dominant = max(2, round(keep * 54 / 64))
    return VisionZip(dominant=dominant, contextual=max(1, keep - dominant), **kw)


def create(name: str, **kwargs: Any) -> TokenPruner:
    """Build a pruner by registry name, e.g. ``create("fastv", keep=0.25)``."""
    key = name.lower()
    if key not in REGISTRY:
        raise ValueError(f"name={name!r}: unknown method; available: {', '.join(available())}")
    cls = REGISTRY[key]
    if cls is VisionZip and "keep" in kwargs:
        return _visionzip_from_keep(**kwargs)
    return cls(**kwargs)


register("fastv", FastV)
register("fastervlm", FasterVLM, "faster-vlm")
register("vtc-cls", VTCCLS, "vtccls", "vtc_cls")
register("visionzip", VisionZip, "vision-zip")
register("divprune", DivPrune, "div-prune")
register("pdrop", PyramidDrop, "pyramiddrop", "pyramid-drop")
register("uniform", Uniform)


def _adapter_for(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    names = {cls.__name__ for cls in type(model).__mro__}
    from visattn.tokenprune.hf_qwen2vl import QWEN_VL_CLASSES, QwenVLAdapter

    if names & QWEN_VL_CLASSES:
        if type(pruner).__name__ == "ToMe":
            raise NotImplementedError("ToMe on Qwen2-VL is not supported (no CLIP-style vision tower)")
        return QwenVLAdapter(model, pruner, timing=timing)
    if type(pruner).__name__ == "ToMe":
        from visattn.tokenprune import tome

        if names & {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaModel", "LlavaNextModel"}:
            return tome.llava_adapter(model, pruner, timing=timing)
        return tome.ToMeAdapter(model, pruner)
    if names & {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaModel", "LlavaNextModel"}:
        from visattn.tokenprune.hf_llava import LlavaAdapter

        return LlavaAdapter(model, pruner, timing=timing)
    if type(model).__module__.startswith("open_clip") and names & {"VisionTransformer", "CLIP"}:
        from visattn.tokenprune.open_clip_tower import OpenClipTowerAdapter

        return OpenClipTowerAdapter(model, pruner, timing=timing)
    raise NotImplementedError(f"no tokenprune adapter for {type(model).__name__}")


def apply(model: torch.nn.Module, pruner: TokenPruner | str, *, timing: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Attach ``pruner`` to ``model`` (in place, hooks only) and return the model.

    ``pruner`` may be a registry name, with ``kwargs`` for :func:`create`. ``timing=True`` records the scoring
    time of every call (``last_report(model).scoring_ms``).
    """
    if isinstance(pruner, str):
        pruner = create(pruner, **kwargs)
    elif kwargs:
        raise ValueError(f"kwargs={sorted(kwargs)}: only allowed with a method name")
    if not isinstance(pruner, TokenPruner):
        raise ValueError(f"pruner={pruner!r}: expected a TokenPruner or a registry name")
    remove(model)
    setattr(model, _ATTR, _adapter_for(model, pruner, timing))
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Detach any pruner from ``model``; the model behaves as before :func:`apply`."""
    adapter = getattr(model, _ATTR, None)
    if adapter is not None:
        adapter.remove()
        delattr(model, _ATTR)
    return model


def last_report(model: torch.nn.Module) -> PruneReport | None:
    """Report of the last pruned prefill of ``model`` (None if nothing was pruned yet)."""
    adapter = getattr(model, _ATTR, None)
    return None if adapter is None else adapter.last_report
