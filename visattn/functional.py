"""Public functional API: argument checks, normalisation and backend choice for every attention op.

This module is the only public entry to the kernels and the one home of argument checks (``visattn.nn`` calls the
same checkers at construction). Every check runs before any compute and every error names the offending argument
and its value. Semantics: docs/SEMANTICS.md; NATTEN migration: docs/NATTEN.md.

``na1d`` / ``na2d`` / ``na3d`` have NATTEN 0.21's signatures (names and positional order), so NATTEN code runs with
the import swapped; visattn's own additions (``rpb``) are keyword-only. The other ops follow the same conventions
(heads-last tensors named ``query``/``key``/``value``, ``scale=None``, ``backend=None`` meaning automatic choice).

Dispatch is compile-safe: no Python state is written on the call path, so ``torch.compile(fullgraph=True)`` traces a
public op without graph breaks. ``which_backend`` answers which backend a call would use without running it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from visattn import backends, dense_schedule, reference
from visattn.caching import may_cache
from visattn.geometry import radial_block_mask, radial_mask, sliding_tile_kernel

try:  # imported once here: a compiled graph must never trace a first-time import
    from visattn import kernels as _kernels

    _KERNELS_ERROR: str | None = None
except Exception as _err:  # a broken install: every op still runs its reference path
    _kernels = None
    _KERNELS_ERROR = f"visattn.kernels could not be imported ({type(_err).__name__}: {_err})"

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]

FAMILY = "attention"
BACKENDS = ("auto", "reference", "triton")  # every op; agent_attention also takes "sdpa"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# NATTEN's attention() performance arguments, the keys ``attention_kwargs`` may hold (all ignored here).
_NATTEN_ATTENTION_KWARGS = frozenset({
    "backend", "q_tile_size", "kv_tile_size", "backward_q_tile_size", "backward_kv_tile_size", "backward_kv_splits",
    "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule", "torch_compile",
})
_NATTEN_BACKENDS = ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna")


# ================================================================================================ argument checks
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_tuple(value, rank: int, name: str, minimum: int = 1, default: int | None = None) -> tuple[int, ...]:
    """``value`` (an int, or a tuple/list of ``rank`` ints) as a ``rank``-tuple of ints ``>= minimum``.

    ``None`` means ``default`` when one is given (NATTEN accepts ``stride=None`` / ``dilation=None``). A bool or a
    float is a ``TypeError``; a wrong length or a value below ``minimum`` is a ``ValueError``.
    """
    if value is None and default is not None:
        value = default
    if type(value) is int and value >= minimum:  # the common call (kernel_size=7): no per-item checks
        return (value,) * rank
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        raise ValueError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
    if not all(_is_int(item) for item in items):
        raise TypeError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
    if any(item < minimum for item in items):
        raise ValueError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
    return tuple(int(item) for item in items)


def bool_tuple(value, rank: int, name: str) -> tuple[bool, ...]:
    """A bool, or a tuple/list of ``rank`` bools, as a ``rank``-tuple; ``None`` means False (as in NATTEN)."""
    if value is None:
        value = False
    if type(value) is bool:
        return (value,) * rank
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        raise ValueError(f"{name} must be a bool or a tuple of {rank} bools, got {value!r}")
    if not all(isinstance(item, bool) for item in items):
        raise TypeError(f"{name} must be a bool or a tuple of {rank} bools, got {value!r}")
    return items


def positive_int(value, name: str) -> int:
    """A positive int (bools and floats are ``TypeError``, ``< 1`` is ``ValueError``)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def non_negative_int(value, name: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_scale(scale, head_dim: int, name: str = "scale") -> float:
    """The softmax scale: ``head_dim ** -0.5`` for None, else a finite number > 0 (0, negatives, nan, inf refused:
    NATTEN's ``scale or default`` would silently turn 0 into the default)."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a finite positive number or None, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a finite positive number or None, got {scale!r}")
    return float(scale)


def dropout_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def heads_divide(dim: int, num_heads: int, dim_name: str = "embed_dim") -> int:
    """Validated ``dim // num_heads``."""
    positive_int(dim, dim_name)
    positive_int(num_heads, "num_heads")
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide {dim_name}={dim}")
    return dim // num_heads


def check_backend(backend, op: str = "", allow_sdpa: bool = False) -> str:
    """A per-call backend name; None means "auto". NATTEN's backend names get a message saying what to pass."""
    if isinstance(backend, str) and backend in _NATTEN_BACKENDS:
        raise ValueError(f"backend={backend!r} is a NATTEN backend name; visattn's are None/'auto' (the fused Triton "
                         f"kernel where it can run, else the exact reference), 'reference' and 'triton'")
    return backends.check_backend_name(backend, extra=("sdpa",) if allow_sdpa else ())


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_like(t: Tensor, ref: Tensor, name: str, ref_name: str = "query") -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_qkv(query, key, value, ranks: Sequence[int], op: str) -> int:
    """Common query/key/value checks; returns the spatial rank."""
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    rank = query.dim() - 3
    if rank not in ranks:
        want = " or ".join(str(r + 3) for r in ranks)
        raise ValueError(f"{op}: query must have {want} dims [B, *spatial, heads, head_dim], got shape "
                         f"{tuple(query.shape)}")
    for t, name in ((key, "key"), (value, "value")):
        _check_like(t, query, name)
    if key.shape != query.shape:
        raise ValueError(f"{op}: key must have query's shape {tuple(query.shape)}, got {tuple(key.shape)} "
                         f"(grouped-query attention is not supported)")
    if value.shape[:-1] != query.shape[:-1]:
        raise ValueError(f"{op}: value must match query in all but head_dim: query {tuple(query.shape)}, value "
                         f"{tuple(value.shape)}")
    if any(s == 0 for s in query.shape) or value.shape[-1] == 0:
        raise ValueError(f"{op}: query and value must not have empty dimensions, got query {tuple(query.shape)}, "
                         f"value {tuple(value.shape)}")
    return rank


def _check_rpb(rpb, query: Tensor, sizes: tuple, op: str) -> None:
    if rpb is None:
        return
    _check_tensor(rpb, "rpb")
    if rpb.device != query.device:
        raise ValueError(f"{op}: rpb is on {rpb.device} but query is on {query.device}")
    want = (query.shape[-2], *(2 * s - 1 for s in sizes))
    if tuple(rpb.shape) != want:
        raise ValueError(f"{op}: rpb must have shape [heads, 2k-1, ...] = {list(want)}, got {tuple(rpb.shape)}"
                         + _heads_first_hint(query, rpb.shape[0]))


def _heads_first_hint(query: Tensor, heads: int) -> str:
    """The sentence an error adds when ``query`` looks like NATTEN's old heads-first layout ``[B, heads, *spatial,
    head_dim]``: its second dimension is the head count another argument shows, its last-but-one is not."""
    if query.shape[1] == heads and query.shape[-2] != heads:
        return (f"; query {tuple(query.shape)} looks heads-first ([B, heads, *spatial, head_dim], NATTEN's old "
                f"na*d_qk/av layout): visattn takes heads-last [B, *spatial, heads, head_dim], e.g. "
                f"query.movedim(1, -2)")
    return ""


def _extra_heads_first_hint(t: Tensor, name: str, query: Tensor) -> str:
    """The hint for extra tokens given heads-first (``[B, heads, n, head_dim]``), or for a heads-first query."""
    heads = query.shape[-2]
    if t.shape[1] == heads and t.shape[2] != heads:
        return f"; {name} looks heads-first ([B, heads, n, head_dim]): pass {name}.transpose(1, 2)"
    return _heads_first_hint(query, t.shape[2])


def _compute_dtype(query: Tensor) -> torch.dtype:
    """The precision logits are accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _rpb_in_compute_dtype(rpb: Tensor | None, query: Tensor) -> Tensor | None:
    """rpb as the logits' precision sees it: a float64 table with float32 q gives what ``rpb.float()`` gives on
    every backend (the Triton kernels take float16/bfloat16/float32 tables; a float64 one would otherwise send the
    call to another backend). Differentiable; a no-op where the dtype already matches."""
    if rpb is None or rpb.dtype in (_compute_dtype(query), query.dtype):
        return rpb
    return rpb.to(_compute_dtype(query))


def _contiguous(result):
    """Every op returns contiguous tensors (docs/SEMANTICS.md), whatever the strides of its inputs and the path."""
    if isinstance(result, tuple):
        return tuple(t.contiguous() if isinstance(t, Tensor) else t for t in result)
    return result.contiguous()


def _check_extra_kv(additional_keys, additional_values, query: Tensor, value: Tensor, op: str) -> None:
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{op}: additional_keys and additional_values must be given together")
    if additional_keys is None:
        return
    for t, name, dim_last in ((additional_keys, "additional_keys", query.shape[-1]),
                              (additional_values, "additional_values", value.shape[-1])):
        _check_tensor(t, name)
        _check_like(t, query, name)
        if t.dim() != 4 or t.shape[0] != query.shape[0] or t.shape[2] != query.shape[-2] or t.shape[3] != dim_last \
                or t.shape[1] == 0:
            raise ValueError(f"{op}: {name} must have shape [B, n, heads, head_dim] = [{query.shape[0]}, n, "
                             f"{query.shape[-2]}, {dim_last}] with n >= 1, got {tuple(t.shape)}"
                             + (_extra_heads_first_hint(t, name, query) if t.dim() == 4 else ""))
    if additional_keys.shape[1] != additional_values.shape[1]:
        raise ValueError(f"{op}: additional_keys has {additional_keys.shape[1]} tokens but additional_values has "
                         f"{additional_values.shape[1]}")


def _check_bias(bias, name: str, query: Tensor, want: tuple) -> None:
    if bias is None:
        return
    _check_tensor(bias, name)
    if bias.device != query.device:
        raise ValueError(f"{name} is on {bias.device} but query is on {query.device}")
    ok = bias.dim() <= 4 and all(
        b in (1, w) for b, w in zip(reversed(tuple(bias.shape)), reversed(want), strict=False)
    )
    if not ok:
        raise ValueError(f"{name} must broadcast to [B, heads, rows, cols] = {list(want)}, got {tuple(bias.shape)}")


def _check_natten_perf_args(rank: int, attention_kwargs, tiles: dict, flags: dict, kernel_schedule) -> None:
    """NATTEN's performance arguments: type-checked, then ignored (they pick CUTLASS/flex tiles and schedules and
    never change results; visattn's engine chooses its own tiles)."""
    if attention_kwargs is not None:
        if not isinstance(attention_kwargs, Mapping):
            raise TypeError(f"attention_kwargs must be a dict or None, got {type(attention_kwargs).__name__}")
        unknown = sorted(set(attention_kwargs) - _NATTEN_ATTENTION_KWARGS)
        if unknown:
            raise ValueError(f"attention_kwargs may only hold NATTEN attention() performance arguments "
                             f"{sorted(_NATTEN_ATTENTION_KWARGS)}, got unknown keys {unknown}")
    for name, value in tiles.items():
        if value is not None:
            int_tuple(value, rank, name)
    for name, value in flags.items():
        check_flag(value, name)
    if kernel_schedule is not None and not isinstance(kernel_schedule, str):
        raise TypeError(f"kernel_schedule must be a str or None, got {kernel_schedule!r}")


# ================================================================================================ backend choice
def _triton_why_not(op: str, *args) -> str | None:
    """Why the fused Triton kernel cannot run this call (None when it can)."""
    if _kernels is None:
        return _KERNELS_ERROR
    spec = _SPECS.get(op)
    if spec is None or spec.why_not is None:
        return f"no Triton kernel for {op} attention"
    return spec.why_not(*args)


_RECENT: dict[str, str] = {}


def last_backend() -> str | None:
    """The backend the most recent eager op call ran on ("reference", "triton" or "sdpa"); None before any call.

    Diagnostics only (``visattn smoke``). Calls traced by ``torch.compile`` / ``torch.export`` record nothing, so
    prefer :func:`which_backend`, which answers for a given call without running it.
    """
    return _RECENT.get("backend")


_TRACKERS: list[Counter] = []


@contextlib.contextmanager
def track_backends() -> Iterator[Counter]:
    """Count the backends eager op calls run on inside the block: ``Counter({"triton": 24, ...})``, empty when no
    visattn op ran (``visattn bench`` shows it per row). Like :func:`last_backend`, traced calls record nothing."""
    counts: Counter = Counter()
    _TRACKERS.append(counts)
    try:
        yield counts
    finally:
        _TRACKERS.remove(counts)


def _record(chosen: str) -> str:
    # Eager calls only: dynamo folds is_compiling() to True, so a compiled graph writes no Python state here.
    if not torch.compiler.is_compiling():
        _RECENT["backend"] = chosen
        for counts in _TRACKERS:
            counts[chosen] += 1
    return chosen


def _choose(op: str, backend: str, query: Tensor, why_not: Callable[[], str | None],
            cuda_fallback: str = "reference") -> str:
    """Resolve ``backend`` for one call through the shared policy (``visattn.backends.choose``).

    ``auto`` never sends CPU tensors to the Triton interpreter (that is for tests, which force ``"triton"``), and
    falls back to ``cuda_fallback`` on CUDA (agent attention's fused SDPA path) or the reference on the CPU.
    """
    wanted = backends.resolve(backend, FAMILY)

    def reason() -> str | None:
        if wanted == "auto" and not query.is_cuda:
            return "CPU tensors run the exact reference under backend='auto'"
        return why_not()

    fallback = cuda_fallback if query.is_cuda else "reference"
    return backends.choose(op, wanted, reason, FAMILY, fallback=fallback)


def _dense_schedule_allowed(backend: str | None) -> bool:
    """The CPU fast paths (``dense_schedule``) replace the reference under "auto" in eager mode; a forced
    "reference" and traced graphs (whose mask tables would be traced too) keep the neighbour-table reference."""
    return backends.resolve(backend, FAMILY) == "auto" and not torch.compiler.is_compiling()


# ================================================================================================ validated calls
# A model makes the same few calls every step, and the checks and backend choice of a call are a pure function of
# its tensors' geometry (shape, strides, dtype, device, requires_grad), its other arguments, the default backend
# and the grad mode. Calls that chose the fused kernels are remembered under that key, so a repeated call skips
# straight to the kernel (eager mode only; traced calls run the checks once while tracing anyway).
_VALIDATED: dict = {}


def _geometry(t) -> tuple | list | None:
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.layout != torch.strided:
        return [t]  # unhashable: the call takes the full checks, which name the argument
    # the pointer's 16-byte alignment too: the compiled kernels are specialised on it
    return (t.shape, t.stride(), t.dtype, t.device, type(t), t.requires_grad, t.data_ptr() % 16 == 0)


def _validated_key(*parts) -> tuple:
    """The cache key of an eager call (the caller skips traced and fake calls, ``caching.may_cache``: a fake tensor
    has no data pointer)."""
    # grad mode and requires_grad are part of it: a why_not may refuse a call that autograd will differentiate
    return (*parts, backends.get_backend(FAMILY), torch.is_grad_enabled())


def _prepared(key):
    """The remembered call of ``key`` or None (also for an unhashable key: that call is checked in full)."""
    if key is None:
        return None
    try:
        return _VALIDATED.get(key)
    except TypeError:
        return None


def _remember_validated(key, value) -> None:
    if key is None or value is None:
        return
    try:
        hash(key)
    except TypeError:
        return
    if len(_VALIDATED) > 4096:  # bounded: a process sees few geometries
        _VALIDATED.clear()
    _VALIDATED[key] = value


# ================================================================================================ neighborhood
def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, attention_kwargs, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
        backward_kv_tile_shape, backward_kv_splits, backward_use_pt_reduction, run_persistent_kernel,
        kernel_schedule, torch_compile, return_lse, rpb, dry_run=False):
    fast = None
    if not dry_run and attention_kwargs is None and (scale is None or type(scale) in (float, int)) \
            and may_cache(query, key, value, rpb):  # traced / fake calls run the checks (no data pointer there)
        fast = _validated_key("na", rank, _geometry(query), _geometry(key), _geometry(value), _geometry(rpb),
                              _geometry(additional_keys), _geometry(additional_values), kernel_size, stride,
                              dilation, is_causal, scale, backend, q_tile_shape, kv_tile_shape,
                              backward_q_tile_shape, backward_kv_tile_shape, backward_kv_splits,
                              backward_use_pt_reduction, run_persistent_kernel, kernel_schedule, torch_compile,
                              return_lse)
        hit = _prepared(fast)
        if hit is not None:
            result = hit(query, key, value, _rpb_in_compute_dtype(rpb, query), additional_keys, additional_values)
            if result is not None:
                _record("triton")
                return result  # contiguous: fresh kernel outputs
            _VALIDATED.pop(fast, None)  # retired (a cleared plan cache or a switched path flag)
    op = f"na{rank}d"
    backend = check_backend(backend, op)
    _check_qkv(query, key, value, (rank,), op)
    spatial = tuple(query.shape[1:-2])
    kernel = int_tuple(kernel_size, rank, "kernel_size")
    strd = int_tuple(stride, rank, "stride", default=1)
    dil = int_tuple(dilation, rank, "dilation", default=1)
    causal = bool_tuple(is_causal, rank, "is_causal")
    for dim in range(rank):
        length, kk, dd, ss = spatial[dim], kernel[dim], dil[dim], strd[dim]
        if kk * dd > length:
            raise ValueError(f"{op}: kernel_size*dilation must not exceed the input in every dimension; dimension "
                             f"{dim} has kernel_size={kk}, dilation={dd} but length {length} (spatial shape "
                             f"{spatial})")
        if ss > kk:
            raise ValueError(f"{op}: stride must not exceed kernel_size; dimension {dim} has stride={ss} > "
                             f"kernel_size={kk}")
    _check_rpb(rpb, query, kernel, op)
    if rpb is not None and any(s > 1 for s in strd):
        raise ValueError(f"{op}: rpb cannot be combined with stride > 1 (stride={strd}): offsets leave the table")
    _check_extra_kv(additional_keys, additional_values, query, value, op)
    scale = check_scale(scale, query.shape[-1])
    check_flag(return_lse, "return_lse")
    _check_natten_perf_args(
        rank, attention_kwargs,
        {"q_tile_shape": q_tile_shape, "kv_tile_shape": kv_tile_shape, "backward_q_tile_shape": backward_q_tile_shape,
         "backward_kv_tile_shape": backward_kv_tile_shape, "backward_kv_splits": backward_kv_splits},
        {"backward_use_pt_reduction": backward_use_pt_reduction, "run_persistent_kernel": run_persistent_kernel,
         "torch_compile": torch_compile},
        kernel_schedule,
    )
    rpb = _rpb_in_compute_dtype(rpb, query)
    args = (query, key, value, kernel, dil, strd, causal, rpb)
    chosen = _choose("na", backend, query, lambda: _triton_why_not("na", *args, additional_keys, additional_values))
    if dry_run:
        return chosen
    _record(chosen)
    if chosen == "triton" and fast is not None:
        _remember_validated(fast, _kernels.prepare_na(*args, scale, additional_keys, additional_values, return_lse))
    return _run_na(chosen, backend, args, scale, additional_keys, additional_values, return_lse)


