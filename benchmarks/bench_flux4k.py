"""FLUX-4K neighborhood attention against cuDNN in one process: forward and forward+backward wall times.

A 256x256 latent map, 24 heads x 128, B1, bf16: NA kernel 80 and GNA kernel 80 stride 16 through ``visattn.na2d``,
dense = cuDNN SDPA over the 65536 tokens (heads-first copies made once, outside the timing). Medians of CUDA-event
timed calls after one warm-up (5 forward, 3 forward+backward calls); ratios are dense time / ours (issue 21's
targets). Writes one JSON result.

Usage (repo root, CUDA): python benchmarks/bench_flux4k.py --out /tmp/out/flux4k-fwd-bwd.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visattn  # noqa: E402
from visattn.bench.common import median_ms, require_cuda, save_result  # noqa: E402

HEADS, HEAD_DIM, SIDE = 24, 128, 256
CASES = {"na_k80": dict(kernel_size=80), "gna_k80_s16": dict(kernel_size=80, stride=16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    missing = require_cuda("bench_flux4k")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shape = (1, SIDE, SIDE, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    joint = [t.detach().reshape(1, SIDE * SIDE, HEADS, HEAD_DIM).transpose(1, 2).contiguous().requires_grad_(True)
             for t in (q, k, v)]
    joint_grad = grad.reshape(1, SIDE * SIDE, HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    def dense_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), torch.no_grad():
            F.scaled_dot_product_attention(*joint)

    def dense_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.autograd.backward(F.scaled_dot_product_attention(*joint), joint_grad)

    rows = {"dense_cudnn": dict(fwd_ms=median_ms(dense_fwd, 5, warmup=1),
                                fwd_bwd_ms=median_ms(dense_fwd_bwd, 3, warmup=1))}
    for name, kwargs in CASES.items():
        def fwd(kwargs=kwargs):
            with torch.no_grad():
                visattn.na2d(q, k, v, **kwargs)

        def fwd_bwd(kwargs=kwargs):
            torch.autograd.backward(visattn.na2d(q, k, v, **kwargs), grad)

        rows[name] = dict(fwd_ms=median_ms(fwd, 5, warmup=1), fwd_bwd_ms=median_ms(fwd_bwd, 3, warmup=1))
    dense = rows["dense_cudnn"]
    for name, row in rows.items():
        row["fwd_x_dense"] = round(dense["fwd_ms"] / row["fwd_ms"], 2)
        row["fwd_bwd_x_dense"] = round(dense["fwd_bwd_ms"] / row["fwd_bwd_ms"], 2)
        print(name, row, flush=True)
    save_result("flux4k-fwd-bwd", {"shape": "FLUX-4K 256x256, 24 heads x 128, B1, bf16", "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
