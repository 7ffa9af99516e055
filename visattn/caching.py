"""The one rule of every tensor cache in visattn: never keep a fake, traced or inference tensor.

Kernel tables (``kernels/tables.py``), the CPU schedules' masks (``dense_schedule.py``) and the agent pooling maps
(``nn/agent.py``) are built once per shape and kept; all of them go through :func:`cached`. This module sits at the
bottom of the import layers (docs/ARCHITECTURE.md, "Import rules"): it imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

_T = TypeVar("_T")
_TRACING_MODES = (FakeTensorMode, FunctionalTensorMode)


def may_cache(*tensors) -> bool:
    """Whether tensors built now may be kept for later calls: not while ``torch.compile`` / ``torch.export``
    trace, not under a ``FakeTensorMode`` or functionalization (what they build is fake and belongs to that mode;
    a later real or compiled call would meet a stale fake tensor), and not for fake inputs."""
    if torch.compiler.is_compiling():
        return False
    if any(isinstance(mode, _TRACING_MODES) for mode in _get_current_dispatch_mode_stack()):
        return False
    return not any(isinstance(t, FakeTensor) for t in tensors)


def cached(store: dict, key, build: Callable[[], _T], *tensors, limit: int = 512) -> _T:
    """``store[key]``, built by ``build()`` on a miss. Only real, non-inference tensors are ever stored (built
    with inference mode off); while :func:`may_cache` is False (tracing, fake tensors) the value is built fresh
    and nothing is read from or written to ``store``. ``key`` must hold the device (and dtype where it matters)."""
    if not may_cache(*tensors):
        return build()
    hit = store.get(key)
    if hit is None:
        with torch.inference_mode(False):
            hit = build()
        if len(store) >= limit:  # bounded: the shapes one process sees are few
            store.clear()
        store[key] = hit
    return hit


__all__ = ["cached", "may_cache"]
