"""FLUX 1024^2 block attention with its text tokens (issue #21's "slower than dense" case), kernel by kernel.

The image queries of a FLUX 1024^2 block (64x64 latent tokens, 24 heads x 128) attend a 2-D neighbourhood plus the
512 text tokens as additional keys/values; dense attention is cuDNN SDPA over all 4608 joint tokens. For dense,
NA k21 with and without the text keys, and GNA k32 stride 16 with them: forward and forward+backward wall medians
(CUDA events) and the GPU ms of each kernel of one forward+backward (torch.profiler). The text queries' own dense
attention (512 x 4608) is not included: it is the same in every row.

Usage (repo root, CUDA): python benchmarks/profile_flux_text.py --out /tmp/out/flux-text.json
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
from visattn.bench.common import kernel_gpu_ms, median_ms, save_result  # noqa: E402

BATCH, HEADS, HEAD_DIM, SIDE, TEXT = 1, 24, 128, 64, 512


def kernel_ms(fn) -> dict:
    """GPU ms per kernel of one call of ``fn`` (the eight largest)."""
    found = {name[:60]: round(ms, 3) for name, ms in kernel_gpu_ms(fn).items() if ms > 0.005}
    return dict(sorted(found.items(), key=lambda item: -item[1])[:8])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)

    q, k, v = (rand(BATCH, SIDE, SIDE, HEADS, HEAD_DIM) for _ in range(3))
    text_k, text_v = (rand(BATCH, TEXT, HEADS, HEAD_DIM) for _ in range(2))
    joint = [rand(BATCH, HEADS, SIDE * SIDE + TEXT, HEAD_DIM) for _ in range(3)]
    grad = rand(BATCH, SIDE, SIDE, HEADS, HEAD_DIM, grad=False)
    grad_joint = torch.randn_like(joint[0])

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*joint)

    cases = [
        ("dense_cudnn_4608", dense, grad_joint),
        ("na_k21_text", lambda: visattn.na2d(q, k, v, 21, additional_keys=text_k, additional_values=text_v), grad),
        ("na_k21", lambda: visattn.na2d(q, k, v, 21), grad),
        ("gna_k32_s16_text", lambda: visattn.na2d(q, k, v, 32, stride=16, additional_keys=text_k,
                                                   additional_values=text_v), grad),
    ]
    rows = []
    for name, fn, g in cases:
        def fwd_bwd(fn=fn, g=g):
            fn().backward(g)

        row = dict(case=name, fwd_ms=median_ms(fn, args.iters), fwd_bwd_ms=median_ms(fwd_bwd, args.iters),
                   kernels_fwd_bwd=kernel_ms(fwd_bwd))
        rows.append(row)
        print(name, f"{row['fwd_ms']:.3f}", f"{row['fwd_bwd_ms']:.3f}", row["kernels_fwd_bwd"], flush=True)
    save_result("flux-text-profile", dict(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, side=SIDE, text=TEXT,
                                          rows=rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