def _run_na(chosen: str, backend, args: tuple, scale: float, additional_keys, additional_values, return_lse: bool):
    """Run validated neighborhood-attention arguments ``(q, k, v, kernel, dilation, stride, causal, rpb)`` on the
    chosen backend (na1d/2d/3d and sliding-tile attention, which is GNA)."""
    query, key, value, kernel, dil, strd, causal, rpb = args
    if chosen == "reference":
        if return_lse:
            return _contiguous(reference.na(*args, scale, additional_keys, additional_values, return_lse=True))
        if _dense_schedule_allowed(backend) and dense_schedule.worth_it(
                tuple(query.shape[1:-2]), kernel, dil, extra=additional_keys is not None):
            # small map, large window: one masked SDPA call beats the neighbour-by-neighbour reference (exact too)
            return _contiguous(dense_schedule.local_attention(query, key, value, kernel, dil, strd, causal, rpb,
                                                              scale))
        return _contiguous(reference.na(*args, scale, additional_keys, additional_values))
    return _contiguous(_kernels.na(*args, scale, additional_keys, additional_values, return_lse=return_lse))


def _packed_call(kind: str, qkv: Tensor, rank: int, rpb: Tensor | None, scale, key_parts: tuple,
                 views_calls: Callable[[], tuple], run: Callable) -> Tensor:
    """A local-attention call on the three views of a packed ``qkv`` ``[B, *spatial, 3, heads, head_dim]`` (a fused
    qkv projection's output, as the nn modules hold it): the same checks, backend choice and result as the views'
    call. Where the fused kernels run a call that autograd records for ``qkv``, one autograd node (eager) or one
    custom op (traced) takes ``qkv`` itself and the backward writes one packed gradient, without the unbind's stack
    of dq, dk, dv (three copies of the projection's gradient per call; one copy in a compiled graph).

    ``views_calls()`` (built only when a call is not a replay: closures cost host time) returns ``(views_call,
    normalize, prepare)``: ``views_call(q, k, v, rpb, dry_run=False)`` is the public op on the views (validation,
    backend choice, dry run), ``normalize()`` the pattern arguments as the kernels take them, ``prepare(q, k, v,
    args, rpb, scale)`` the views' ``PreparedCall``; ``run(qkv, *args, rpb, scale, prepared)``: the packed kernels."""
    if not isinstance(qkv, Tensor) or qkv.dim() != rank + 4 or qkv.shape[-3] != 3:
        raise ValueError(f"{kind}: qkv must be a [B, *spatial ({rank} dims), 3, heads, head_dim] tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if not (torch.is_grad_enabled() and qkv.requires_grad):
        return views_calls()[0](*qkv.unbind(-3), rpb)
    fast = None
    if (scale is None or type(scale) in (float, int)) and may_cache(qkv, rpb):
        fast = _validated_key(kind, _geometry(qkv), _geometry(rpb), *key_parts, scale)
    # (pattern arguments, scale, the views' PreparedCall) of a call that chose the kernels
    validated = _prepared(fast)
    rpb = _rpb_in_compute_dtype(rpb, qkv)  # the views' dtype
    if validated is not None and validated[2] is not None and validated[2].retired:
        validated = None  # a cleared plan cache or a switched path flag: prepare again
    if validated is None:
        query, key, value = qkv.unbind(-3)
        views_call, normalize, prepare = views_calls()
        if views_call(query, key, value, rpb, dry_run=True) != "triton":
            return views_call(query, key, value, rpb)
        args = normalize()
        scale = check_scale(scale, query.shape[-1])
        prepared = None if fast is None else prepare(query, key, value, args, rpb, scale)
        validated = (args, scale, prepared)
        _remember_validated(fast, validated)
    if not _kernels.packed_qkv_enabled():  # asked only once the kernels were chosen (they import Triton)
        return views_calls()[0](*qkv.unbind(-3), rpb)
    args, scale, prepared = validated
    _record("triton")
    return _contiguous(run(qkv, *args, rpb, scale, prepared))


# ``_na``'s remaining arguments as the public functions default them (no extra keys, NATTEN's tuning options unset)
_NA_PACKED_DEFAULTS = dict(additional_keys=None, additional_values=None, attention_kwargs=None, q_tile_shape=None,
                           kv_tile_shape=None, backward_q_tile_shape=None, backward_kv_tile_shape=None,
                           backward_kv_splits=None, backward_use_pt_reduction=False, run_persistent_kernel=True,
                           kernel_schedule=None, torch_compile=False, return_lse=False)


def _na_packed(rank: int, qkv: Tensor, kernel_size, stride, dilation, is_causal, scale, rpb: Tensor | None,
               backend) -> Tensor:
    """``na{rank}d`` on the views of a packed ``qkv`` (``_packed_call``), as the NA nn modules call it."""

    def views_calls():
        def views_call(q, k, v, table, dry_run=False):
            return _na(rank, q, k, v, kernel_size, stride, dilation, is_causal, scale, rpb=table, backend=backend,
                       dry_run=dry_run, **_NA_PACKED_DEFAULTS)

        def normalize():
            return (int_tuple(kernel_size, rank, "kernel_size"), int_tuple(dilation, rank, "dilation", default=1),
                    int_tuple(stride, rank, "stride", default=1), bool_tuple(is_causal, rank, "is_causal"))

        def prepare(q, k, v, args, table, scale):
            return _kernels.prepare_na(q, k, v, *args, table, scale, None, None)

        return views_call, normalize, prepare

    return _packed_call(_NA_PACKED_KINDS[rank], qkv, rank, rpb, scale,
                        (kernel_size, stride, dilation, is_causal, backend), views_calls, _kernels.na_packed)


_NA_PACKED_KINDS = {1: "na1d", 2: "na2d", 3: "na3d"}


_NA_DOC = """{rank}-D neighborhood attention (NA / DiNA / GNA) on heads-last ``[B, {spatial}, heads, head_dim]``.

    NATTEN 0.21's ``natten.na{rank}d``: same parameter names, positional order and semantics (docs/SEMANTICS.md),
    so ``natten.na{rank}d(q, k, v, 7, 2)`` and ``visattn.na{rank}d(q, k, v, 7, 2)`` both mean kernel 7, stride 2.
    Every query attends the ``kernel_size`` keys around it (windows clamped inward at the borders), optionally
    dilated, strided, causal per dimension, plus any additional (global) tokens, in one softmax.

    Args:
        query: ``[B, {spatial}, heads, head_dim]``, any strides (views of a fused qkv projection are read in place).
        key: same shape, dtype and device as ``query`` (grouped-query attention is not supported).
        value: ``[B, {spatial}, heads, head_dim_v]``; ``head_dim_v`` may differ from ``head_dim``.
        kernel_size: int or {rank}-tuple, the neighborhood size per dimension; ``kernel_size * dilation`` must not
            exceed the input length in any dimension.
        stride: int or {rank}-tuple (default 1): groups of ``stride`` queries share the window of their group's
            centre query (``stride == kernel_size`` is blocked attention); ``1 <= stride <= kernel_size``.
        dilation: int or {rank}-tuple (default 1): each dimension splits into ``dilation`` interleaved groups that
            attend only within themselves.
        is_causal: bool or {rank}-tuple of bools (default False): causal masking per dimension.
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        additional_keys: ``[B, n, heads, head_dim]`` extra tokens every query attends besides its neighborhood
            (one joint softmax, no bias on them), or None. Given together with ``additional_values``.
        additional_values: ``[B, n, heads, head_dim_v]`` values of the extra tokens, or None.
        attention_kwargs: NATTEN's options for its separate attention() call over the extra tokens (backend, tile
            sizes, ...). Accepted for compatibility and ignored: visattn attends the extra tokens inside the same
            fused kernel. Keys other than NATTEN's attention() performance arguments raise ``ValueError``.
        backend: None or "auto" (default): the fused Triton kernel for CUDA tensors where it can run (fp16, bf16,
            fp32, head_dim <= 256, ...), else the exact PyTorch reference (always on the CPU). "reference"
            forces the reference; "triton" forces the kernel or raises ``ValueError`` saying why it cannot run.
            The default for None/"auto" can be changed with ``visattn.backends.set_backend(..., "attention")``.
            NATTEN's backend names ("cutlass-fna", "flex-fna", ...) raise ``ValueError``.
        q_tile_shape, kv_tile_shape, backward_q_tile_shape, backward_kv_tile_shape, backward_kv_splits,
        backward_use_pt_reduction, run_persistent_kernel, kernel_schedule, torch_compile: NATTEN's performance
            knobs for its CUTLASS/flex kernels. Type-checked, then ignored: they never change results, and
            visattn's engine picks its own tiles per (rank, dtype, head_dim, kernel, map size).
        return_lse: also return the log-sum-exp of each query's logits (natural log, NATTEN's layout).
        rpb: visattn only, keyword-only. Relative positional bias ``[heads, {rpb_shape}]`` (NAT/DiNAT), added to
            the logit of (query i, key j) at ``rpb[h, kj - qi + kernel_size - 1, ...]`` in dilation-group
            coordinates; not allowed with stride > 1. Trainable (gradients flow to it). Any float dtype: it is
            added in the logits' precision (float32; float64 for float64 inputs), so a float64 table gives exactly
            what ``rpb.float()`` gives.

    Returns:
        ``[B, {spatial}, heads, head_dim_v]`` in ``query``'s dtype (contiguous); with ``return_lse=True`` a tuple
        ``(output, lse)`` where ``lse`` is ``[B, {spatial}, heads]`` float32 (float64 for float64 inputs).

    Raises:
        ValueError / TypeError naming the argument, before any compute, for a bad argument; ValueError saying why
        for a forced backend that cannot run the call.
    """


def na1d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None,
         attention_kwargs: dict | None = None, backend: str | None = None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction: bool = False, run_persistent_kernel: bool = True, kernel_schedule=None,
         torch_compile: bool = False, return_lse: bool = False, *, rpb: Tensor | None = None):
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
               backward_kv_tile_shape, backward_kv_splits, backward_use_pt_reduction, run_persistent_kernel,
               kernel_schedule, torch_compile, return_lse, rpb)


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None,
         attention_kwargs: dict | None = None, backend: str | None = None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction: bool = False, run_persistent_kernel: bool = True, kernel_schedule=None,
         torch_compile: bool = False, return_lse: bool = False, *, rpb: Tensor | None = None):
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
               backward_kv_tile_shape, backward_kv_splits, backward_use_pt_reduction, run_persistent_kernel,
               kernel_schedule, torch_compile, return_lse, rpb)


