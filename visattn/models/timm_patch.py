"""``patch_timm``: run timm's own windowed models on visattn's attention ops in place, weights untouched.

One call patches every supported family it finds in a model (a backbone inside a larger model included):

- Swin v1 / v2 (``swin_*``, ``swinv2_*``; not ``swinv2_cr_*``): ``visattn.models.swin_patch``;
- MaxViT / MaxxViT (``maxvit_*``, ``maxvit_rmlp_*``, ``maxxvit_*``, ``maxxvitv2_*``; block and grid attention):
  ``visattn.models.maxvit_patch``;
- HaloNet (``halonet*``, ``sehalonet33ts``, ``eca_halonext26ts``, ``haloregnetz_b``, ``halo2botnet50ts_256``, the
  halo stage of ``lamhalobotnet50ts_256``; timm's ``HaloAttn``): ``visattn.models.halo_patch``.

Only methods of module instances are rebound: parameters, buffers, state-dict keys and the module tree stay
timm's, and ``unpatch_timm`` restores timm's path exactly. CPU tensors under the default backend ("auto") keep
timm's path (the faster one there); ``visattn.backends.use_backend("reference")`` forces visattn's ops.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from visattn.models import _patching
from visattn.models._patching import Family, PatchReport
from visattn.models.halo_patch import HALONET
from visattn.models.maxvit_patch import MAXVIT
from visattn.models.swin_patch import SWIN

__all__ = ["FAMILIES", "PatchReport", "patch_timm", "unpatch_timm"]

FAMILIES: dict[str, Family] = {fam.name: fam for fam in (SWIN, MAXVIT, HALONET)}


def _families(families: Iterable[str] | None) -> tuple[Family, ...]:
    if families is None:
        return tuple(FAMILIES.values())
    if isinstance(families, str) or not isinstance(families, Iterable):
        raise TypeError(f"families must be an iterable of family names, got {families!r}")
    names = list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"families must name some of {sorted(FAMILIES)}, got {names!r}")
    return tuple(FAMILIES[n] for n in names)


def patch_timm(model: nn.Module, *, families: Iterable[str] | None = None, strict: bool = False) -> PatchReport:
    """Route the windowed attention of every supported timm family in ``model`` through visattn's ops.

    Args:
        model: a timm model (or any module holding timm Swin / MaxViT / HaloNet modules). Patched in place;
            idempotent.
        families: restrict to these family names ("swin", "maxvit", "halonet"); None: all.
        strict: raise instead of skipping a module of a patched class whose layout is not supported.

    Returns:
        A ``PatchReport``: modules patched per class, and modules skipped (with why) that keep timm's path.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``families`` is not an iterable of names.
        ValueError: nothing in the model can be patched (the message names the model class), an unknown family
            name, or with ``strict=True`` an unsupported module layout. Nothing is changed when it raises.
    """
    return _patching.apply(model, _families(families), strict=bool(strict), caller="patch_timm")


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Restore timm's own attention on every module ``patch_timm`` patched; returns ``model``."""
    return _patching.remove(model, tuple(FAMILIES.values()))
