"""Where the host time of one public call goes: cProfile over repeated forward / forward+backward calls of one
stage shape on the GPU (NAT-T stage 4 by default), printed by own time. Device script; prints a table only.

    python benchmarks/host_profile.py [--spatial 7 7 --heads 16 --rpb]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

import visattn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial", type=int, nargs="+", default=[7, 7])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rpb", action="store_true")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    qkv = torch.randn(args.batch, *args.spatial, 3, args.heads, 32, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    q, k, v = qkv.unbind(-3)
    rpb = torch.zeros(args.heads, 13, 13, device="cuda", requires_grad=True) if args.rpb else None
    grad = torch.randn(args.batch, *args.spatial, args.heads, 32, device="cuda", dtype=torch.bfloat16)

    def fwd_bwd():
        visattn.na2d(q, k, v, 7, rpb=rpb).backward(grad)

    for _ in range(5):
        fwd_bwd()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(28)


if __name__ == "__main__":
    main()
