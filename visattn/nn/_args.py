"""Helpers the attention modules share. The value checks themselves live in ``visattn.functional`` (their one
home); this file only adds what is specific to modules (parameter tables, the input-shape check)."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from visattn.functional import (  # noqa: F401  (re-exported for the module files)
    IntOrTuple,
    bool_tuple,
    check_backend,
    check_decay,
    check_flag,
    check_scale,
    dropout_rate,
    heads_divide,
    int_tuple,
    non_negative_int,
    positive_int,
)


def check_input(x, rank: int, dim: int, module: str) -> None:
    """``x`` must be a floating tensor ``[B, *spatial(rank), dim]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{module}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank + 2 or x.shape[-1] != dim:
        raise ValueError(f"{module}: x must have shape [B, *spatial({rank}), {dim}], got {tuple(x.shape)}")


def no_attn_drop(attn_drop) -> None:
    """Attention-probability dropout is not offered: the fused kernels never materialise the probabilities."""
    rate = dropout_rate(attn_drop, "attn_drop")
    if rate != 0:
        raise ValueError(f"attn_drop must be 0 (visattn kernels never materialise attention weights), "
                         f"got {attn_drop!r}")


def rel_pos_table(enabled: bool, num_heads: int, sizes: Sequence[int]) -> nn.Parameter | None:
    """A ``[heads, 2s-1, ...]`` rpb Parameter, trunc_normal(std=.02) within ±2, or None when disabled."""
    if not enabled:
        return None
    table = nn.Parameter(torch.zeros(num_heads, *(2 * s - 1 for s in sizes)))
    trunc_normal_(table, std=0.02, mean=0.0, a=-2.0, b=2.0)
    return table


def check_factory_kwargs(device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    """timm's ``device=`` / ``dtype=`` factory keywords, checked: a device (or its name) and a floating dtype."""
    if device is not None:
        if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a torch.device, a device name or an index, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device: {err}") from None
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return device, dtype


def factory_kwargs(init: Callable) -> Callable:
    """Give an ``nn.Module.__init__`` timm's ``device=`` / ``dtype=`` factory keywords (as ``nn.Linear`` and timm's
    layers take them): parameters and buffers are created on ``device`` (the constructor runs under
    ``torch.device(device)``, so nothing is allocated elsewhere first; ``"meta"`` allocates nothing) and floating
    ones are then cast to ``dtype``. Both default to torch's defaults."""

    @functools.wraps(init)
    def wrapper(self, *args, device=None, dtype=None, **kwargs):
        device, dtype = check_factory_kwargs(device, dtype)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype=dtype)

    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("device", "dtype")]
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    wrapper.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])
    return wrapper
