"""Which adapter attaches a pruner to a model: a table keyed by the HF ``config.model_type`` (as Liger keys its
integrations), plus open_clip towers, which have no config. Adapter modules are imported on first use."""

from __future__ import annotations

from collections.abc import Callable

import torch

from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.tome import ToMeAdapter

AdapterFactory = Callable[[torch.nn.Module, TokenPruner, bool], object]


def _llava(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    from visattn.tokenprune.hf_llava import llava_adapter

    return llava_adapter(model, pruner, timing)


def _llava_next(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    from visattn.tokenprune.hf_llava_next import llava_next_adapter

    return llava_next_adapter(model, pruner, timing)


def _llava_onevision(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    from visattn.tokenprune.hf_llava_onevision import llava_onevision_adapter

    return llava_onevision_adapter(model, pruner, timing)


def _qwen_vl(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    from visattn.tokenprune.hf_qwen2vl import qwen_vl_adapter

    return qwen_vl_adapter(model, pruner, timing)


#: HF ``config.model_type`` -> adapter factory ``(model, pruner, timing) -> adapter``; each family module picks
#: its stage class from ``pruner.capabilities`` and refuses what it cannot serve
HF_ADAPTERS: dict[str, AdapterFactory] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
}
#: model types whose adapters split videos into frames (``capabilities.video_merge`` methods run there only)
VIDEO_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def adapter_for(model: torch.nn.Module, pruner: TokenPruner, timing: bool):
    """Build the adapter that attaches ``pruner`` to ``model`` (NotImplementedError naming the model otherwise;
    TypeError when the method's class lacks a hook its capabilities promise)."""
    missing = pruner.missing_hooks()
    if missing:
        raise TypeError(f"pruner={type(pruner).__name__}: its capabilities ({pruner.capabilities}) promise "
                        f"{', '.join(missing)}, which the class does not implement")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if pruner.capabilities.video_merge and model_type not in VIDEO_MODEL_TYPES:
        raise NotImplementedError(f"{pruner.name} on {type(model).__name__} is not supported: video merging runs "
                                  "on Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision videos only")
    if model_type in HF_ADAPTERS:
        return HF_ADAPTERS[model_type](model, pruner, timing)
    if pruner.capabilities.virtual_unmerge:
        raise ValueError(f"pruner={pruner.name!r} with unmerge='virtual': virtual unmerging runs in a language model "
                         f"(LLaVA-1.5), not on {type(model).__name__}")
    if pruner.capabilities.tower_merge:  # HF CLIPVisionModel, open_clip VisionTransformer / CLIP (ValueError else)
        return ToMeAdapter(model, pruner)
    if type(model).__module__.startswith("open_clip"):
        from visattn.tokenprune.open_clip_tower import OpenClipTowerAdapter

        return OpenClipTowerAdapter(model, pruner, timing=timing)
    raise NotImplementedError(f"no tokenprune adapter for {type(model).__name__} (model_type={model_type!r}; "
                              f"supported: {', '.join(sorted(HF_ADAPTERS))}, open_clip towers; ToMe also on "
                              "CLIP vision towers)")
