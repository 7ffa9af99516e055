"""Budget validation and resolution.

A *budget* is the number of visual tokens of one image that the language model receives after pruning:

* ``int`` ``k >= 1``: keep ``min(k, N)`` tokens of an image that has ``N`` visual tokens;
* ``float`` ``r`` in ``(0, 1]``: keep ``max(1, round(r * N))`` tokens.

Methods that prune inside the LLM (FastV, PyramidDrop, SparseVLM, DART) apply the budget from their pruning layer on
(ZipVL has no budget: its count follows its attention-mass threshold);
the layer-averaged count is reported separately (see :class:`visattn.tokenprune.report.PruneReport`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

Budget = int | float


def check_budget(value: object, name: str = "keep") -> Budget:
    """Validate a budget; raise ``ValueError`` naming the argument and value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r}: expected an int >= 1 or a float ratio in (0, 1]")
    if isinstance(value, numbers.Integral):
        if int(value) < 1:
            raise ValueError(f"{name}={value!r}: a token count must be >= 1")
        return int(value)
    ratio = float(value)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name}={value!r}: a ratio must lie in (0, 1]")
    return ratio


def resolve_budget(value: Budget, num_tokens: int) -> int:
    """Number of tokens to keep out of ``num_tokens``."""
    if num_tokens <= 0:
        return 0
    if isinstance(value, int):
        return min(value, num_tokens)
    return max(1, min(num_tokens, int(round(value * num_tokens))))


def check_layer(value: object, name: str, minimum: int = 0) -> int:
    """Validate a layer index (non-negative unless documented otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def check_layer_in_range(value: int, num_layers: int, name: str, allow_negative: bool = False) -> int:
    """Resolve ``value`` against a model with ``num_layers`` layers; raise ``ValueError`` if out of range."""
    lo = -num_layers if allow_negative else 0
    if not lo <= value < num_layers:
        raise ValueError(f"{name}={value}: the model has {num_layers} layers (valid: {lo}..{num_layers - 1})")
    return value % num_layers


def check_increasing(values: Sequence[int], name: str) -> list[int]:
    """Validate a strictly increasing list of non-negative ints."""
    out = [check_layer(v, name, 0) for v in values]
    if not out or any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"{name}={list(values)!r}: expected a non-empty, strictly increasing list")
    return out
