"""Public entry points: ``apply`` / ``remove`` / ``last_report`` and the method registry (``create``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from visattn.tokenprune.adapters import adapter_for
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.registry import REGISTRY, available, create, register_method
from visattn.tokenprune.report import PruneReport

_ATTR = "_visattn_tokenprune"


def register(name: str, cls: type, *aliases: str) -> None:
    """Register a pruner class under ``name`` (and aliases) for :func:`create` (or decorate the class with
    ``visattn.tokenprune.registry.register_method(name, *aliases)``)."""
    register_method(name, *aliases)(cls)


def apply(model: torch.nn.Module, pruner: TokenPruner | str, *, timing: bool = False, replace: bool = False,
          **kwargs: Any) -> torch.nn.Module:
    """Attach ``pruner`` to ``model`` (in place, hooks only) and return the model.

    Args:
        model: a HF LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL model (``...ForConditionalGeneration`` or the bare
            ``...Model``), a HF ``CLIPVisionModel`` (ToMe), or an open_clip vision tower / CLIP model.
        pruner: a :class:`TokenPruner`, or a registry name with ``kwargs`` for :func:`create`.
        timing: record the scoring time of every call (``last_report(model).scoring_ms``).
        replace: a model already holds a pruner: swap it for this one (otherwise that is a ``ValueError``: one
            model holds one pruner). The old one is detached first, so a refused new one leaves none attached.

    Raises ``ValueError`` / ``TypeError`` naming the argument for bad input (also for a model that already holds
    a pruner, without ``replace=True``; ``TypeError`` for a method class lacking a hook its ``capabilities``
    promise), ``NotImplementedError`` for an unsupported model / method pair (decided from the method's
    :class:`~visattn.tokenprune.capabilities.Capabilities`), and
    ``hf_contract.TransformersContractError`` (a ValueError naming the transformers version) when the model does
    not match what the adapters were tested against.
    """
    if isinstance(pruner, str):
        pruner = create(pruner, **kwargs)
    elif kwargs:
        raise ValueError(f"kwargs={sorted(kwargs)}: only allowed with a method name")
    if not isinstance(pruner, TokenPruner):
        raise ValueError(f"pruner={pruner!r}: expected a TokenPruner or a registry name")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {replace!r}")
    current = getattr(model, _ATTR, None)
    if current is not None and not replace:
        held = type(getattr(current, "pruner", current)).__name__
        raise ValueError(f"model already has a {held} pruner attached; call "
                         f"visattn.tokenprune.remove(model) first, or apply(..., replace=True) to swap it")
    if current is not None:
        # detach first: the adapters check an unhooked model (and refuse before touching it)
        remove(model)
    setattr(model, _ATTR, adapter_for(model, pruner, timing))
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Detach the pruner from ``model``; the model behaves as before :func:`apply`. A model without one is left
    as it is, with a ``UserWarning`` saying so (a ``remove`` that removes nothing is usually a bug)."""
    adapter = getattr(model, _ATTR, None)
    if adapter is None:
        warnings.warn(f"visattn.tokenprune.remove: {type(model).__name__} has no pruner attached; nothing removed",
                      UserWarning, stacklevel=2)
        return model
    adapter.remove()
    delattr(model, _ATTR)
    return model


def last_report(model: torch.nn.Module) -> PruneReport | None:
    """Report of the last pruned prefill of ``model`` (None if nothing was pruned yet)."""
    adapter = getattr(model, _ATTR, None)
    return None if adapter is None else adapter.last_report


def decode_layers(model: torch.nn.Module) -> list[tuple[torch.Tensor | None, torch.Tensor | None]] | None:
    """Per decoder layer of the last pruned prefill of ``model``: ``(valid, next_pos)``, what its decode steps
    attend over and where they are placed (None entries: the model's own), for a decode loop of one's own over a
    static KV cache; None when no pruner is attached. Raises ``NotImplementedError`` for a pruner whose adapter
    does not drive a decoder language model (open_clip, CLIP ToMe)."""
    adapter = getattr(model, _ATTR, None)
    if adapter is None:
        return None
    if not hasattr(adapter, "decode_layers"):
        raise NotImplementedError(f"{type(adapter).__name__} has no decoder language model to decode with")
    return adapter.decode_layers()


__all__ = ["REGISTRY", "apply", "available", "create", "decode_layers", "last_report", "register", "remove"]
