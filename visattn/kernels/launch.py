"""Cached kernel launches: a launch record per problem geometry, replayed through the compiled kernel's handle.

``kernel[grid](*args)`` binds and specialises every argument on every call (the engine's kernels take ~90), which
cost about as much host time as the kernels' GPU time at vision-backbone sizes. Everything but the tensor pointers
is fixed by a problem's geometry (shapes, strides, dtypes, pointer alignment, pattern), so the first call of a
geometry launches normally and keeps the compiled kernel's runner; later calls pass the pointers and the recorded
tail straight to it. Under ``TRITON_INTERPRET=1`` every call takes the normal path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


class LaunchRecord:
    """Everything one launch needs except the tensors: grid, scalar arguments, constexprs, launch options."""

    __slots__ = ("grid", "scalars", "constexprs", "tail", "options", "runner")

    def __init__(self, grid: tuple, scalars: tuple, constexprs: dict, tail: tuple, options: dict):
        self.grid = grid
        self.scalars = scalars
        self.constexprs = constexprs
        self.tail = tail  # scalars + constexpr values in signature order: what the compiled runner takes
        self.options = options
        self.runner = None


class KernelLauncher:
    """Launches of one ``@triton.jit`` kernel whose parameters are: tensors, then scalars, then constexprs."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)

    def record(self, grid: tuple, n_tensors: int, scalars: Sequence, constexprs: dict, num_warps: int,
               num_stages: int) -> LaunchRecord:
        """A record for one geometry; ``constexprs`` must name every parameter after the scalars."""
        later = self.names[n_tensors + len(scalars):]
        missing = [n for n in later if n not in constexprs]
        if missing:
            raise TypeError(f"launch record of {self.kernel.__name__}: no value for {missing}")
        tail = (*scalars, *(constexprs[n] for n in later))
        grid = (*grid, *(1,) * (3 - len(grid)))  # the compiled kernel's runner reads all three axes
        return LaunchRecord(grid, tuple(scalars), dict(constexprs), tail,
                            dict(num_warps=num_warps, num_stages=num_stages))

    def __call__(self, rec: LaunchRecord, tensors: Sequence[torch.Tensor]) -> None:
        runner = rec.runner
        if runner is not None:
            runner(*tensors, *rec.tail)
            return
        compiled = self.kernel[rec.grid](*tensors, *rec.scalars, **rec.constexprs, **rec.options)
        if not INTERPRETED and compiled is not None:
            if hasattr(compiled, "result"):  # an asynchronously compiled kernel
                compiled = compiled.result()
            rec.runner = compiled[rec.grid]


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What a cached launch depends on for one tensor: shape, strides, dtype and 16-byte pointer alignment (which
    Triton specialises on)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)