def na3d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
         dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False, scale: float | None = None,
         additional_keys: Tensor | None = None, additional_values: Tensor | None = None,
         attention_kwargs: dict | None = None, backend: str | None = None, q_tile_shape=None, kv_tile_shape=None,
         backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
         backward_use_pt_reduction: bool = False, run_persistent_kernel: bool = True, kernel_schedule=None,
         torch_compile: bool = False, return_lse: bool = False, *, rpb: Tensor | None = None):
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, attention_kwargs, backend, q_tile_shape, kv_tile_shape, backward_q_tile_shape,
               backward_kv_tile_shape, backward_kv_splits, backward_use_pt_reduction, run_persistent_kernel,
               kernel_schedule, torch_compile, return_lse, rpb)


na1d.__doc__ = _NA_DOC.format(rank=1, spatial="L", rpb_shape="2k-1")
na2d.__doc__ = _NA_DOC.format(rank=2, spatial="H, W", rpb_shape="2k0-1, 2k1-1")
na3d.__doc__ = _NA_DOC.format(rank=3, spatial="T, H, W", rpb_shape="2k0-1, 2k1-1, 2k2-1")


# ================================================================================================ window
def _window(query, key, value, window_size, shift, rpb, scale, backend, dry_run=False):
    fast = None
    if not dry_run and (scale is None or type(scale) in (float, int)) and may_cache(query, key, value, rpb):
        fast = _validated_key("window", _geometry(query), _geometry(key), _geometry(value), _geometry(rpb),
                              window_size, shift, scale, backend)
        hit = _prepared(fast)
        if hit is not None:
            result = hit(query, key, value, _rpb_in_compute_dtype(rpb, query), None, None)
            if result is not None:
                _record("triton")
                return result  # contiguous: a fresh kernel output
            _VALIDATED.pop(fast, None)  # retired (a cleared plan cache or a switched path flag)
    op = "window_attention"
    backend = check_backend(backend, op)
    rank = _check_qkv(query, key, value, (2, 3), op)
    spatial = tuple(query.shape[1:-2])
    window = int_tuple(window_size, rank, "window_size")
    shifts = int_tuple(shift, rank, "shift", minimum=0)
    for dim in range(rank):
        length, w, t = spatial[dim], window[dim], shifts[dim]
        if length % w:
            raise ValueError(f"{op}: window_size must divide the input; dimension {dim} has length {length}, "
                             f"window_size={w} (spatial shape {spatial}); pad the input first")
        if t >= w:
            raise ValueError(f"{op}: shift must satisfy 0 <= shift < window_size; dimension {dim} has shift={t}, "
                             f"window_size={w}")
    _check_rpb(rpb, query, window, op)
    scale = check_scale(scale, query.shape[-1])
    rpb = _rpb_in_compute_dtype(rpb, query)
    args = (query, key, value, window, shifts, rpb)
    chosen = _choose("window", backend, query, lambda: _triton_why_not("window", *args))
    if dry_run:
        return chosen
    _record(chosen)
    if chosen == "triton" and fast is not None:
        _remember_validated(fast, _kernels.prepare_window(*args, scale))
    if chosen == "reference" and _dense_schedule_allowed(backend):
        # timm's formulation (roll, partition, one batched masked SDPA call): as fast as stock Swin on the CPU and
        # exact; backend="reference" keeps the neighbour-table reference
        return _contiguous(dense_schedule.window_partition_attention(query, key, value, window, shifts, rpb, scale))
    impl = reference if chosen == "reference" else _kernels
    return _contiguous(impl.window(*args, scale))


