"""Pieces every benchmark command shares: dtype names, the CUDA requirement, timing, floors, strict result files.

One spelling of dtype names on every command line (``fp32``, ``fp16``, ``bf16``; the full torch names ``float32``,
``float16``, ``bfloat16`` are accepted too) and one result writer: strict JSON (NaN and infinities become ``null``,
``allow_nan=False``, so every file parses in any JSON reader) with the environment header (date, device, torch,
triton, timm, python) every result file in ``benchmarks/results/`` carries.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

# short name -> torch dtype; the long names map to the same dtypes (argparse ``choices`` lists the short ones)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}


def parse_dtype(name: str, argument: str = "dtype") -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` -> ``torch.bfloat16``; a ``ValueError`` naming ``argument`` otherwise."""
    short = _LONG_NAMES.get(name, name)
    if short not in DTYPES:
        raise ValueError(f"{argument}={name!r}: choose one of {', '.join(DTYPES)} (or {', '.join(_LONG_NAMES)})")
    return DTYPES[short]


def short_dtype(name: str) -> str:
    """argparse ``type`` of every dtype flag: ``"float16"`` / ``"half"`` -> ``"fp16"``; unknown names come back
    unchanged for ``choices`` (which lists the documented short spellings) to refuse."""
    return _LONG_NAMES.get(name, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling result files use)."""
    return str(dtype).removeprefix("torch.")


def require_cuda(command: str) -> str | None:
    """None when a CUDA device is present, else the message a GPU-only command prints before exiting with 2."""
    if torch.cuda.is_available():
        return None
    return f"visattn {command} needs a CUDA GPU (none is visible here)"


# ----------------------------------------------------------------------------------------------- timing
def median_ms(fn: Callable[[], object], iters: int = 50, warmup: int = 5) -> float:
    """Median wall time of ``fn`` on the GPU in ms (CUDA events, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_gpu_ms(fn: Callable[[], object]) -> dict[str, float]:
    """GPU time in ms per CUDA kernel name over one call of ``fn`` (after one warm-up call), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    found: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if us > 0 and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            found[evt.key] = found.get(evt.key, 0.0) + us / 1e3
    return found


def op_ms_and_peak_mib(fn: Callable, inputs: list[torch.Tensor], backward: bool, iters: int = 30
                       ) -> tuple[float, float]:
    """(median ms, peak extra MiB) of ``fn(*inputs)``, plus the backward into every input when ``backward``."""
    grad = torch.randn_like(fn(*inputs))

    def step():
        out = fn(*inputs)
        if backward:
            torch.autograd.grad(out, inputs, grad)

    ms = median_ms(step, iters=iters)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def run_peer_benchmark(name: str, problems: list, run_problem: Callable, peers: tuple[str, ...], err_key: str,
                       dtype_name: str, out: str | None) -> int:
    """The shared body of the op-vs-peers commands (``bench-bra``, ``bench-agent``): measure every problem with
    ``run_problem(problem, dtype, ceilings)``, save ``<name>-<date>.json`` (or ``out``) and print a table."""
    missing = require_cuda(f"bench-{name}")
    if missing:
        print(missing)
        return 2
    dtype = parse_dtype(dtype_name, "--dtype")
    ceilings = device_ceilings()
    rows = [run_problem(p, dtype, ceilings) for p in problems]
    for row in rows:
        print(json.dumps(row))
    path = save_result(name, {"ceilings": ceilings, "rows": rows}, out)
    print(f"\nceilings: matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbs']:.0f} GB/s")
    print(f"{'problem':20s} {'peer':16s} {'fwd ms':>8s} {'%floor':>7s} {'fwd+bwd':>8s} {'peak MiB':>9s} {'err':>8s}")
    for row in rows:
        for peer in peers:
            r = row[peer]
            print(f"{row['problem']:20s} {peer:16s} {r['fwd_ms']:8.3f} {100 * row['fwd_floor_ms'] / r['fwd_ms']:6.0f}% "
                  f"{r['fwd_bwd_ms']:8.3f} {r['peak_mib']:9.0f} {r[err_key]:8.1e}")
    print(f"saved {path}")
    return 0


def _matmul_ms(n: int) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return median_ms(lambda: a @ b, iters=20)


def _copy_ms(elements: int) -> float:
    src = torch.randn(elements, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), iters=20)


def device_ceilings() -> dict:
    """Measured in this process: bf16 matmul TFLOP/s (8192³, random data) and copy GB/s (read + write counted)."""
    n, elements = 8192, 1 << 30  # the copy moves 2 GiB each way
    matmul_ms, copy_ms = _matmul_ms(n), _copy_ms(elements)
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbs": 2 * elements * 2 / copy_ms / 1e6}


def floor_ms(flops: float, nbytes: float, ceilings: dict) -> float:
    """The larger of compute time at the measured matmul rate and traffic time at the measured copy rate."""
    return max(flops / (ceilings["matmul_tflops"] * 1e9), nbytes / (ceilings["copy_gbs"] * 1e6))


# ----------------------------------------------------------------------------------------------- results
def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception:  # an optional package that is absent or broken is reported as null, never fatal
        return None


def environment(device: str | None = None) -> dict:
    """The header every result file carries: date, device name, library versions."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(torch.device(device)) if on_cuda else f"cpu ({platform.machine()})",
        "device_type": "cuda" if on_cuda else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "visattn": _version("visattn"),
        "python": platform.python_version(),
        "argv": sys.argv[1:],
    }


def strict(value):
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: NaN / inf -> None, tuples -> lists,
    torch dtypes and other objects -> their string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return str(value)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (see ``strict``); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(payload), indent=1, allow_nan=False) + "\n")
    return path


def write_csv(path: str | Path, rows: Iterable[dict], extra: dict | None = None) -> Path:
    """One CSV line per row (columns: the union of the rows' keys in first-seen order, then ``extra``'s keys, whose
    values repeat on every line). Nested values are written as JSON; NaN / inf as empty cells."""
    rows = [dict(strict(r), **strict(extra or {})) for r in rows]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    return path


def default_result_path(name: str, suffix: str = "json") -> Path:
    return Path("benchmarks/results") / f"{name}-{datetime.date.today().isoformat()}.{suffix}"


def save_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<date>.json`` (or ``out``) with the environment header, strict JSON."""
    return write_json(out or default_result_path(name), {"bench": name, **environment(), **payload})


__all__ = ["DTYPES", "default_result_path", "device_ceilings", "dtype_name", "environment", "floor_ms", "kernel_gpu_ms",
           "median_ms", "op_ms_and_peak_mib", "parse_dtype", "run_peer_benchmark", "require_cuda", "save_result",
           "strict", "write_csv", "write_json"]
