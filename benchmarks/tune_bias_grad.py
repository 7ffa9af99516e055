"""Launch choices of the bias-gradient kernel (``kernels/bias_tiles._bias_grad_kernel``) at NAT-T stages 1-3.

B256, bf16, head_dim 32, a trained 13x13 bias: for each (programs kept by the batch chunking, pipeline stages,
warps) the kernel's GPU time in one profiled backward. Exploratory: the chosen values are ``ops.BIAS_GRAD_*``.

Usage (repo root, CUDA): python benchmarks/tune_bias_grad.py --out /tmp/out/tune-bias-grad.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visattn  # noqa: E402
from visattn.bench import common  # noqa: E402
from visattn.kernels import ops  # noqa: E402

STAGES = {"nat_s1": ((56, 56), 2), "nat_s2": ((28, 28), 4), "nat_s3": ((14, 14), 8)}
CHOICES = [(p, s, w) for p in (1024, 4096, 16384) for s in (1, 2, 3) for w in (4, 8) if w == 4 or s == 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    missing = common.require_cuda("tune_bias_grad")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    rows = []
    for name, (spatial, heads) in STAGES.items():
        qkv = torch.randn(256, *spatial, 3, heads, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        table = (torch.randn(heads, 13, 13, device="cuda", dtype=torch.bfloat16) * 0.1).requires_grad_(True)
        q, k, v = qkv.unbind(-3)
        out = visattn.na2d(q, k, v, kernel_size=7, rpb=table)
        grad = torch.randn_like(out)
        for programs, stages, warps in CHOICES:
            ops.BIAS_GRAD_PROGRAMS, ops.BIAS_GRAD_STAGES, ops.BIAS_GRAD_WARPS = programs, stages, warps
            ops._PLANS.clear()

            def step(out=out, leaves=(qkv, table), grad=grad):
                torch.autograd.grad(out, leaves, grad, retain_graph=True)

            kernels = common.kernel_gpu_ms(step)
            ms = sum(v for k, v in kernels.items() if "bias_grad" in k)
            rows.append(dict(stage=name, programs=programs, stages=stages, warps=warps, ms=round(ms, 4)))
            print(rows[-1], flush=True)
    common.save_result("tune-bias-grad", {"batch": 256, "dtype": "bfloat16", "head_dim": 32, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
