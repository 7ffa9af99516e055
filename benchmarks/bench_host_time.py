"""Host time per public call and per GPU launch (issue 18: <= 25 us per launch), beside cuDNN SDPA's.

Each case runs a public op at a batch small enough that its GPU kernels finish before the host issues the next
call, so a CPU timer around back-to-back calls (no synchronisation inside the loop) measures host time. Modes:
forward without autograd, and forward+backward with every input and the bias requiring grad (autograd engine
included). Launches per call are counted with the CUDA profiler (every kernel the call enqueues, ours and torch's).
The peer is ``F.scaled_dot_product_attention`` (cuDNN) over the same tokens, timed the same way in the same process.
Medians of ``--repeats`` loops of ``--calls`` calls each. Two more rows per case time the registered custom ops
(``op_fwd``, ``op_bwd``) called as a ``torch.compile`` graph calls them: through ``torch.ops``, without autograd,
with the float32 output copy a trained bias asks for (no cuDNN peer on these rows).

Usage (repo root, CUDA): python benchmarks/bench_host_time.py --out /tmp/out/launch-host.json [--time-budget 120]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_profile import host_us  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import visattn  # noqa: E402
from visattn.bench.common import environment, require_cuda, write_json  # noqa: E402

# name: (op, batch, spatial, heads, head_dim, pattern keyword arguments, bias table shape or None)
CASES = {
    "nat_s3_14sq_rpb": ("na2d", 2, (14, 14), 8, 32, dict(kernel_size=7), (13, 13)),
    "nat_s4_7sq_rpb": ("na2d", 2, (7, 7), 16, 32, dict(kernel_size=7), (13, 13)),
    "dinat_s2_28sq_dil4": ("na2d", 2, (28, 28), 4, 32, dict(kernel_size=7, dilation=4), (13, 13)),
    "nat_s3_14sq": ("na2d", 2, (14, 14), 8, 32, dict(kernel_size=7), None),
    "swin_s3_14sq_shift": ("window_attention", 2, (14, 14), 12, 32, dict(window_size=7, shift=3), (13, 13)),
}


def _host_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of ``engine_profile.host_us`` (host µs per call of ``calls`` back-to-back calls),
    after warm-up calls that compile and plan."""
    for _ in range(20):
        fn()
    return statistics.median(host_us(fn, calls) for _ in range(repeats))


