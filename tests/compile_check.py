"""Shared helper of the compile tests (CPU and GPU): ``torch.compile(fullgraph=True)`` of a callable, two calls on
fresh inputs of the same shapes, forward and backward compared with eager, exactly one compiled frame (a graph
break raises under fullgraph; a recompile raises under ``error_on_recompile``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.testing import CompileCounterWithBackend


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_fullgraph(fn: Callable, make_inputs: Callable[[int], list[torch.Tensor]], backend: str = "aot_eager",
                    params: list[torch.Tensor] = (), atol: float = 1e-5, rtol: float = 1e-5) -> int:
    """Compile ``fn`` and check it against eager on two input sets; returns the number of compiled frames (1).

    ``make_inputs(seed)`` returns the inputs (leaves that require grad get gradients compared); ``params`` are
    extra leaves (module parameters) whose gradients are compared too.
    """
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1):
            inputs = make_inputs(seed)
            leaves = [t for t in inputs if t.requires_grad] + list(params)
            results = []
            for run in (compiled, fn):
                outs = _flat(run(*inputs))
                loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum()
                           for o in outs)
                grads = torch.autograd.grad(loss, leaves) if leaves else ()
                results.append((outs, grads))
            (got, got_grads), (want, want_grads) = results
            for a, b in zip(got + list(got_grads), want + list(want_grads), strict=True):
                torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert counter.frame_count == 1, f"expected one compiled frame, got {counter.frame_count}"
    return counter.frame_count
