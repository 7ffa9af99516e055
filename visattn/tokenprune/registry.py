"""The method registry: a leaf module (imports nothing from visattn) so every method module can register itself with
a decorator, as timm's ``@register_model`` does, without an import cycle through the public API.

>>> @register_method("mymethod", "my-method")
... class MyMethod(TokenPruner): ...
>>> create("my-method", keep=32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=type)

#: lower-case name or alias -> pruner class (``TokenPruner.from_keep`` builds it from a ``keep`` budget)
REGISTRY: dict[str, type] = {}


def register_method(name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`~visattn.tokenprune.methods.TokenPruner` subclass under ``name`` and
    ``aliases`` (case-insensitive) for :func:`create`."""
    for key in (name, *aliases):
        if not isinstance(key, str) or not key:
            raise TypeError(f"name={key!r}: a method name must be a non-empty str")

    def decorate(cls: T) -> T:
        for key in (name, *aliases):
            REGISTRY[key.lower()] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Registered method names and aliases, sorted."""
    return sorted(REGISTRY)


def method_class(name: str) -> type:
    """The class registered as ``name`` (TypeError for a non-string, ValueError naming the known ones otherwise)."""
    if not isinstance(name, str):
        raise TypeError(f"name={name!r}: expected a method name (str), one of {', '.join(available())}")
    cls = REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"name={name!r}: unknown method; available: {', '.join(available())}")
    return cls


def create(name: str, **kwargs: Any):
    """Build a pruner by registry name, e.g. ``create("fastv", keep=0.25)``.

    With ``keep``, the class is built through its ``from_keep`` classmethod (``TokenPruner``'s default passes
    ``keep`` on; VisionZip splits a total token count into dominant + contextual).
    """
    cls = method_class(name)
    if "keep" in kwargs:
        return cls.from_keep(**kwargs)
    return cls(**kwargs)