def _launches(fn) -> int:
    """GPU kernels one call enqueues (CUDA profiler)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _custom_op_calls(op: str, kwargs: dict, qkv, rpb, grad):
    """(forward, backward) closures calling ``visattn::local_attention_fwd`` / ``_bwd`` through ``torch.ops``
    without autograd, as the code ``torch.compile`` generates for a model calls them; ``rpb`` is the trained
    (leaf) table or None."""
    from visattn.kernels import ops

    rank = qkv.dim() - 4
    if op == "window_attention":
        window, kernel, dilation, shift = True, kwargs["window_size"], 1, kwargs.get("shift", 0)
    else:
        window, kernel, dilation, shift = False, kwargs["kernel_size"], kwargs.get("dilation", 1), 0
    pattern = (window, [kernel] * rank, [dilation] * rank, [1] * rank, [False] * rank, [shift] * rank,
               qkv.shape[-1] ** -0.5)
    q, k, v = qkv.unbind(-3)
    with torch.enable_grad():  # the float32 output copy is chosen at trace time, where the bias requires grad
        pat = ops.make_pattern(rank, *pattern[:6])
        fp32_out = ops.wants_fp32_out(q, rpb, v, None, pat)
    fwd_op, bwd_op = torch.ops.visattn.local_attention_fwd.default, torch.ops.visattn.local_attention_bwd.default

    def op_fwd():
        with torch.no_grad():
            return fwd_op(q, k, v, rpb, None, None, *pattern, fp32_out)

    out, lse, out32 = op_fwd()
    saved = out32 if fp32_out else out

    def op_bwd():
        with torch.no_grad():
            return bwd_op(grad, q, k, v, saved, lse, rpb, None, None, *pattern, None)

    return op_fwd, op_bwd


def _case_rows(name: str, case: tuple, calls: int, repeats: int) -> list[dict]:
    op, batch, spatial, heads, d, kwargs, table = case
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    qkv = randn(batch, *spatial, 3, heads, d)  # a fused projection's output, read in place
    rpb = None if table is None else (randn(heads, *table).float() * 0.02)
    grad = randn(batch, *spatial, heads, d)
    fn = getattr(visattn, op)
    rows = []
    leaf_qkv = qkv.clone().requires_grad_(True)
    leaf_rpb = None if rpb is None else rpb.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            q, k, v = qkv.unbind(-3)
            return fn(q, k, v, rpb=rpb, **kwargs)

    def fwd_bwd():
        q, k, v = leaf_qkv.unbind(-3)
        torch.autograd.backward(fn(q, k, v, rpb=leaf_rpb, **kwargs), grad)

    joint = qkv.flatten(1, len(spatial)).permute(2, 0, 3, 1, 4).contiguous()  # [3, B, heads, tokens, d]
    leaf_joint = joint.clone().requires_grad_(True)
    dense_grad = grad.flatten(1, len(spatial)).transpose(1, 2).contiguous()

    def dense_fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*joint.unbind(0))

    def dense_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.autograd.backward(F.scaled_dot_product_attention(*leaf_joint.unbind(0)), dense_grad)

    op_fwd, op_bwd = _custom_op_calls(op, kwargs, qkv, leaf_rpb, grad)
    for mode, ours, dense in (("fwd", fwd, dense_fwd), ("fwd_bwd", fwd_bwd, dense_fwd_bwd), ("op_fwd", op_fwd, None),
                              ("op_bwd", op_bwd, None)):
        with visattn.functional.track_backends() as used:
            ours()
        launches = _launches(ours)
        host = _host_us(ours, calls, repeats)
        dense_launches = None if dense is None else _launches(dense)
        dense_host = None if dense is None else _host_us(dense, calls, repeats)
        rows.append({"case": name, "op": op, "mode": mode, "batch": batch, "spatial": list(spatial), "heads": heads,
                     "head_dim": d, "rpb": table is not None, "backend": dict(used), "launches": launches,
                     "host_us": host, "host_us_per_launch": host / max(1, launches),
                     "cudnn_launches": dense_launches, "cudnn_host_us": dense_host})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds; later cases are skipped")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case names")
    parser.add_argument("--calls", type=int, default=500, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per row (the median is kept)")
    parser.add_argument("--no-descriptor-reuse", action="store_true",
                        help="build every TMA descriptor with Triton's constructor (ops.DESCRIPTOR_FIELD_REUSE off; "
                             "the head_dim-32 cases take descriptors only with VISATTN_KV_DESC=1)")
    args = parser.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    message = require_cuda("bench_host_time")
    if message:
        print(message, file=sys.stderr)
        return 2
    from visattn.kernels import ops

    ops.DESCRIPTOR_FIELD_REUSE = not args.no_descriptor_reuse
    result = {"bench": "launch-host", **environment(), "calls": args.calls, "repeats": args.repeats,
              "descriptor_field_reuse": ops.DESCRIPTOR_FIELD_REUSE, "rows": []}
    start = time.time()
    for name in names:
        if time.time() - start > args.time_budget:
            print(f"time budget spent: {name} and later skipped", flush=True)
            break
        for row in _case_rows(name, CASES[name], args.calls, args.repeats):
            result["rows"].append(row)
            print(row, flush=True)
        write_json(args.out, result)
    write_json(args.out, result)
    print("| case | mode | launches | host us | us / launch | cuDNN launches | cuDNN host us |")
    for r in result["rows"]:
        dense = "| — | — |" if r["cudnn_host_us"] is None else f"| {r['cudnn_launches']} | {r['cudnn_host_us']:.1f} |"
        print(f"| {r['case']} | {r['mode']} | {r['launches']} | {r['host_us']:.1f} | {r['host_us_per_launch']:.1f} "
              + dense)
    return 0


if __name__ == "__main__":
    sys.exit(main())
