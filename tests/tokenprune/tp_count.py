"""Count the aten ops and host syncs that the tokenprune adapter's own hooks issue during one prefill (CPU).

Only code running inside the adapter's hooks (and the LLaVA-NeXT ``pack_image_features`` wrapper, minus HF's
own packing it calls) is counted; the model's layers are not. A *sync* is an op that makes the host wait for the
device on CUDA: ``.item()`` / ``int()`` / ``bool()`` (``aten::_local_scalar_dense``), ``.tolist()`` / ``.cpu()``,
``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave`` with tensor repeats and
``bincount`` (which reads its maximum back).
"""

from __future__ import annotations

import functools
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
             "aten::unique_consecutive", "aten::masked_select", "aten::bincount"}


def _has_bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or ()))


class OpCounter(TorchDispatchMode):
    """Counts aten ops and sync ops while ``active`` (a depth counter set by the hook wrappers)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.active = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = func._schema.name
            self.ops[name] += 1
            if name in _SYNC_OPS or (name in ("aten::index", "aten::index_put_", "aten::index_put")
                                     and _has_bool_index(args)) or (
                    name == "aten::repeat_interleave" and isinstance(kwargs.get("repeats", None), torch.Tensor)):
                self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def on(self):
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @contextmanager
    def off(self):
        saved, self.active = self.active, 0
        try:
            yield
        finally:
            self.active = saved


def _wrap(fn, counter: OpCounter):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with counter.on():
            return fn(*args, **kwargs)

    return inner


def _off(fn, counter: OpCounter):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with counter.off():
            return fn(*args, **kwargs)

    return inner


@contextmanager
def count_adapter(model: torch.nn.Module):
    """Count the ops / syncs of the tokenprune hooks attached to ``model`` (``tp.apply`` first)."""
    from visattn.tokenprune.api import _ATTR

    adapter = getattr(model, _ATTR)
    counter = OpCounter()
    saved = []
    for h in adapter.handles:
        ref = getattr(h, "hooks_dict_ref", None)
        if ref is None:
            continue
        d = ref()
        saved.append((d, h.id, d[h.id]))
        d[h.id] = _wrap(d[h.id], counter)
    core = getattr(adapter, "core", None)
    pack = None if core is None else core.__dict__.get("pack_image_features")
    if pack is not None:
        core.pack_image_features = _wrap(pack, counter)
    cls = None if core is None else type(core)
    stock = None if cls is None else cls.__dict__.get("pack_image_features")
    if stock is not None:  # HF's own packing (called by the wrapper) is model work: not counted
        def stock_off(self, *a, **k):
            with counter.off():
                return stock(self, *a, **k)

        cls.pack_image_features = stock_off
    # HF modules the hooks call (rotary tables for re-positioned tokens, the projector of LLaVA-NeXT VisionZip)
    # are model work whose op count changes between transformers releases: not counted
    lm = getattr(adapter, "lm", None)
    model_work = [m for m in (getattr(lm, "rotary_emb", None), getattr(core, "multi_modal_projector", None))
                  if m is not None]
    for module in model_work:
        module.forward = _off(module.forward, counter)
    tolist, cpu = torch.Tensor.tolist, torch.Tensor.cpu

    def sync_patch(name, fn):
        def inner(self, *a, **k):
            if counter.active:
                counter.syncs[name] += 1
            return fn(self, *a, **k)

        return inner

    torch.Tensor.tolist = sync_patch("tolist", tolist)
    torch.Tensor.cpu = sync_patch("cpu", cpu)
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu
        for d, i, fn in saved:
            d[i] = fn
        if pack is not None:
            core.pack_image_features = pack
        if stock is not None:
            cls.pack_image_features = stock
        for module in model_work:
            del module.forward


def counts(model, pruner, **inputs) -> tuple[int, int, Counter, Counter]:
    """(ops, syncs, op counter, sync counter) of one pruned prefill forward of ``model`` on ``inputs``."""
    from visattn import tokenprune as tp

    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            model(**inputs)  # warm-up (lazy init paths)
            with count_adapter(model) as c, torch.no_grad():
                model(**inputs)
    finally:
        tp.remove(model)
    return sum(c.ops.values()), sum(c.syncs.values()), c.ops, c.syncs
