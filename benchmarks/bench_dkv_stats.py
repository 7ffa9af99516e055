"""Where the dK/dV pass reads its query boxes' LSE and delta (``ops.DKV_STATS``), timed per kernel in one process.

"rows" reads them from the ``[B, *spatial, heads]`` tensors by per-element pointer (the shipped default), "pointer"
from their head-major copy by a scalar plus a loop-invariant offset, "descriptor" from that copy through TMA. For
each stage (``tune_tiles.STAGES``, no bias) and setting: the engine's kernel GPU times over ``--reps`` profiled
forward+backward calls, every CUDA kernel's total beside them (the copy's two kernels included), and the largest
difference of the output and gradients from the "rows" setting's (the same LSE and delta reach the same products, so
0 is expected).

Usage (repo root, CUDA): python benchmarks/bench_dkv_stats.py --out F.json [--stages hunyuan_na,flux4k_na_k80]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import visattn  # noqa: E402
from visattn.bench import common  # noqa: E402
from visattn.kernels import ops  # noqa: E402

MODES = ("rows", "pointer", "descriptor")


def _all_kernels_ms(fn, reps: int) -> float:
    """GPU time of every CUDA kernel of one ``fn()`` call, mean over ``reps`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            total += getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
    return round(total / 1e3 / reps, 4)


def main(argv: list[str] | None = None) -> int:
    from tune_tiles import STAGES, _kernel_ms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="flux4k_na_k80,flux4k_gna_k80_s16,hunyuan_na")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=240.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(common.require_cuda("bench_dkv_stats"), file=sys.stderr)
        return 2
    deadline = time.time() + args.time_budget
    rows = []
    for stage in args.stages.split(","):
        spatial, heads, dim, batch, kernel, stride, _, _ = STAGES[stage]
        torch.manual_seed(0)
        qkv = torch.randn(batch, *spatial, 3, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(batch, *spatial, heads, dim, device="cuda", dtype=torch.bfloat16)
        op = visattn.na3d if len(spatial) == 3 else visattn.na2d

        def step(qkv=qkv, grad=grad, op=op, kernel=kernel, stride=stride):
            q, k, v = qkv.unbind(-3)
            out = op(q, k, v, kernel_size=kernel, stride=stride)
            return (out, *torch.autograd.grad(out, [qkv], grad))

        reference = None
        for mode in MODES:
            if time.time() > deadline:
                break
            ops.DKV_STATS = mode
            ops._PLANS.clear()
            results = step()
            kernels = _kernel_ms(step, args.reps)
            all_ms = _all_kernels_ms(step, args.reps)
            mode_used = [p.dkv.constexprs.get("STATS") for key, p in ops._PLANS.items() if key[0] == "bwd"]
            if reference is None:
                reference = results
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results, reference, strict=True))
            rows.append(dict(stage=stage, mode=mode, kernel_mode=mode_used, kernels=kernels,
                             dkv_ms=kernels.get("_bwd_dkv_kernel"), attention_ms=round(sum(kernels.values()), 4),
                             all_kernels_ms=all_ms,
                             max_diff_vs_rows=err))
            print(rows[-1], flush=True)
    ops.DKV_STATS = "rows"
    ops._PLANS.clear()
    common.save_result("dkv-stats", {"stages": {s: STAGES[s] for s in args.stages.split(",")}, "rows": rows},
                       args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