def _window_packed(qkv: Tensor, window_size, shift, rpb: Tensor | None, scale, backend) -> Tensor:
    """``window_attention`` on the views of a packed ``qkv`` (``_packed_call``), as ``visattn.nn.WindowAttention``
    and the Swin blocks patched in place call it."""
    rank = qkv.dim() - 4 if isinstance(qkv, Tensor) and qkv.dim() == 7 else 2

    def views_calls():
        def views_call(q, k, v, table, dry_run=False):
            return _window(q, k, v, window_size, shift, table, scale, backend, dry_run=dry_run)

        def normalize():
            return int_tuple(window_size, rank, "window_size"), int_tuple(shift, rank, "shift", minimum=0)

        def prepare(q, k, v, args, table, scale):
            return _kernels.prepare_window(q, k, v, *args, table, scale)

        return views_call, normalize, prepare

    return _packed_call("window_attention", qkv, rank, rpb, scale, (window_size, shift, backend), views_calls,
                        _kernels.window_packed)


def window_attention(query: Tensor, key: Tensor, value: Tensor, window_size: IntOrTuple, shift: IntOrTuple = 0,
                     rpb: Tensor | None = None, scale: float | None = None, backend: str | None = None) -> Tensor:
    """Swin (2-D) / Video-Swin (3-D) window attention, shifted windows without roll, partition or mask tensors.

    Per dimension a position ``x`` belongs to window ``floor((x - shift) / window_size)`` and attends exactly the
    keys of its own window: numerically Swin's ``roll(-shift)`` + partition + shifted-window mask + ``roll(+shift)``.

    Args:
        query: ``[B, H, W, heads, head_dim]`` or ``[B, T, H, W, heads, head_dim]``, any strides.
        key: same shape, dtype and device as ``query``.
        value: ``[B, *spatial, heads, head_dim_v]``.
        window_size: int or per-dimension tuple; must divide the input in every dimension (pad first).
        shift: int or per-dimension tuple, ``0 <= shift < window_size`` (Swin's ``shift_size``).
        rpb: relative position bias ``[heads, 2w0-1, 2w1-1(, 2w2-1)]`` indexed by key-minus-query offset
            ``xj - xi + w - 1`` per dimension, or None. Convert Swin's ``relative_position_bias_table`` with
            :func:`visattn.nn.swin_rpb_to_visattn`.
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        backend: None/"auto" (the fused Triton kernel for CUDA tensors where it can run, else the reference),
            "reference", or "triton" (raises ``ValueError`` saying why when it cannot run).

    Returns:
        ``[B, *spatial, heads, head_dim_v]`` in ``query``'s dtype.
    """
    return _window(query, key, value, window_size, shift, rpb, scale, backend)


# ================================================================================================ agent
def _agent_sdpa(query, key, value, agents, agent_bias, query_bias, scale):
    """Agent attention as two fused SDPA calls (biases become additive masks)."""
    batch, heads = query.shape[0], query.shape[-2]
    spatial = query.shape[1:-2]

    def as_bhnd(t: Tensor) -> Tensor:
        return t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)

    def bias(b: Tensor | None) -> Tensor | None:
        return None if b is None else b.to(query.dtype)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    agent_values = sdpa(as_bhnd(agents), as_bhnd(key), as_bhnd(value), attn_mask=bias(agent_bias), scale=scale)
    out = sdpa(as_bhnd(query), as_bhnd(agents), agent_values, attn_mask=bias(query_bias), scale=scale)
    return out.transpose(1, 2).reshape(batch, *spatial, heads, value.shape[-1])


