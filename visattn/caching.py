"""The one rule of every tensor cache in visattn: never keep a fake, traced or inference tensor.

Kernel tables (``kernels/tables.py``), the CPU schedules' masks (``dense_schedule.py``) and the agent pooling maps
(``nn/agent.py``) are built once per shape and kept; all of them go through :func:`cached`. This module sits at the
bottom of the import layers (docs/ARCHITECTURE.md, "Import rules"): it imports only torch.
"""

from __future__ import annotations

import threading
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
        hit = _build_outside_graph_pools(build)
        if len(store) >= limit:  # bounded: the shapes one process sees are few
            store.clear()
        store[key] = hit
    return hit


def _build_outside_graph_pools(build: Callable[[], _T]) -> _T:
    """``build()`` with inference mode off, on a helper thread once CUDA is in use.

    ``torch.compile(mode="reduce-overhead")`` runs each new graph's warm-up with this thread's CUDA allocations
    routed to its private CUDA-graph pool; a table kept from there is a pool allocation no graph output tracks,
    which fails the pool check at the next recording. A fresh thread (and its device's default stream) allocates
    from the normal pool; it waits for the caller's stream first and synchronises before handing the value over.
    During a CUDA-graph capture nothing may be built (host copies and synchronisation are not capturable)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        with torch.inference_mode(False):
            return build()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "visattn: this shape's tables are built on its first call, which cannot happen inside a CUDA-graph "
            "capture; run the op once on the same shapes before capturing (torch.cuda.graph's warm-up does)")
    caller = torch.cuda.current_stream()
    box: dict = {}

    def work() -> None:
        try:
            with torch.cuda.device(caller.device):
                own = torch.cuda.current_stream()
                own.wait_stream(caller)
                box["value"] = build()
                own.synchronize()
        except BaseException as err:  # noqa: BLE001  (re-raised on the caller's thread)
            box["error"] = err

    worker = threading.Thread(target=work, name="visattn-table-build")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


__all__ = ["cached", "may_cache"]
