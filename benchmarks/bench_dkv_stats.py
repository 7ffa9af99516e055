"""Where the dK/dV pass reads its query boxes' LSE and delta (``ops.DKV_STATS``), timed per kernel in one process.

"rows" reads them from the ``[B, *spatial, heads]`` tensors by per-element pointer (the shipped default), "pointer"
from their head-major copy by a scalar plus a loop-invariant offset, "descriptor" from that copy through TMA. For
each stage (``tune_tiles.stage_step``: no bias) and setting: the engine's kernel GPU times over ``--reps`` profiled
forward+backward calls, every CUDA kernel's total over one more call (``common.kernel_gpu_ms``: the copy's two
kernels included), and the largest difference of the output and gradients from the "rows" setting's (the same LSE
and delta reach the same products, so 0 is expected).

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

from visattn.bench import common  # noqa: E402
from visattn.kernels import ops  # noqa: E402

MODES = ("rows", "pointer", "descriptor")


def main(argv: list[str] | None = None) -> int:
    from tune_tiles import STAGES, _kernel_ms, stage_step

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
        step = stage_step(stage)
        reference = None
        for mode in MODES:
            if time.time() > deadline:
                break
            ops.DKV_STATS = mode
            ops._PLANS.clear()
            results = step()
            kernels = _kernel_ms(step, args.reps)
            all_ms = round(sum(common.kernel_gpu_ms(step).values()), 4)
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
