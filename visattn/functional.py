"""Public functional API: argument normalisation, validation and backend choice.

This is the only public entry to the kernels. Every check happens here, before any compute, and every error names
the offending argument and its value. Semantics: docs/SEMANTICS.md.
"""

from __future__ import annotations

import logging
import math
import numbers
from contextvars import ContextVar
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from visattn import reference

logger = logging.getLogger("visattn")

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

BACKENDS = ("auto", "reference", "triton", "sdpa")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAST_BACKEND: ContextVar[Optional[str]] = ContextVar("visattn_last_backend", default=None)


def last_backend() -> Optional[str]:
    """The backend the most recent op call in this context ran on (diagnostics: smoke tables, tests)."""
    return _LAST_BACKEND.get()


# ----------------------------------------------------------------------------------------------- normalisation
def _as_tuple(value, rank: int, name: str, kind=int) -> tuple:
    """An int (or bool) broadcast to ``rank`` entries, or a tuple/list of exactly ``rank`` of them."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        raise ValueError(f"{name} must be a single value or a tuple of {rank} values, got {value!r}")
    for item in items:
        ok = isinstance(item, (bool, numbers.Integral)) if kind is bool else (
            isinstance(item, numbers.Integral) and not isinstance(item, bool)
        )
        if not ok:
            raise TypeError(f"{name} must contain {kind.__name__}s, got {value!r}")
    return tuple(kind(item) for item in items)


def _positive(values: tuple, name: str) -> None:
    if any(x < 1 for x in values):
        raise ValueError(f"{name} must be positive, got {values}")


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_like(t: Tensor, ref: Tensor, name: str, ref_name: str = "q") -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_qkv(q, k, v, ranks: Sequence[int], op: str) -> int:
    """Common q/k/v checks; returns the spatial rank."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_tensor(t, name)
    rank = q.dim() - 3
    if rank not in ranks:
        want = " or ".join(str(r + 3) for r in ranks)
        raise ValueError(f"{op}: q must have {want} dims [B, *spatial, heads, head_dim], got shape {tuple(q.shape)}")
    for t, name in ((k, "k"), (v, "v")):
        _check_like(t, q, name)
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"{op}: v must match q in all but head_dim: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if any(s == 0 for s in q.shape) or v.shape[-1] == 0:
        raise ValueError(f"{op}: q and v must not have empty dimensions, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    return rank


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _check_rpb(rpb, q: Tensor, sizes: tuple, name: str = "rpb") -> None:
    if rpb is None:
        return
    _check_tensor(rpb, name)
    if rpb.device != q.device:
        raise ValueError(f"{name} is on {rpb.device} but q is on {q.device}")
    want = (q.shape[-2], *(2 * s - 1 for s in sizes))
    if tuple(rpb.shape) != want:
        raise ValueError(f"{name} must have shape [heads, 2k-1, ...] = {want}, got {tuple(rpb.shape)}")


def _check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# ----------------------------------------------------------------------------------------------- dispatch
def _triton_why_not(op: str, *args) -> Optional[str]:
    """Why the Triton engine cannot run this call (None when it can)."""
    try:
        from visattn import kernels
    except Exception as err:  # triton missing or broken: a reason, not a crash
        return f"visattn.kernels could not be imported ({type(err).__name__}: {err})"
    why_not = getattr(kernels, f"{op}_why_not", None)
    if why_not is None:
        return f"no Triton kernel for {op} yet"
    return why_not(*args)


def _choose(op: str, backend: str, q: Tensor, triton_args: tuple, extra: Sequence[str] = ()) -> str:
    """Resolve ``backend`` to a runnable one; a forced backend that cannot run raises and says why."""
    chosen = _resolve(op, backend, q, triton_args, extra)
    _LAST_BACKEND.set(chosen)
    return chosen


def _resolve(op: str, backend: str, q: Tensor, triton_args: tuple, extra: Sequence[str]) -> str:
    if backend == "reference":
        return backend
    if backend == "sdpa" and "sdpa" not in extra:
        raise ValueError(f"backend='sdpa' is not available for {op}; use 'auto', 'reference' or 'triton'")
    if backend == "sdpa":
        return backend
    if backend == "triton":
        reason = _triton_why_not(op, *triton_args)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this {op} call: {reason}")
        return backend
    # auto: the fused kernel on CUDA when it can run, else the next best.
    if q.is_cuda:
        reason = _triton_why_not(op, *triton_args)
        if reason is None:
            return "triton"
        logger.debug("visattn %s: triton backend skipped: %s", op, reason)
        if "sdpa" in extra:
            return "sdpa"
    return "reference"


def available_backends(device: str = "cpu") -> dict:
    """For ``visattn info``: every backend and op, and why it cannot run on ``device`` (None = it can)."""
    q = torch.empty(1, 8, 8, 1, 16, device=device, dtype=torch.float16 if device != "cpu" else torch.float32)
    report = {}
    for op, args in (
        ("na", (q, q, q, (3, 3), (1, 1), (1, 1), (False, False), None, None, None)),
        ("window", (q, q, q, (4, 4), (0, 0), None)),
        ("agent", (q, q, q, q)),
        ("bilevel_routing", (q, q, q, (2, 2), 1)),
    ):
        report[op] = {"reference": None, "triton": _triton_why_not(op, *args)}
    report["agent"]["sdpa"] = None
    return report


# ----------------------------------------------------------------------------------------------- neighborhood
def _na(rank, q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys, additional_values,
        backend):
    op = f"na{rank}d"
    backend = _check_backend(backend)
    _check_qkv(q, k, v, (rank,), op)
    spatial = tuple(q.shape[1:-2])
    kernel = _as_tuple(kernel_size, rank, "kernel_size")
    dil = _as_tuple(dilation, rank, "dilation")
    strd = _as_tuple(stride, rank, "stride")
    causal = _as_tuple(is_causal, rank, "is_causal", kind=bool)
    _positive(kernel, "kernel_size")
    _positive(dil, "dilation")
    _positive(strd, "stride")
    for dim, (length, kk, dd, ss) in enumerate(zip(spatial, kernel, dil, strd)):
        if kk * dd > length:
            raise ValueError(
                f"{op}: kernel_size*dilation must not exceed the input in every dimension; dimension {dim} has "
                f"kernel_size={kk}, dilation={dd} but length {length} (spatial shape {spatial})"
            )
        if ss > kk:
            raise ValueError(f"{op}: stride must not exceed kernel_size; dimension {dim} has stride={ss} > {kk}")
    _check_rpb(rpb, q, kernel)
    if rpb is not None and any(s > 1 for s in strd):
        raise ValueError(f"{op}: rpb cannot be combined with stride > 1 (stride={strd}): offsets leave the table")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{op}: additional_keys and additional_values must be given together")
    if additional_keys is not None:
        for t, name, dim_last in ((additional_keys, "additional_keys", q.shape[-1]),
                                  (additional_values, "additional_values", v.shape[-1])):
            _check_tensor(t, name)
            _check_like(t, q, name)
            want = (q.shape[0], t.shape[1] if t.dim() == 4 else -1, q.shape[-2], dim_last)
            if t.dim() != 4 or tuple(t.shape) != want or t.shape[1] == 0:
                raise ValueError(f"{op}: {name} must have shape [B, n_extra, heads, head_dim] = "
                                 f"[{q.shape[0]}, n, {q.shape[-2]}, {dim_last}] with n >= 1, got {tuple(t.shape)}")
        if additional_keys.shape[1] != additional_values.shape[1]:
            raise ValueError(f"{op}: additional_keys has {additional_keys.shape[1]} tokens but additional_values "
                             f"has {additional_values.shape[1]}")
    scale = _check_scale(scale, q.shape[-1])
    args = (q, k, v, kernel, dil, strd, causal, rpb)
    chosen = _choose("na", backend, q, args + (additional_keys, additional_values))
    impl = reference if chosen == "reference" else _kernels()
    return impl.na(*args, scale, additional_keys, additional_values)


def _kernels():
    from visattn import kernels

    return kernels


def na1d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """1-D neighborhood attention on ``[B, L, heads, head_dim]`` (NATTEN semantics; docs/SEMANTICS.md)."""
    return _na(1, q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
               additional_values, backend)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """2-D neighborhood attention on ``[B, H, W, heads, head_dim]`` (NATTEN semantics; docs/SEMANTICS.md)."""
    return _na(2, q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
               additional_values, backend)


def na3d(q: Tensor, k: Tensor, v: Tensor, kernel_size: IntOrTuple, dilation: IntOrTuple = 1,
         stride: IntOrTuple = 1, is_causal: BoolOrTuple = False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None, additional_keys: Optional[Tensor] = None,
         additional_values: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """3-D neighborhood attention on ``[B, T, H, W, heads, head_dim]`` (NATTEN semantics; docs/SEMANTICS.md)."""
    return _na(3, q, k, v, kernel_size, dilation, stride, is_causal, rpb, scale, additional_keys,
               additional_values, backend)


# ----------------------------------------------------------------------------------------------- window
def window_attention(q: Tensor, k: Tensor, v: Tensor, window_size: IntOrTuple, shift: IntOrTuple = 0,
                     rpb: Optional[Tensor] = None, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Swin (2-D) / Video-Swin (3-D) window attention, shifted windows without roll or mask tensors."""
    backend = _check_backend(backend)
    rank = _check_qkv(q, k, v, (2, 3), "window_attention")
    spatial = tuple(q.shape[1:-2])
    window = _as_tuple(window_size, rank, "window_size")
    shifts = _as_tuple(shift, rank, "shift")
    _positive(window, "window_size")
    for dim, (length, w, t) in enumerate(zip(spatial, window, shifts)):
        if length % w:
            raise ValueError(f"window_attention: window_size must divide the input; dimension {dim} has length "
                             f"{length}, window_size={w} (spatial shape {spatial}); pad the input first")
        if not 0 <= t < w:
            raise ValueError(f"window_attention: shift must satisfy 0 <= shift < window_size; dimension {dim} has "
                             f"shift={t}, window_size={w}")
    _check_rpb(rpb, q, window)
    scale = _check_scale(scale, q.shape[-1])
    args = (q, k, v, window, shifts, rpb)
    chosen = _choose("window", backend, q, args)
    impl = reference if chosen == "reference" else _kernels()
    return impl.window(*args, scale)


# ----------------------------------------------------------------------------------------------- agent
def _agent_sdpa(q, k, v, agents, agent_bias, query_bias, scale):
    """Agent attention as two fused SDPA calls (biases become additive masks)."""
    batch, *spatial, heads, _ = q.shape
    as_bhnd = lambda t: t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bias = lambda b: None if b is None else b.to(q.dtype)
    agent_values = sdpa(as_bhnd(agents), as_bhnd(k), as_bhnd(v), attn_mask=bias(agent_bias), scale=scale)
    out = sdpa(as_bhnd(q), as_bhnd(agents), agent_values, attn_mask=bias(query_bias), scale=scale)
    return out.transpose(1, 2).reshape(batch, *spatial, heads, v.shape[-1])


def _check_bias(bias, name: str, q: Tensor, want: tuple) -> None:
    if bias is None:
        return
    _check_tensor(bias, name)
    if bias.device != q.device:
        raise ValueError(f"{name} is on {bias.device} but q is on {q.device}")
    try:
        ok = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, want) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to [B, heads, rows, cols] = {list(want)}, got {tuple(bias.shape)}")


def agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Optional[Tensor] = None,
                    query_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                    backend: str = "auto") -> Tensor:
    """Agent attention: ``agents`` [B, A, heads, D] attend k/v, then q attends the agents (docs/SEMANTICS.md)."""
    backend = _check_backend(backend)
    _check_qkv(q, k, v, (1, 2, 3), "agent_attention")
    _check_tensor(agents, "agents")
    _check_like(agents, q, "agents")
    batch, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
    if agents.dim() != 4 or agents.shape[0] != batch or agents.shape[2:] != q.shape[-2:] or agents.shape[1] == 0:
        raise ValueError(f"agent_attention: agents must have shape [B, n_agents, heads, head_dim] = "
                         f"[{batch}, A, {heads}, {dim}] with A >= 1, got {tuple(agents.shape)}")
    n, n_agents = math.prod(q.shape[1:-2]), agents.shape[1]
    _check_bias(agent_bias, "agent_bias", q, (batch, heads, n_agents, n))
    _check_bias(query_bias, "query_bias", q, (batch, heads, n, n_agents))
    scale = _check_scale(scale, dim)
    chosen = _choose("agent", backend, q, (q, k, v, agents), extra=("sdpa",))
    if chosen == "sdpa":
        return _agent_sdpa(q, k, v, agents, agent_bias, query_bias, scale)
    impl = reference if chosen == "reference" else _kernels()
    return impl.agent(q, k, v, agents, agent_bias, query_bias, scale)


# ----------------------------------------------------------------------------------------------- bi-level routing
def bilevel_routing_attention(q: Tensor, k: Tensor, v: Tensor, regions: IntOrTuple, topk: int,
                              scale: Optional[float] = None, backend: str = "auto", return_routing: bool = False):
    """BiFormer's bi-level routing attention on 2-D maps ``[B, H, W, heads, D]`` (docs/SEMANTICS.md)."""
    backend = _check_backend(backend)
    _check_qkv(q, k, v, (2,), "bilevel_routing_attention")
    grid = _as_tuple(regions, 2, "regions")
    _positive(grid, "regions")
    height, width = q.shape[1:3]
    if grid[0] > height or grid[1] > width:
        raise ValueError(f"bilevel_routing_attention: regions {grid} exceed the map size {(height, width)}")
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"topk must be an int, got {topk!r}")
    if not 1 <= topk <= grid[0] * grid[1]:
        raise ValueError(f"bilevel_routing_attention: topk must be in [1, regions] = [1, {grid[0] * grid[1]}], "
                         f"got topk={topk}")
    scale = _check_scale(scale, q.shape[-1])
    chosen = _choose("bilevel_routing", backend, q, (q, k, v, grid, int(topk)))
    impl = reference if chosen == "reference" else _kernels()
    return impl.bilevel_routing(q, k, v, grid, int(topk), scale, return_routing=return_routing)
