"""The in-place patching driver shared by ``patch_timm`` and ``patch_swin``: one ``Family`` record per timm model
family (which module classes it rebinds, why a module cannot be, how to patch and restore one) and the walk over
a model that applies or removes them. Patching only rebinds a method on module instances: parameters, buffers,
state-dict keys and the module tree are never touched, so removing it restores the model exactly."""

from __future__ import annotations

import logging
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger("visattn")


@dataclass(frozen=True)
class Family:
    """How one timm family is patched.

    Attributes:
        name: the family's key in ``patch_timm(families=...)`` ("swin", "maxvit").
        classes: returns the module classes that are patched (imports timm lazily).
        unsupported: returns module classes of the family that are found but never patched, with the reason.
        why_not: why a module of ``classes`` cannot be patched (None: it can).
        patch: rebinds one module (idempotent).
        unpatch: restores one module.
        is_patched: whether a module runs on visattn.
    """

    name: str
    classes: Callable[[], tuple[type, ...]]
    unsupported: Callable[[], dict[type, str]]
    why_not: Callable[[nn.Module], str | None]
    patch: Callable[[nn.Module], None]
    unpatch: Callable[[nn.Module], None]
    is_patched: Callable[[nn.Module], bool]


@dataclass(frozen=True)
class PatchReport:
    """What ``patch_timm`` did to a model.

    Attributes:
        model: the model's class name.
        patched: module class name -> number of modules of that class now running on visattn.
        skipped: qualified module name -> why it keeps timm's path (its class name first).
    """

    model: str
    patched: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Number of modules running on visattn."""
        return sum(self.patched.values())

    def __str__(self) -> str:
        done = ", ".join(f"{n} {name}" for name, n in self.patched.items()) or "nothing"
        text = f"{self.model}: patched {done}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text


def _scan(model: nn.Module, families: Sequence[Family]):
    """(patchable [(name, module, family)], skipped {name: reason}, names of skipped modules of patched classes)."""
    patchable, skipped, refused = [], {}, []
    classes = [(fam, fam.classes(), fam.unsupported()) for fam in families]
    for name, module in model.named_modules():
        for fam, patched_classes, unsupported in classes:
            if isinstance(module, patched_classes):
                reason = fam.why_not(module)
                if reason is None:
                    patchable.append((name, module, fam))
                else:
                    skipped[name or "<model>"] = f"{type(module).__name__}: {reason}"
                    refused.append(name or "<model>")
                break
            kind = next((cls for cls in unsupported if isinstance(module, cls)), None)
            if kind is not None:
                skipped[name or "<model>"] = f"{type(module).__name__}: {unsupported[kind]}"
                break
    return patchable, skipped, refused


def apply(model: nn.Module, families: Sequence[Family], *, strict: bool, caller: str) -> PatchReport:
    """Patch every supported module of ``model`` (nothing at all when it raises).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: nothing to patch (naming the model class, the classes looked for and what was skipped), or with
            ``strict=True`` a module of a patched class whose layout is not supported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    patchable, skipped, refused = _scan(model, families)
    if strict and refused:
        raise ValueError(f"{caller} cannot accelerate {len(refused)} of {len(refused) + len(patchable)} modules of "
                         f"{type(model).__name__}; {refused[0]}: {skipped[refused[0]]}")
    if not patchable:
        looked = ", ".join(c.__name__ for fam in families for c in fam.classes())
        why = f"; skipped: {'; '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else ""
        raise ValueError(f"{caller}: model {type(model).__name__} has nothing to patch (looked for timm's {looked})"
                         f"{why}")
    counts = Counter()
    for _, module, fam in patchable:
        fam.patch(module)
        counts[type(module).__name__] += 1
    report = PatchReport(type(model).__name__, dict(counts), skipped)
    logger.info("visattn %s: %s", caller, report)
    return report


def remove(model: nn.Module, families: Sequence[Family]) -> nn.Module:
    """Restore timm's own path on every patched module of ``model``; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for fam in families:
        classes = fam.classes()
        for module in model.modules():
            if isinstance(module, classes) and fam.is_patched(module):
                fam.unpatch(module)
    return model


def count(model: nn.Module, family: Family) -> tuple[int, int]:
    """(modules of ``family`` running on visattn, modules of its patched classes in ``model``)."""
    modules = [m for m in model.modules() if isinstance(m, family.classes())]
    return sum(family.is_patched(m) for m in modules), len(modules)


def rebinding(attr: str, mark: str, replacement: Callable) -> tuple[Callable, Callable, Callable]:
    """``(is_patched, patch, unpatch)`` for a family that rebinds one method ``attr`` of a module instance to
    ``replacement(module, ...)``: the patch is an instance attribute (idempotent, marked by the attribute ``mark``),
    so deleting it lets the class's own method show through again."""

    def is_patched(module: nn.Module) -> bool:
        return getattr(module, mark, False)

    def patch(module: nn.Module) -> None:
        if not is_patched(module):
            setattr(module, attr, types.MethodType(replacement, module))
            setattr(module, mark, True)

    def unpatch(module: nn.Module) -> None:
        if is_patched(module):
            delattr(module, attr)
            delattr(module, mark)

    is_patched.__doc__ = f"Whether ``module`` runs on visattn (its ``{attr}`` rebound)."
    patch.__doc__ = f"Rebind one module's ``{attr}`` (idempotent; no parameter or buffer changes)."
    unpatch.__doc__ = f"Restore the class's ``{attr}`` on one module."
    return is_patched, patch, unpatch