def _agent(query, key, value, agents, agent_bias, query_bias, scale, backend, dry_run=False):
    op = "agent_attention"
    backend = check_backend(backend, op, allow_sdpa=True)
    _check_qkv(query, key, value, (1, 2, 3), op)
    _check_tensor(agents, "agents")
    _check_like(agents, query, "agents")
    batch, heads, dim = query.shape[0], query.shape[-2], query.shape[-1]
    if agents.dim() != 4 or agents.shape[0] != batch or agents.shape[2:] != query.shape[-2:] or agents.shape[1] == 0:
        raise ValueError(f"{op}: agents must have shape [B, n_agents, heads, head_dim] = [{batch}, A, {heads}, "
                         f"{dim}] with A >= 1, got {tuple(agents.shape)}")
    tokens = 1
    for size in query.shape[1:-2]:
        tokens *= size
    n_agents = agents.shape[1]
    _check_bias(agent_bias, "agent_bias", query, (batch, heads, n_agents, tokens))
    _check_bias(query_bias, "query_bias", query, (batch, heads, tokens, n_agents))
    scale = check_scale(scale, dim)
    if backend == "sdpa":
        chosen = "sdpa"
    else:
        chosen = _choose("agent", backend, query, lambda: _triton_why_not("agent", query, key, value, agents),
                         cuda_fallback="sdpa")
    if dry_run:
        return chosen
    _record(chosen)
    if chosen == "sdpa":
        return _contiguous(_agent_sdpa(query, key, value, agents, agent_bias, query_bias, scale))
    impl = reference if chosen == "reference" else _kernels
    return _contiguous(impl.agent(query, key, value, agents, agent_bias, query_bias, scale))


def agent_attention(query: Tensor, key: Tensor, value: Tensor, agents: Tensor, agent_bias: Tensor | None = None,
                    query_bias: Tensor | None = None, scale: float | None = None,
                    backend: str | None = None) -> Tensor:
    """Agent attention (Han et al., ECCV 2024): agents attend the keys, then the queries attend the agents.

    ``agent_values = softmax(scale * agents @ keyᵀ + agent_bias) @ value`` and
    ``out = softmax(scale * query @ agentsᵀ + query_bias) @ agent_values``; spatial dims are flattened to
    ``N`` tokens. The paper's depthwise-conv term belongs to the module (:class:`visattn.nn.AgentAttention`).

    Args:
        query: ``[B, *spatial, heads, head_dim]`` (1, 2 or 3 spatial dims).
        key: same shape, dtype and device as ``query``.
        value: ``[B, *spatial, heads, head_dim_v]``.
        agents: ``[B, A, heads, head_dim]`` agent tokens (Agent-Swin pools them from the queries).
        agent_bias: additive bias broadcastable to ``[B, heads, A, N]`` (agents -> keys), or None.
        query_bias: additive bias broadcastable to ``[B, heads, N, A]`` (queries -> agents), or None.
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        backend: None/"auto" (the fused Triton kernels for CUDA tensors where they can run, else two SDPA calls;
            the reference on the CPU), "triton" (raises ``ValueError`` saying why when it cannot run), "sdpa"
            (two ``scaled_dot_product_attention`` calls, the biases as additive masks) or "reference".

    Returns:
        ``[B, *spatial, heads, head_dim_v]`` in ``query``'s dtype.
    """
    return _agent(query, key, value, agents, agent_bias, query_bias, scale, backend)


# ================================================================================================ bi-level routing
def _bilevel_routing(query, key, value, regions, topk, scale, backend, return_routing, dry_run=False):
    op = "bilevel_routing_attention"
    backend = check_backend(backend, op)
    _check_qkv(query, key, value, (2,), op)
    grid = int_tuple(regions, 2, "regions")
    height, width = query.shape[1], query.shape[2]
    if grid[0] > height or grid[1] > width:
        raise ValueError(f"{op}: regions {grid} exceed the map size {(height, width)}")
    topk = positive_int(topk, "topk")
    if topk > grid[0] * grid[1]:
        raise ValueError(f"{op}: topk must be in [1, regions] = [1, {grid[0] * grid[1]}], got topk={topk}")
    scale = check_scale(scale, query.shape[-1])
    check_flag(return_routing, "return_routing")
    chosen = _choose("bilevel_routing", backend, query,
                     lambda: _triton_why_not("bilevel_routing", query, key, value, grid, topk))
    if dry_run:
        return chosen
    _record(chosen)
    if chosen == "reference" and _dense_schedule_allowed(backend) and not return_routing:
        # BiFormer's gather formulation on SDPA: faster than the reference's einsums on the CPU, same routing;
        # backend="reference" keeps the reference
        return _contiguous(dense_schedule.routed_gather_attention(query, key, value, grid, topk, scale))
    impl = reference if chosen == "reference" else _kernels
    return _contiguous(impl.bilevel_routing(query, key, value, grid, topk, scale, return_routing=return_routing))


def bilevel_routing_attention(query: Tensor, key: Tensor, value: Tensor, regions: IntOrTuple, topk: int,
                              scale: float | None = None, backend: str | None = None, return_routing: bool = False):
    """BiFormer's bi-level routing attention on 2-D maps (docs/SEMANTICS.md).

    The map is cut into ``regions`` (zero-padded at the bottom/right when they do not divide it); each query region
    routes to the ``topk`` regions whose mean key has the largest affinity with its mean query (not
    differentiated, as in BiFormer), and every query token attends all tokens of those regions in one softmax.

    Args:
        query: ``[B, H, W, heads, head_dim]``, any strides.
        key: same shape, dtype and device as ``query``.
        value: ``[B, H, W, heads, head_dim_v]``.
        regions: int ``S`` or ``(Sh, Sw)``: the region grid (BiFormer's ``n_win``); at most the map size.
        topk: routed regions per query region, ``1 <= topk <= Sh * Sw``.
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        backend: None/"auto" (the fused Triton kernels for CUDA tensors where they can run, else the reference),
            "reference", or "triton" (raises ``ValueError`` saying why when it cannot run).
        return_routing: also return the routing index ``[B, Sh*Sw, topk]`` (int64, row-major region ids).

    Returns:
        ``[B, H, W, heads, head_dim_v]`` in ``query``'s dtype, or ``(output, routing)`` with ``return_routing``.
    """
    return _bilevel_routing(query, key, value, regions, topk, scale, backend, return_routing)


