"""Shared measuring pieces: CUDA-event medians, the device's matmul and copy ceilings, result files."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch


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


def device_ceilings() -> dict:
    """Measured in this process: bf16 matmul TFLOP/s (8192³, random data) and copy GB/s (read + write counted)."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = median_ms(lambda: a @ b, iters=20)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), iters=20)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n**3 / matmul_ms / 1e9, "copy_gbs": 2 * (1 << 30) * 2 / copy_ms / 1e6}


def floor_ms(flops: float, nbytes: float, ceilings: dict) -> float:
    """The larger of compute time at the measured matmul rate and traffic time at the measured copy rate."""
    return max(flops / (ceilings["matmul_tflops"] * 1e9), nbytes / (ceilings["copy_gbs"] * 1e6))


def environment() -> dict:
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def save_result(name: str, payload: dict, out: str | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<date>.json`` (or ``out``) with the environment header."""
    env = environment()
    path = Path(out or f"benchmarks/results/{name}-{env['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": name, **env, **payload}, indent=2))
    return path
