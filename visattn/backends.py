"""Backend policy shared by the attention ops and the token-pruning kernels.

One vocabulary everywhere: ``"auto"`` (the fused Triton kernel where it can run, else the exact reference),
``"reference"`` (pure PyTorch / eager ops) and ``"triton"`` (the fused kernel, or an error saying why not). Each
kernel has one ``why_not`` predicate (None when it can run the call, else a short reason) that feeds all three uses:
``choose`` (dispatch), ``list_kernels`` (``visattn info``) and the error a forced backend raises.

Global defaults follow timm's ``set_fused_attn``: a getter, a setter, a context manager and an environment
variable read once at import (``VISATTN_BACKEND`` for every family, ``VISATTN_<FAMILY>_BACKEND`` for one). The
state lives in a private dict changed only through these functions, so ``torch.compile`` guards on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("visattn")

BACKEND_NAMES = ("auto", "reference", "triton")
FAMILIES = ("attention", "tokenprune")
_ENV = "VISATTN_BACKEND"


def _from_env(variable: str) -> str | None:
    value = os.environ.get(variable)
    if value is None or value == "":
        return None
    if value not in BACKEND_NAMES:
        raise ValueError(f"environment variable {variable}={value!r} must be one of {BACKEND_NAMES}")
    return value


# family -> default backend; "*" is every family's default unless the family has its own.
_DEFAULTS: dict[str, str] = {"*": _from_env(_ENV) or "auto"}
for _family in FAMILIES:
    _value = _from_env(f"VISATTN_{_family.upper()}_BACKEND")
    if _value is not None:
        _DEFAULTS[_family] = _value


def _check_family(family: str | None) -> str:
    if family is None:
        return "*"
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    return family


def check_backend_name(backend: str | None, argument: str = "backend", extra: tuple[str, ...] = ()) -> str:
    """Validate a per-call backend name; ``None`` means ``"auto"`` (NATTEN's convention)."""
    if backend is None:
        return "auto"
    allowed = BACKEND_NAMES + tuple(extra)
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"{argument} must be one of {allowed} or None, got {backend!r}")
    return backend


def get_backend(family: str | None = None) -> str:
    """The default backend of ``family`` ("attention", "tokenprune"), or the global default for ``None``."""
    key = _check_family(family)
    return _DEFAULTS.get(key, _DEFAULTS["*"])


def set_backend(backend: str, family: str | None = None) -> None:
    """Set the default backend used where a call passes ``backend=None`` / ``"auto"``.

    Args:
        backend: "auto", "reference" or "triton". "reference" routes every call of the family to the exact
            PyTorch path; "triton" makes every call of the family use the fused kernel or raise why it cannot.
        family: "attention", "tokenprune", or None for every family without a setting of its own.
    """
    key = _check_family(family)
    _DEFAULTS[key] = check_backend_name(backend)
    if key == "*":  # a global setting overrides the families' own ones, as a fresh process would
        for name in FAMILIES:
            _DEFAULTS.pop(name, None)


@contextlib.contextmanager
def use_backend(backend: str, family: str | None = None) -> Iterator[None]:
    """Context manager: ``set_backend`` for the duration of a ``with`` block, restored after."""
    saved = dict(_DEFAULTS)
    set_backend(backend, family)
    try:
        yield
    finally:
        _DEFAULTS.clear()
        _DEFAULTS.update(saved)


def resolve(requested: str | None, family: str) -> str:
    """The backend a call asks for: its own choice, or the family default when it passes None / "auto"."""
    requested = check_backend_name(requested, extra=("sdpa",))
    return get_backend(family) if requested == "auto" else requested


def choose(kernel: str, requested: str | None, why_not: Callable[[], str | None], family: str,
           fallback: str = "reference") -> str:
    """Pick the backend for one call of ``kernel``.

    ``"reference"`` is always honoured; ``"triton"`` runs the kernel when ``why_not()`` is None and raises a
    ``ValueError`` quoting the reason otherwise; ``"auto"`` takes the kernel when it can run, else ``fallback``.
    """
    wanted = resolve(requested, family)
    if wanted not in ("auto", "triton"):
        return wanted
    reason = why_not()
    if reason is None:
        return "triton"
    if wanted == "triton":
        raise ValueError(f"backend='triton' cannot run this {kernel} call: {reason}")
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
        logger.debug("visattn %s: triton backend skipped: %s", kernel, reason)
    return fallback


@dataclass(frozen=True)
class KernelEntry:
    """A fused kernel as ``visattn info`` lists it: ``probe(device)`` says why it cannot run there (None = it can)."""

    name: str
    family: str
    probe: Callable[[str], str | None]
    description: str = ""


_KERNELS: dict[str, KernelEntry] = {}


def register_kernel(name: str, family: str, probe: Callable[[str], str | None], description: str = "") -> None:
    """Record a fused kernel and its device-level capability probe (never raises; returns a reason or None)."""
    _check_family(family)
    _KERNELS[name] = KernelEntry(name, family, probe, description)


def list_kernels(device: str = "cpu") -> list[tuple[KernelEntry, str | None]]:
    """Every registered kernel with the reason it cannot run on ``device`` (None when it can)."""
    rows = []
    for entry in _KERNELS.values():
        try:
            reason = entry.probe(device)
        except Exception as err:  # a probe must never take `visattn info` down
            reason = f"capability probe failed ({type(err).__name__}: {err})"
        rows.append((entry, reason))
    return rows


__all__ = ["BACKEND_NAMES", "FAMILIES", "KernelEntry", "check_backend_name", "choose", "get_backend",
           "list_kernels", "register_kernel", "resolve", "set_backend", "use_backend"]