# ================================================================================================ sliding tile
def _sliding_tile(query, key, value, tile_size, kernel_tiles, scale, additional_keys, additional_values, backend,
                  return_lse, dry_run=False):
    op = "sliding_tile_attention"
    backend = check_backend(backend, op)
    _check_qkv(query, key, value, (3,), op)
    spatial = tuple(query.shape[1:4])
    tile = int_tuple(tile_size, 3, "tile_size")
    window = int_tuple(kernel_tiles, 3, "kernel_tiles")
    for dim in range(3):
        if spatial[dim] % tile[dim]:
            raise ValueError(f"{op}: tile_size must divide the video in every dimension (STA tiles the whole "
                             f"canvas); dimension {dim} has length {spatial[dim]}, tile_size={tile[dim]} (video "
                             f"{spatial}); pad the latent first")
    _check_extra_kv(additional_keys, additional_values, query, value, op)
    scale = check_scale(scale, query.shape[-1])
    check_flag(return_lse, "return_lse")
    # STA's window in tiles as NATTEN's clamped window, stride = tile (GNA): docs/SEMANTICS.md
    kernel = tuple(sliding_tile_kernel(w, n // t) * t for w, n, t in zip(window, spatial, tile, strict=True))
    args = (query, key, value, kernel, (1, 1, 1), tile, (False, False, False), None)
    chosen = _choose("sliding_tile", backend, query,
                     lambda: _triton_why_not("sliding_tile", *args, additional_keys, additional_values))
    if dry_run:
        return chosen
    _record(chosen)
    return _run_na(chosen, backend, args, scale, additional_keys, additional_values, return_lse)


def sliding_tile_attention(query: Tensor, key: Tensor, value: Tensor, tile_size: IntOrTuple = (6, 8, 8),
                           kernel_tiles: IntOrTuple = (3, 3, 3), scale: float | None = None,
                           additional_keys: Tensor | None = None, additional_values: Tensor | None = None,
                           backend: str | None = None, return_lse: bool = False):
    """Sliding-tile attention (STA; Zhang et al. 2025, "Fast Video Generation with Sliding Tile Attention") on
    heads-last video ``[B, T, H, W, heads, head_dim]``.

    The video is cut into tiles of ``tile_size`` tokens; every query of a tile attends the keys of the
    ``kernel_tiles`` tiles around its tile, the window's centre tile clamped so the window stays inside the video
    (FastVideo's mask: ``|clamp(t, k//2, tiles-1-k//2) - u| <= k//2`` per dimension; an even ``k`` covers
    ``k + 1`` tiles, a window wider than the video covers all of it). That is exactly GNA: ``na3d`` with
    ``kernel_size = window * tile`` and ``stride = tile``, which is how it runs (the Triton engine on CUDA, the
    exact reference elsewhere).

    Args:
        query: ``[B, T, H, W, heads, head_dim]``, any strides.
        key: same shape, dtype and device as ``query``.
        value: ``[B, T, H, W, heads, head_dim_v]``.
        tile_size: tokens per tile, an int or ``(t, h, w)``; must divide the video (STA's release: ``(6, 8, 8)``).
        kernel_tiles: the window in tiles, an int or ``(t, h, w)`` (the release's example: ``(3, 3, 3)``; its
            searched per-layer/head strategies are lists of such triples, one call per choice here).
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        additional_keys: ``[B, n, heads, head_dim]`` tokens every query attends too (text), one softmax; or None.
        additional_values: ``[B, n, heads, head_dim_v]``, given together with ``additional_keys``.
        backend: None/"auto", "reference" or "triton" (raises ``ValueError`` saying why when it cannot run).
        return_lse: also return the natural-log LSE ``[B, T, H, W, heads]`` (float32; float64 for float64 inputs).

    Returns:
        ``[B, T, H, W, heads, head_dim_v]`` in ``query``'s dtype, or ``(output, lse)`` with ``return_lse``.
    """
    return _sliding_tile(query, key, value, tile_size, kernel_tiles, scale, additional_keys, additional_values,
                         backend, return_lse)


# ================================================================================================ radial
def check_decay(value, name: str = "decay_factor") -> float:
    """A finite number > 0 (Radial Attention's ``decay_factor``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def radial_attention_mask(frames: int, tokens_per_frame: int, block_size: int = 128, decay_factor: float = 1.0,
                          attention_sink: bool = True) -> Tensor:
    """Radial Attention's static block mask ``[nb, nb]`` (bool, CPU, ``nb = ceil(frames * tokens_per_frame /
    block_size)``): query block ``i`` attends key block ``j`` iff ``mask[i, j]``. The released builder's arithmetic
    (docs/SEMANTICS.md); a fresh copy, so callers may modify it."""
    frames = positive_int(frames, "frames")
    tokens_per_frame = positive_int(tokens_per_frame, "tokens_per_frame")
    block_size = positive_int(block_size, "block_size")
    return radial_block_mask(frames, tokens_per_frame, block_size, check_decay(decay_factor),
                             check_flag(attention_sink, "attention_sink")).clone()


def _radial(query, key, value, block_size, decay_factor, attention_sink, scale, additional_keys, additional_values,
            backend, dry_run=False):
    op = "radial_attention"
    backend = check_backend(backend, op)
    _check_qkv(query, key, value, (3,), op)
    block_size = positive_int(block_size, "block_size")
    decay_factor = check_decay(decay_factor)
    check_flag(attention_sink, "attention_sink")
    _check_extra_kv(additional_keys, additional_values, query, value, op)
    scale = check_scale(scale, query.shape[-1])
    chosen = _choose("radial", backend, query, lambda: _triton_why_not(
        "radial", query, key, value, block_size, additional_keys, additional_values))
    if dry_run:
        return chosen
    _record(chosen)
    if chosen == "reference":
        batch, frames, height, width, heads, _ = query.shape
        mask = radial_mask(frames, height * width, block_size, decay_factor, attention_sink)
        out = reference.block_sparse(query.flatten(1, 3), key.flatten(1, 3), value.flatten(1, 3), mask, block_size,
                                     scale, additional_keys, additional_values)
        return _contiguous(out.view(batch, frames, height, width, heads, value.shape[-1]))
    return _contiguous(_kernels.radial(query, key, value, block_size, decay_factor, attention_sink, scale,
                                       additional_keys, additional_values))


def radial_attention(query: Tensor, key: Tensor, value: Tensor, block_size: int = 128, decay_factor: float = 1.0,
                     attention_sink: bool = True, scale: float | None = None, additional_keys: Tensor | None = None,
                     additional_values: Tensor | None = None, backend: str | None = None) -> Tensor:
    """Radial Attention (Li et al. 2025; mit-han-lab/radial-attention) on heads-last video
    ``[B, T, H, W, heads, head_dim]``: a static O(n log n) spatio-temporal block mask whose spatial band shrinks as
    the temporal distance grows (mask: :func:`radial_attention_mask`, docs/SEMANTICS.md).

    Tokens are flattened frame-major (``T``, then ``H * W`` per frame); query ``i`` attends key ``j`` iff their
    blocks of ``block_size`` tokens are paired in the mask, plus every additional (text) token, in one softmax.

    Args:
        query: ``[B, T, H, W, heads, head_dim]``, any strides.
        key: same shape, dtype and device as ``query``.
        value: ``[B, T, H, W, heads, head_dim_v]``.
        block_size: the mask's block (the release: 128; also its split threshold).
        decay_factor: scales the spatial band of distant frames (the release's default 1; its Wan 2.1 script
            passes 0.2, its HunyuanVideo script 0.95).
        attention_sink: every frame attends all of frame 0 (the release's Wan masks; False for HunyuanVideo).
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        additional_keys: ``[B, n, heads, head_dim]`` tokens every query attends too (text), one softmax; or None.
        additional_values: ``[B, n, heads, head_dim_v]``, given together with ``additional_keys``.
        backend: None/"auto" (the block-sparse Triton kernels on CUDA where they can run, else the reference:
            masked attention chunked over query blocks), "reference", or "triton".

    Returns:
        ``[B, T, H, W, heads, head_dim_v]`` in ``query``'s dtype.
    """
    return _radial(query, key, value, block_size, decay_factor, attention_sink, scale, additional_keys,
                   additional_values, backend)


# ================================================================================================ vmoba
VMOBA_SELECT_MODES = ("threshold", "topk")
VMOBA_THRESHOLD_TYPES = ("query_head", "head_global", "overall")


def vmoba_options(chunk_size, select_mode: str = "threshold", topk: int = 3, threshold: float = 0.25,
                  threshold_type: str = "query_head") -> dict:
    """VMoBA's arguments checked without an input (the modules and processors check them at construction):
    a dict of the normalised values, ``chunk_size`` as a 1-3 tuple."""
    if _is_int(chunk_size):
        chunk = (positive_int(chunk_size, "chunk_size"),)
    elif isinstance(chunk_size, (tuple, list)) and len(chunk_size) in (1, 2, 3):
        if not all(_is_int(c) for c in chunk_size):
            raise TypeError(f"chunk_size must be an int or a tuple of 1-3 ints, got {chunk_size!r}")
        if any(c < 1 for c in chunk_size):
            raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
        chunk = tuple(int(c) for c in chunk_size)
    elif isinstance(chunk_size, (tuple, list)):
        raise ValueError(f"chunk_size must be an int (frames) or a 2-tuple (h, w) or 3-tuple (t, h, w), got "
                         f"{chunk_size!r}")
    else:
        raise TypeError(f"chunk_size must be an int or a tuple of 1-3 ints, got {chunk_size!r}")
    if select_mode not in VMOBA_SELECT_MODES:
        raise ValueError(f"select_mode must be one of {VMOBA_SELECT_MODES}, got {select_mode!r}")
    topk = positive_int(topk, "topk")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if threshold_type not in VMOBA_THRESHOLD_TYPES:
        raise ValueError(f"threshold_type must be one of {VMOBA_THRESHOLD_TYPES}, got {threshold_type!r}")
    return {"chunk_size": chunk, "select_mode": select_mode, "topk": topk, "threshold": float(threshold),
            "threshold_type": threshold_type}


def _vmoba(query, key, value, chunk_size, select_mode, topk, threshold, threshold_type, scale, additional_keys,
           additional_values, backend, dry_run=False):
    op = "vmoba_attention"
    backend = check_backend(backend, op)
    _check_qkv(query, key, value, (3,), op)
    opts = vmoba_options(chunk_size, select_mode, topk, threshold, threshold_type)
    chunk, spatial = opts["chunk_size"], tuple(query.shape[1:4])
    dims = spatial[-len(chunk):] if len(chunk) > 1 else spatial[:1]
    if len(chunk) > 1 and any(n % c for n, c in zip(dims, chunk, strict=True)):
        raise ValueError(f"{op}: a {len(chunk)}-D chunk_size must divide the video's last {len(chunk)} dimensions "
                         f"{dims}, got chunk_size={chunk}")
    if len(chunk) == 1 and chunk[0] > spatial[0]:
        raise ValueError(f"{op}: chunk_size={chunk[0]} frames exceeds the video's {spatial[0]} frames")
    _check_extra_kv(additional_keys, additional_values, query, value, op)
    scale = check_scale(scale, query.shape[-1])
    chosen = _choose("vmoba", backend, query, lambda: _triton_why_not(
        "vmoba", query, key, value, additional_keys, additional_values))
    if dry_run:
        return chosen
    _record(chosen)
    impl = reference if chosen == "reference" else _kernels
    return _contiguous(impl.vmoba(query, key, value, chunk, opts["select_mode"], opts["topk"], opts["threshold"],
                                  opts["threshold_type"], scale, additional_keys, additional_values))


def vmoba_attention(query: Tensor, key: Tensor, value: Tensor, chunk_size: int | Sequence[int],
                    select_mode: str = "threshold", topk: int = 3, threshold: float = 0.25,
                    threshold_type: str = "query_head", scale: float | None = None,
                    additional_keys: Tensor | None = None, additional_values: Tensor | None = None,
                    backend: str | None = None) -> Tensor:
    """VMoBA, mixture-of-block attention for video (Wu et al. 2025; KwaiVGI/VMoBA), on heads-last video
    ``[B, T, H, W, heads, head_dim]``.

    Keys are cut into chunks (``chunk_size``: an int = whole frames (1-D), ``(h, w)`` patches over all frames
    (2-D), ``(t, h, w)`` cubes (3-D); the paper cycles the three over the layers). Each query (per head) keeps
    its own chunk and picks others by the affinity of its query with each chunk's mean key: ``select_mode="topk"``
    keeps ``topk`` chunks in all; ``"threshold"`` (the release's default) min-max normalises the affinities over
    ``threshold_type`` ("query_head": per query; "head_global": per head over all queries of the sample;
    "overall": over the whole sample) and keeps the largest until they hold ``threshold`` of the total. The query
    then attends every key of its chunks (plus the additional tokens) in one softmax. The choice is not
    differentiated. As in the release, a call in which no query picks a chunk besides its own attends densely.

    Args:
        query: ``[B, T, H, W, heads, head_dim]``, any strides.
        key: same shape, dtype and device as ``query``.
        value: ``[B, T, H, W, heads, head_dim_v]``.
        chunk_size: int (frames per chunk, at most T) or a 2-/3-tuple dividing ``(H, W)`` / ``(T, H, W)``.
        select_mode: "threshold" or "topk".
        topk: chunks per query with ``select_mode="topk"``, its own included (the release's ``moba_topk``).
        threshold: the share of the normalised affinity to keep, in [0, 1] (the release's default 0.25).
        threshold_type: "query_head" (default), "head_global" or "overall" (per sample here; the release takes the
            last two over its whole packed batch).
        scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        additional_keys: ``[B, n, heads, head_dim]`` tokens every query attends too (text), one softmax; or None.
        additional_values: ``[B, n, heads, head_dim_v]``, given together with ``additional_keys``.
        backend: None/"auto" (the block-sparse Triton kernels on CUDA, routed on the device, where they can run;
            else the reference), "reference", or "triton".

    Returns:
        ``[B, T, H, W, heads, head_dim_v]`` in ``query``'s dtype.
    """
    return _vmoba(query, key, value, chunk_size, select_mode, topk, threshold, threshold_type, scale,
                  additional_keys, additional_values, backend)


# ================================================================================================ halo
def _check_halo_table(table, name: str, query: Tensor, length: int, op: str) -> None:
    _check_tensor(table, name)
    if table.device != query.device:
        raise ValueError(f"{op}: {name} is on {table.device} but query is on {query.device}")
    want = (length, query.shape[-1])
    if tuple(table.shape) != want:
        raise ValueError(f"{op}: {name} must have shape [2*(block_size + 2*halo_size) - 1, head_dim] = "
                         f"{list(want)}, got {tuple(table.shape)}")


def _halo(query, key, value, block_size, halo_size, rel_h, rel_w, scale, backend, dry_run=False):
    op = "halo_attention"
    backend = check_backend(backend, op)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
        if t.dim() != 5:
            raise ValueError(f"{op}: {name} must have 5 dims [B, H, W, heads, head_dim], got shape {tuple(t.shape)}")
    for t, name in ((key, "key"), (value, "value")):
        _check_like(t, query, name)
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{op}: key and value must match in all but head_dim: key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}")
    if key.shape[0] != query.shape[0] or key.shape[-2:] != query.shape[-2:]:
        raise ValueError(f"{op}: key must match query in batch, heads and head_dim: query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}")
    if any(s == 0 for s in query.shape) or any(s == 0 for s in value.shape):
        raise ValueError(f"{op}: query, key and value must not have empty dimensions, got query "
                         f"{tuple(query.shape)}, value {tuple(value.shape)}")
    block = int_tuple(block_size, 2, "block_size")
    halo = int_tuple(halo_size, 2, "halo_size", minimum=0)
    for dim in range(2):
        length, b, q_len = key.shape[1 + dim], block[dim], query.shape[1 + dim]
        if length % b:
            raise ValueError(f"{op}: block_size must divide the key map; dimension {dim} has length {length}, "
                             f"block_size={b}; pad the input first")
        blocks = length // b
        if q_len % blocks or q_len // blocks > b:
            raise ValueError(f"{op}: query must split into the {blocks} key blocks of dimension {dim} with at most "
                             f"block_size={b} queries each; query length {q_len}, key length {length}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError(f"{op}: rel_h and rel_w must be given together")
    if rel_h is not None:
        for table, name, dim in ((rel_h, "rel_h", 0), (rel_w, "rel_w", 1)):
            _check_halo_table(table, name, query, 2 * (block[dim] + 2 * halo[dim]) - 1, op)
        rel_h, rel_w = (_rpb_in_compute_dtype(t, query) for t in (rel_h, rel_w))
    scale = check_scale(scale, query.shape[-1])
    args = (query, key, value, block, halo, rel_h, rel_w)
    chosen = _choose("halo", backend, query, lambda: _triton_why_not("halo", *args))
    if dry_run:
        return chosen
    _record(chosen)
    impl = reference if chosen == "reference" else _kernels
    return _contiguous(impl.halo(*args, scale))


def halo_attention(query: Tensor, key: Tensor, value: Tensor, block_size: IntOrTuple, halo_size: IntOrTuple,
                   rel_h: Tensor | None = None, rel_w: Tensor | None = None, scale: float | None = None,
                   backend: str | None = None) -> Tensor:
    """HaloNet's blocked local self-attention (Vaswani et al., 2021; timm's ``HaloAttn``), docs/SEMANTICS.md.

    The key map is cut into ``block_size`` blocks; the queries split into as many blocks (``qb = Hq / (H / b)``
    queries per block and dimension: ``b`` at stride 1, ``b / 2`` when timm strides its query projection). Every
    query of a block attends all ``win = b + 2 * halo_size`` positions of the window around its key block (starting
    at ``block * b - halo_size``), zero-padded at the borders: a padded key has logit ``0 + relative logits`` and
    value 0 and takes part in the softmax. The relative logits are content-dependent and added unscaled: query
    ``i`` (in its block) and window key ``j`` get ``q . rel_h[j0 - i0 + win0 - 1] + q . rel_w[j1 - i1 + win1 - 1]``
    (timm's ``PosEmbedRel`` indexing; rows below ``win - qb`` are never read). Pass ``rel * scale`` for timm's
    ``scale_pos_embed=True``.

    Args:
        query: ``[B, Hq, Wq, heads, head_dim]``, any strides.
        key: ``[B, H, W, heads, head_dim]`` (same batch, heads, head_dim, dtype and device as ``query``).
        value: ``[B, H, W, heads, head_dim_v]``.
        block_size: int or ``(b0, b1)``; must divide ``H`` and ``W``.
        halo_size: int or ``(h0, h1)``, ``>= 0``.
        rel_h, rel_w: the relative tables ``[2 * win0 - 1, head_dim]`` and ``[2 * win1 - 1, head_dim]`` shared by
            all heads (timm's ``pos_embed.height_rel`` / ``width_rel``), both or neither (None: no relative logits).
        scale: softmax scale of ``q . k``, a finite number > 0; None means ``head_dim ** -0.5``.
        backend: None/"auto" (the fused Triton kernel for CUDA tensors where it can run, else the reference),
            "reference", or "triton" (raises ``ValueError`` saying why when it cannot run).

    Returns:
        ``[B, Hq, Wq, heads, head_dim_v]`` in ``query``'s dtype.
    """
    return _halo(query, key, value, block_size, halo_size, rel_h, rel_w, scale, backend)


# ================================================================================================ op specs
@dataclass(frozen=True)
class OpSpec:
    """One attention op's record: everything dispatch, ``which_backend`` and ``visattn info`` read about it.

    Args:
        key: the canonical op name (``_choose``'s policy key, the kernel registry's ``attention.<key>``).
        public: the public functions, by name, that run this op (``na1d``/``na2d``/``na3d`` share one kernel).
        ranks: the spatial ranks the op takes (``na1d``/``na2d``/``na3d`` one each, in order).
        description: one line for ``visattn info`` and the kernel registry.
        kernel: the fused Triton entry point in ``visattn.kernels`` (None when the kernels cannot be imported).
        why_not: its predicate: why the kernel cannot run a call (None when it can).
        probe_args: ``device -> args`` of a small call for ``why_not``, ``visattn info``'s capability probe.
        backends: the backends the op can take besides ``"auto"``.
        aliases: other names that mean this op (accepted by :func:`which_backend` and :func:`op_spec`).
    """

    key: str
    public: tuple[str, ...]
    ranks: tuple[int, ...]
    description: str
    kernel: Callable | None
    why_not: Callable[..., str | None] | None
    probe_args: Callable[[str], tuple]
    backends: tuple[str, ...] = ("reference", "triton")
    aliases: tuple[str, ...] = ()


def _probe_map(device: str) -> Tensor:
    return torch.empty(1, 8, 8, 1, 16, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)


def _probe_video(device: str) -> Tensor:
    return torch.empty(1, 4, 8, 8, 1, 16, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)


def _probe_args(build: Callable[[Tensor], tuple]) -> Callable[[str], tuple]:
    return lambda device: build(_probe_map(device))


_k = _kernels  # None on a broken install: every spec then has no kernel and no predicate
OP_SPECS: tuple[OpSpec, ...] = (
    OpSpec("na", ("na1d", "na2d", "na3d"), (1, 2, 3),
           "neighborhood attention (NA/DiNA/GNA, 1-3 D), fused forward + backward",
           _k and _k.na, _k and _k.na_why_not,
           _probe_args(lambda q: (q, q, q, (3, 3), (1, 1), (1, 1), (False, False), None, None, None)),
           aliases=("neighborhood", "neighborhood_attention")),
    OpSpec("window", ("window_attention",), (2, 3),
           "(shifted) window attention (Swin / Video Swin), fused forward + backward",
           _k and _k.window, _k and _k.window_why_not,
           _probe_args(lambda q: (q, q, q, (4, 4), (0, 0), None))),
    OpSpec("agent", ("agent_attention",), (1, 2, 3),
           "agent attention (Agent-Transformer), both softmax stages fused, forward + backward",
           _k and _k.agent, _k and _k.agent_why_not,
           _probe_args(lambda q: (q, q, q, q[:, 0])), backends=("reference", "triton", "sdpa")),
    OpSpec("bilevel_routing", ("bilevel_routing_attention",), (2,),
           "bi-level routing attention (BiFormer), routed regions read in place",
           _k and _k.bilevel_routing, _k and _k.bilevel_routing_why_not,
           _probe_args(lambda q: (q, q, q, (2, 2), 1)), aliases=("routing", "bra", "BRA")),
    OpSpec("halo", ("halo_attention",), (2,),
           "HaloNet blocked attention (zero-padded halo windows, relative logits), fused forward + backward",
           _k and _k.halo, _k and _k.halo_why_not,
           _probe_args(lambda q: (q, q, q, (4, 4), (1, 1), q.new_empty(11, 16), q.new_empty(11, 16)))),
    OpSpec("sliding_tile", ("sliding_tile_attention",), (3,),
           "sliding-tile attention (STA) as GNA with stride = tile, fused forward + backward",
           _k and _k.na, _k and _k.na_why_not,
           lambda device: (lambda q: (q, q, q, (6, 8, 8), (1, 1, 1), (2, 4, 4), (False,) * 3, None, None, None))(
               _probe_video(device)),
           aliases=("sta", "STA")),
    OpSpec("radial", ("radial_attention",), (3,),
           "Radial Attention: static block-sparse mask (CSR), fused forward + backward, text tokens in one softmax",
           _k and _k.radial, _k and _k.radial_why_not,
           lambda device: (lambda q: (q, q, q, 16, None, None))(_probe_video(device))),
    OpSpec("vmoba", ("vmoba_attention",), (3,),
           "VMoBA: per-query key-chunk routing on the device, the block-sparse kernels with per-row choices",
           _k and _k.vmoba, _k and _k.vmoba_why_not,
           lambda device: (lambda q: (q, q, q, None, None))(_probe_video(device))),
)
_SPECS = {spec.key: spec for spec in OP_SPECS}
# The one alias table: every accepted name (canonical key, public function name, alias) -> the canonical key.
OP_ALIASES: dict[str, str] = {name: spec.key for spec in OP_SPECS for name in (spec.key, *spec.public, *spec.aliases)}


def op_spec(name: str) -> OpSpec:
    """The :class:`OpSpec` of an op, by its canonical key, a public function name or an alias ("bra")."""
    if not isinstance(name, str):
        raise TypeError(f"op must be a str, got {type(name).__name__}")
    if name not in OP_ALIASES:
        raise ValueError(f"op must be one of {sorted(OP_ALIASES)}, got {name!r}")
    return _SPECS[OP_ALIASES[name]]


# ================================================================================================ diagnostics
# Each public function's dry run (the same checks and backend choice, no compute), in OP_SPECS order.
_DRY_RUN_FNS = {
    "na1d": lambda **a: _na(1, **a, dry_run=True),
    "na2d": lambda **a: _na(2, **a, dry_run=True),
    "na3d": lambda **a: _na(3, **a, dry_run=True),
    "window_attention": lambda **a: _window(**a, dry_run=True),
    "agent_attention": lambda **a: _agent(**a, dry_run=True),
    "bilevel_routing_attention": lambda **a: _bilevel_routing(**a, dry_run=True),
    "halo_attention": lambda **a: _halo(**a, dry_run=True),
    "sliding_tile_attention": lambda **a: _sliding_tile(**a, dry_run=True),
    "radial_attention": lambda **a: _radial(**a, dry_run=True),
    "vmoba_attention": lambda **a: _vmoba(**a, dry_run=True),
}
assert set(_DRY_RUN_FNS) == {name for spec in OP_SPECS for name in spec.public}, "an OpSpec public op has no dry run"


def which_backend(op: str, *args, **kwargs) -> str:
    """The backend ("reference", "triton" or "sdpa") that ``visattn.<op>(*args, **kwargs)`` would run, without
    running it. The same checks run, so a bad call raises the same error. A pure function: safe to call anywhere,
    and the ops themselves record nothing (which keeps them ``torch.compile(fullgraph=True)``-safe).

    Args:
        op: a public op name: "na1d", "na2d", "na3d", "window_attention", "agent_attention",
            "bilevel_routing_attention", "sliding_tile_attention", "radial_attention", "vmoba_attention"; an op with
            one public function may also be named by its canonical key or an alias (``OP_ALIASES``: "window",
            "agent", "bilevel_routing", "routing", "bra", "BRA", "sliding_tile", "sta", "STA", "radial", "vmoba").
        *args, **kwargs: the op's arguments, exactly as the op takes them.
    """
    spec = op_spec(op) if isinstance(op, str) and op in OP_ALIASES else None
    if spec is None or (op not in spec.public and len(spec.public) != 1):
        accepted = sorted(name for name, key in OP_ALIASES.items()
                          if name in _DRY_RUN_FNS or len(_SPECS[key].public) == 1)
        raise ValueError(f"op must be one of {accepted}, got {op!r}")
    public_name = op if op in spec.public else spec.public[0]
    bound = inspect.signature(globals()[public_name]).bind(*args, **kwargs)
    bound.apply_defaults()
    return _DRY_RUN_FNS[public_name](**bound.arguments)


def which_path(op: str, *args, **kwargs) -> tuple[str, str]:
    """``(path, why)`` for ``visattn.<op>(*args, **kwargs)``, without running it: "reference" / "sdpa" (with the
    reason the fused kernel was not chosen), "triton:small-map" (one program per dilation group or window: small
    maps such as NAT's 14x14 and 7x7 stages and Swin windows) or "triton:tiled" (the halo-tiled kernels, with the
    reason the small-map path declined), "triton:map" / "triton:regions" / "triton:mixed" for the routing kernels'
    schedules (``kernels.routing_path``), or "triton" for the agent kernels. Same arguments and validation as
    :func:`which_backend`."""
    backend = which_backend(op, *args, **kwargs)
    key = OP_ALIASES[op]
    public_name = op if op in _SPECS[key].public else _SPECS[key].public[0]
    bound = inspect.signature(globals()[public_name]).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if backend != "triton":
        query = a["query"]
        why = ("CPU tensors run the exact reference under backend='auto'" if not query.is_cuda
               and backends.resolve(a.get("backend"), FAMILY) == "auto" else None)
        if why is None and _kernels is not None and key in ("na", "window"):
            why = _triton_why_not(key, *_path_args(key, a))
        return backend, why or f"backend={a.get('backend')!r}"
    if key == "bilevel_routing":
        path, why = _kernels.routing_path(a["query"].shape[1], a["query"].shape[2], int_tuple(a["regions"], 2,
                                                                                              "regions"))
        return f"triton:{path}", why
    if key not in ("na", "window"):
        return "triton", "one fused kernel family"
    query, value = a["query"], a["value"]
    rank = query.dim() - 3
    if key == "window":
        window = int_tuple(a["window_size"], rank, "window_size")
        shift = int_tuple(a["shift"], rank, "shift", minimum=0)
        path, why = _kernels.engine_path(query, value, a["rpb"], None, True, window, (1,) * rank, (1,) * rank,
                                         (False,) * rank, shift, a["key"])
    else:
        path, why = _kernels.engine_path(query, value, a["rpb"], a["additional_keys"], False,
                                         int_tuple(a["kernel_size"], rank, "kernel_size"),
                                         int_tuple(a["dilation"], rank, "dilation", default=1),
                                         int_tuple(a["stride"], rank, "stride", default=1),
                                         bool_tuple(a["is_causal"], rank, "is_causal"), (0,) * rank, a["key"])
    return f"triton:{path}", why


def _path_args(key: str, a: dict) -> tuple:
    """The ``*_why_not`` arguments of a bound na / window call."""
    query = a["query"]
    rank = query.dim() - 3
    if key == "window":
        return (query, a["key"], a["value"], int_tuple(a["window_size"], rank, "window_size"),
                int_tuple(a["shift"], rank, "shift", minimum=0), a["rpb"])
    return (query, a["key"], a["value"], int_tuple(a["kernel_size"], rank, "kernel_size"),
            int_tuple(a["dilation"], rank, "dilation", default=1), int_tuple(a["stride"], rank, "stride", default=1),
            bool_tuple(a["is_causal"], rank, "is_causal"), a["rpb"], a["additional_keys"], a["additional_values"])


def _probe(spec: OpSpec) -> Callable[[str], str | None]:
    """``visattn info``'s capability probe of one fused kernel on a device (a small float16 call)."""

    def probe(device: str) -> str | None:
        return _triton_why_not(spec.key, *spec.probe_args(device))

    return probe


for _spec in OP_SPECS:
    backends.register_kernel(f"attention.{_spec.key}", FAMILY, _probe(_spec), _spec.description)


def available_backends(device: str = "cpu") -> dict:
    """For ``visattn info``: every op's backends and why each cannot run on ``device`` (None = it can)."""
    probes = {"reference": lambda spec: None, "triton": lambda spec: _probe(spec)(device), "sdpa": lambda spec: None}
    return {spec.key: {b: probes[b](spec) for b in spec.backends} for spec in OP_SPECS}


__all__ = ["OP_ALIASES", "OP_SPECS", "OpSpec", "agent_attention", "available_backends", "bilevel_routing_attention",
           "halo_attention", "last_backend", "na1d", "na2d", "na3d", "op_spec", "radial_attention",
           "radial_attention_mask", "sliding_tile_attention", "track_backends", "vmoba_attention", "vmoba_options",
           "which_backend", "which_path", "window_attention"]
