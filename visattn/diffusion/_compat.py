"""diffusers version and structure checks, done once when a processor is built or a model is patched.

The processors here reproduce what diffusers' own processors do around the attention call (projections, q/k
norms, rotary embeddings, output projections) and replace only the attention itself. That is only right while the
diffusers code keeps the shape we read, so every entry point checks (1) the installed diffusers version against the
range the tests cover and (2) the attributes and call signatures it relies on, and refuses with a ``ValueError``
naming the version otherwise. ``VISATTN_ALLOW_UNTESTED_DIFFUSERS=1`` downgrades the version check (not the
structure checks) to a warning for people trying a newer release.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings

# The releases the tests in tests/diffusion ran against.
TESTED_MIN = (0, 42)
TESTED_BELOW = (0, 43)
_OVERRIDE_ENV = "VISATTN_ALLOW_UNTESTED_DIFFUSERS"


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def diffusers_version() -> str:
    """The installed diffusers version, or a ``ValueError`` saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise ValueError("visattn.diffusion's diffusers processors need diffusers: pip install 'visattn[diffusion]'"
                         f" ({err})") from err
    return diffusers.__version__


def check_diffusers_version(what: str) -> str:
    """Refuse (ValueError) a diffusers release outside the tested range unless the override is set."""
    version = diffusers_version()
    parsed = _parse(version)
    if TESTED_MIN <= parsed[:2] < TESTED_BELOW:
        return version
    tested = f">={'.'.join(map(str, TESTED_MIN))},<{'.'.join(map(str, TESTED_BELOW))}"
    message = (f"{what} was written and tested for diffusers {tested}; the installed diffusers is {version}. "
               f"Set {_OVERRIDE_ENV}=1 to try it anyway (the structure checks still run).")
    if os.environ.get(_OVERRIDE_ENV, "") == "1":
        warnings.warn(message, stacklevel=3)
        return version
    raise ValueError(message)


def load_class(module: str, name: str, what: str):
    """``diffusers.<module>.<name>``, or a ValueError naming the diffusers version that lacks it."""
    version = diffusers_version()
    try:
        return getattr(importlib.import_module(f"diffusers.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} needs diffusers.{module}.{name}, which diffusers {version} does not have "
                         f"({type(err).__name__}: {err})") from err


def require_parameters(fn, names: tuple[str, ...], where: str, what: str) -> None:
    """``fn`` must take the positional parameters ``names`` (after ``self``), any further ones optional."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: cannot read the signature of {where} ({err})") from err
    if params and params[0].name == "self":
        params = params[1:]
    leading = tuple(p.name for p in params[: len(names)])
    required_extra = [p.name for p in params[len(names):] if p.default is p.empty]
    if leading != names or required_extra:
        raise ValueError(f"{what} expects {where} to take {names}, but diffusers {diffusers_version()} has "
                         f"{tuple(p.name for p in params)}; this diffusers release changed the interface the "
                         "processor relies on")


def require_attributes(obj, names: tuple[str, ...], what: str) -> None:
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise ValueError(f"{what}: {type(obj).__name__} in diffusers {diffusers_version()} lacks {missing}; this "
                         f"diffusers release changed the attention module the processor was written for")
