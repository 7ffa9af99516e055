"""Where the host time of one public call goes, on the GPU machine: CPU timers around calls on an idle GPU, a
cProfile of forward+backward by own time, and calibration rows (a Python loop, one CUDA allocation, one cached
kernel launch, cuDNN SDPA) so the numbers can be compared across machines. Device script; prints tables only.

Usage (repo root, CUDA): python benchmarks/host_profile.py [--spatial 7 7 --heads 16] [--calls 200] [--top 22]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys

import torch
import torch.nn.functional as F
from engine_profile import host_us  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import visattn


def calibration(calls: int, shape) -> dict:
    """Host µs of reference operations on this machine."""
    rows = {}

    def py_loop():
        s = 0
        for i in range(1000):
            s += i
        return s

    rows["python loop of 1000 adds"] = host_us(py_loop, calls)
    rows["torch.empty (cuda, bf16)"] = host_us(lambda: torch.empty(shape, device="cuda", dtype=torch.bfloat16),
                                               calls)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    rows["x.add_(1) (one launch)"] = host_us(lambda: x.add_(1), calls)
    q = torch.randn(shape[0], shape[-2], 49, 32, device="cuda", dtype=torch.bfloat16)
    rows["sdpa fwd (no grad)"] = host_us(lambda: F.scaled_dot_product_attention(q, q, q), calls)
    from visattn.kernels import ops

    pat = ops.make_pattern(2, False, (7, 7), (1, 1), (1, 1), (False, False), (0, 0))
    qkv = torch.randn(*shape[:-2], 3, *shape[-2:], device="cuda", dtype=torch.bfloat16)
    qq, kk, vv = qkv.unbind(-3)
    rows["ops.forward (plan cached)"] = host_us(lambda: ops.forward(qq, kk, vv, None, None, None, pat, 32 ** -0.5),
                                                calls)
    key = next(k for k in ops._PLANS if k[0] == "fwd")
    plan = ops._PLANS[key]
    out = torch.empty(plan.out_shape, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(plan.lse_shape, device="cuda", dtype=torch.float32)
    # the small-map kernel (cells.py) takes 6 tensors, the tiled one 8 (extra keys and values)
    launcher, tensors = ((ops._CELL_FWD, (qq, kk, vv, out, lse, qq)) if plan.cells else
                         (ops._FWD, (qq, kk, vv, out, lse, qq, qq, qq, qq)))
    rows["cached runner launch only"] = host_us(lambda: launcher(plan.launch, tensors), calls)
    rec = plan.launch
    rows["kernel[grid](...) launch"] = host_us(
        lambda: launcher.kernel[rec.grid](*tensors, *rec.scalars, **rec.constexprs, **rec.options), calls)
    return rows


def profile_case(args, shape, rpb_on: bool) -> None:
    """Host µs of na2d forward / forward+backward (and dense SDPA beside it), then a cProfile by own time."""
    qkv = torch.randn(args.batch, *args.spatial, 3, args.heads, 32, device="cuda", dtype=torch.bfloat16,
                      requires_grad=True)
    q, k, v = qkv.unbind(-3)
    rpb = (torch.zeros(args.heads, 13, 13, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           if rpb_on else None)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            visattn.na2d(q, k, v, 7, rpb=rpb)

    def fwd_bwd():
        visattn.na2d(q, k, v, 7, rpb=rpb).backward(grad)

    def dense_fwd_bwd():
        t = [x.flatten(1, 2).transpose(1, 2) for x in (q, k, v)]
        F.scaled_dot_product_attention(*t).transpose(1, 2).backward(grad.flatten(1, 2))

    ours, ours_bwd = host_us(fwd, args.calls), host_us(fwd_bwd, args.calls)
    dense = host_us(dense_fwd_bwd, args.calls)
    print(f"host   rpb={rpb_on!s:5s} fwd {ours:7.1f} us  fwd+bwd {ours_bwd:7.1f} us  dense fwd+bwd {dense:7.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fwd_bwd()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    text = buf.getvalue()
    print(text[text.find("ncalls"):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial", type=int, nargs="+", default=[7, 7])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=22)
    args = parser.parse_args(argv)
    shape = (args.batch, *args.spatial, args.heads, 32)
    for name, us in calibration(args.calls, shape).items():
        print(f"calib  {name:32s} {us:8.1f} us")
    for rpb_on in (False, True):
        profile_case(args, shape, rpb_on)
    return 0


if __name__ == "__main__":
    sys.exit(main())
