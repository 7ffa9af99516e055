"""visattn: fast attention for vision and multimodal models.

Heads-last functional API (``[B, *spatial, heads, head_dim]``): ``na1d``/``na2d``/``na3d`` with NATTEN 0.21's
signatures, ``window_attention``, ``agent_attention``, ``bilevel_routing_attention``, ``halo_attention`` and the
video patterns ``sliding_tile_attention``, ``radial_attention`` and ``vmoba_attention``; exact reference semantics
(docs/SEMANTICS.md) and Triton kernels behind one dispatcher.

``import visattn`` imports the functional API only: not timm, open_clip, transformers or diffusers. visattn's timm
model families are still creatable by name once visattn is imported: they register with timm (by importing
``visattn.models``) right away when timm is already imported, else right after timm's own import finishes, so
``import visattn, timm; timm.create_model("nat_tiny")`` works in either import order. Importing ``visattn.models``
registers them too.

The subpackages are attributes too (``visattn.diffusion``, ``visattn.tokenprune``, ``visattn.models``,
``visattn.bench``, ...), imported on first access.
"""

import importlib as _importlib
import sys as _sys
import warnings as _warnings

from visattn.functional import (
    agent_attention,
    bilevel_routing_attention,
    halo_attention,
    na1d,
    na2d,
    na3d,
    radial_attention,
    radial_attention_mask,
    sliding_tile_attention,
    vmoba_attention,
    which_backend,
    window_attention,
)

__version__ = "0.1.0"

__all__ = [
    "agent_attention",
    "bilevel_routing_attention",
    "halo_attention",
    "na1d",
    "na2d",
    "na3d",
    "radial_attention",
    "radial_attention_mask",
    "sliding_tile_attention",
    "vmoba_attention",
    "which_backend",
    "window_attention",
    "__version__",
]


def _register_models() -> None:
    """Import ``visattn.models`` (its ``@register_model`` entrypoints register the families with timm). A failure
    is a warning, not an error: it runs inside the user's ``import timm``, which must not break because of
    visattn; importing ``visattn.models`` directly raises the real error."""
    try:
        import visattn.models  # noqa: F401
    except Exception as err:
        _warnings.warn(f"visattn: registering the timm model families failed ({type(err).__name__}: {err}); "
                       "`import visattn.models` shows the full error", RuntimeWarning, stacklevel=2)


class _RegisterAfterTimm:
    """A one-shot ``sys.meta_path`` finder: when ``timm`` is first imported, it lets the other finders locate it,
    wraps the loader so that :func:`_register_models` runs right after timm's ``__init__`` has finished, and
    removes itself. Every other module name is declined at once (``None``)."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        _remove_hook()
        for finder in list(_sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None  # timm is not installed: the import fails as it would without visattn
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _AfterExec(spec.loader)
        return spec


class _AfterExec:
    """timm's own loader, followed by :func:`_register_models`. The module's ``__loader__`` / ``__spec__.loader``
    are set back to the real loader before timm runs, so nothing in timm sees the wrapper."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        try:
            self.loader.exec_module(module)
        except BaseException:
            _install_hook()  # timm failed to import: register on the next attempt
            raise
        _register_models()


def _is_hook(finder) -> bool:
    # by name, not isinstance: an importlib.reload(visattn) makes a new class, and must not leave two hooks
    return type(finder).__name__ == "_RegisterAfterTimm" and type(finder).__module__ == __name__


def _remove_hook() -> None:
    _sys.meta_path[:] = [f for f in _sys.meta_path if not _is_hook(f)]


def _install_hook() -> None:
    if not any(_is_hook(f) for f in _sys.meta_path):
        _sys.meta_path.insert(0, _RegisterAfterTimm())


if "timm" in _sys.modules:
    _register_models()
else:
    _install_hook()

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
