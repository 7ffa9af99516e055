"""Constructor-argument checks shared by the attention modules: every error names the argument."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.init import trunc_normal_

IntOrTuple = Union[int, Sequence[int]]


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def int_tuple(value, rank: int, name: str, minimum: int = 1) -> tuple:
    """``value`` broadcast to ``rank`` ints, each >= ``minimum``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank or any(
        isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum for x in items
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {rank} of them, got {value!r}")
    return tuple(int(x) for x in items)


def bool_tuple(value, rank: int, name: str) -> tuple:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank or any(not isinstance(x, bool) for x in items):
        raise ValueError(f"{name} must be a bool or a tuple of {rank} bools, got {value!r}")
    return items


def heads_divide(dim: int, num_heads: int, dim_name: str = "dim") -> int:
    """Validated ``dim // num_heads``."""
    positive_int(dim, dim_name)
    positive_int(num_heads, "num_heads")
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide {dim_name}={dim}")
    return dim // num_heads


def no_attn_drop(attn_drop) -> None:
    """Attention-probability dropout is not offered: the fused kernels never materialise the probabilities."""
    if attn_drop != 0:
        raise ValueError(f"attn_drop must be 0 (visattn kernels never materialise attention weights), "
                         f"got {attn_drop!r}")


def dropout_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def scale_or_default(qk_scale, head_dim: int) -> float:
    if qk_scale is None:
        return head_dim**-0.5
    if isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real) or qk_scale <= 0:
        raise ValueError(f"qk_scale must be a positive number or None, got {qk_scale!r}")
    return float(qk_scale)


def check_input(x, rank: int, dim: int, module: str) -> None:
    """``x`` must be ``[B, *spatial(rank), dim]``."""
    if x.dim() != rank + 2 or x.shape[-1] != dim:
        raise ValueError(f"{module}: x must have shape [B, {'*spatial(' + str(rank) + ')'}, {dim}], "
                         f"got {tuple(x.shape)}")


def backend_name(backend) -> str:
    from visattn.functional import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def rel_pos_table(enabled: bool, num_heads: int, sizes: Sequence[int]) -> Optional[nn.Parameter]:
    """A ``[heads, 2s-1, ...]`` rpb Parameter, trunc_normal(std=.02) within ±2, or None when disabled."""
    if not enabled:
        return None
    table = nn.Parameter(torch.zeros(num_heads, *(2 * s - 1 for s in sizes)))
    trunc_normal_(table, std=0.02, mean=0.0, a=-2.0, b=2.0)
    return table
