"""visattn: fast attention for vision and multimodal models.

Heads-last functional API (``[B, *spatial, heads, head_dim]``): ``na1d``/``na2d``/``na3d`` with NATTEN 0.21's
signatures, ``window_attention``, ``agent_attention`` and ``bilevel_routing_attention``; exact reference semantics
(docs/SEMANTICS.md) and Triton kernels behind one dispatcher. Importing visattn registers its timm models.

The subpackages are attributes too (``visattn.diffusion``, ``visattn.tokenprune``, ``visattn.nn``,
``visattn.bench``, ...), imported on first access, so ``import visattn`` never imports diffusers or transformers.
"""

import importlib as _importlib

from visattn.functional import (
    agent_attention,
    bilevel_routing_attention,
    na1d,
    na2d,
    na3d,
    which_backend,
    window_attention,
)

__version__ = "0.1.0"

__all__ = [
    "agent_attention",
    "bilevel_routing_attention",
    "na1d",
    "na2d",
    "na3d",
    "which_backend",
    "window_attention",
    "__version__",
]

import visattn.models  # noqa: E402,F401  (registers the timm model families)

# submodules reachable as attributes, imported on first access (PEP 562)
_SUBMODULES = frozenset({"backends", "bench", "cli", "dense_schedule", "diffusion", "functional", "kernels",
                         "models", "nn", "reference", "tokenprune"})


def __getattr__(name: str):
    """``visattn.<submodule>`` imports that submodule on first access; anything else is an AttributeError."""
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # also binds it here: later accesses skip this
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
