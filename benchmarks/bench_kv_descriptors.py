"""Pointer loads against TMA tensor-descriptor loads in the tiled engine, same process, against cuDNN.

Cases (bf16): the kernel-equals-map "dense" case (128x128 map, kernel 128, 24 heads x 128: every window is the whole
map, so no tile is masked or wasted and the row measures the engine's per-pair rate against cuDNN's), FLUX-4K NA
kernel 80 and GNA kernel 80 stride 16 (256x256, 24 x 128, B1), HunyuanVideo's 30x48x80 latent with an 18x24x24
kernel (3-D, B1), and NAT-T stages 1 and 2 (B256, head_dim 32, kernel 7). Each case times the forward with pointer
loads and with descriptor loads (``ops.KV_DESCRIPTORS``), and forward+backward where the case says so (all three
passes switch together), plus forward volume candidates at FLUX-4K. Every variant's output is compared with the
pointer-load output of the same case (``max_diff``). Medians of CUDA-event timings (``triton.testing.do_bench``);
ratios are cuDNN's time over ours. Rows are written as they finish, so a run cut by ``--time-budget`` keeps them.

Usage (repo root, CUDA, Hopper): python benchmarks/bench_kv_descriptors.py --out /tmp/out/kv-descriptors.json
    [--time-budget 240]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn import kernels  # noqa: E402
from visattn.bench.common import environment, require_cuda, write_json  # noqa: E402
from visattn.kernels import ops, tiles  # noqa: E402

VOLUME_KEY = ("fwd", 16, 128, "large")
# name: (batch, map, heads, head_dim, kernel, stride, time forward+backward, forward volume candidates)
CASES = {
    "dense_as_na_128sq": (1, (128, 128), 24, 128, (128, 128), (1, 1), False, ()),
    "flux4k_na_k80": (1, (256, 256), 24, 128, (80, 80), (1, 1), True, ((128, 64, 8, 3), (128, 128, 8, 2))),
    "flux4k_gna_k80_s16": (1, (256, 256), 24, 128, (80, 80), (16, 16), True, ((128, 64, 8, 3),)),
    "hunyuan_na": (1, (30, 48, 80), 24, 128, (18, 24, 24), (1, 1, 1), True, ()),
    "nat_s1": (256, (56, 56), 2, 32, (7, 7), (1, 1), True, ()),
    "nat_s2": (256, (28, 28), 4, 32, (7, 7), (1, 1), True, ()),
}


def _bench(fn, rep: int = 150) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=3, rep=rep, return_mode="median")


def _configure(volume: tuple | None, descriptors: bool, shipped: tuple) -> None:
    tiles._VOLUMES[VOLUME_KEY] = volume or shipped
    tiles.choose_tiles.cache_clear()
    tiles.volume_key.cache_clear()
    ops._PLANS.clear()
    ops.KV_DESCRIPTORS = descriptors


def _dense_ms(q, k, v) -> tuple[float, float]:
    """cuDNN SDPA forward and forward+backward over the same tokens (heads-first copies made once)."""
    batch, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    joint = [t.reshape(batch, -1, heads, d).transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn_like(joint[0])
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        with torch.no_grad():
            fwd = _bench(lambda: F.scaled_dot_product_attention(*joint))
        both = _bench(lambda: torch.autograd.backward(F.scaled_dot_product_attention(*joint), grad), rep=300)
    return fwd, both


def _variant(name, call, q, k, v, leaves, grad, backward: bool, ref, dense: tuple) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        out = call(q, k, v)
    torch.cuda.synchronize()
    plan = next(p for key, p in ops._PLANS.items() if key[0] == "fwd")
    ref = out.float() if ref is None else ref
    row = {"variant": name, "fwd_descriptors": getattr(plan, "kv_desc", None) is not None,
           "max_diff": (out.float() - ref).abs().max().item()}
    with torch.no_grad():
        row["fwd_ms"] = _bench(lambda: call(q, k, v))
    row["fwd_x_cudnn"] = dense[0] / row["fwd_ms"]
    if backward:
        def fwd_bwd():
            torch.autograd.backward(call(*leaves), grad)

        fwd_bwd()
        bplan = next(p for key, p in ops._PLANS.items() if key[0] == "bwd")
        row["bwd_descriptors"] = [getattr(bplan, "dq_desc", None) is not None,
                                  getattr(bplan, "dkv_desc", None) is not None]
        row["fwd_bwd_ms"] = _bench(fwd_bwd, rep=300)
        row["fwd_bwd_x_cudnn"] = dense[1] / row["fwd_bwd_ms"]
    return row, ref


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; later variants are skipped")
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of case names")
    args = parser.parse_args(argv)
    missing = require_cuda("bench_kv_descriptors")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    start = time.time()
    shipped = tiles._VOLUMES[VOLUME_KEY]
    default_loads = ops.KV_DESCRIPTORS  # restored after each case (None: on by default on Hopper)
    result = {"bench": "kv-descriptors", **environment(), "rows": []}
    torch.manual_seed(0)
    for case in args.cases.split(","):
        batch, spatial, heads, d, kernel, stride, backward, volumes = CASES[case]
        q, k, v = (torch.randn(batch, *spatial, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dense = _dense_ms(q, k, v)
        result["rows"].append({"case": case, "variant": "cudnn", "fwd_ms": dense[0], "fwd_bwd_ms": dense[1]})
        rank = len(spatial)

        def call(q, k, v, kernel=kernel, stride=stride, rank=rank, d=d):
            return kernels.na(q, k, v, kernel, (1,) * rank, stride, (False,) * rank, None, d ** -0.5, None, None)

        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        grad = torch.randn_like(q)
        ref = None
        variants = [("pointer", None, False, backward), ("descriptor", None, True, backward)]
        variants += [(f"descriptor_{vol}", vol, True, False) for vol in volumes]
        for name, volume, descriptors, with_bwd in variants:
            if time.time() - start > args.time_budget:
                print(f"time budget spent: {case} {name} and later skipped", flush=True)
                break
            _configure(volume, descriptors, shipped)
            try:
                row, ref = _variant(name, call, q, k, v, leaves, grad, with_bwd, ref, dense)
            except Exception as err:  # a variant that fails to compile is a result too
                row = {"variant": name, "error": repr(err)[:600]}
            row = {"case": case, "volume": list(volume or shipped), **row}
            result["rows"].append(row)
            print(row, flush=True)
            write_json(args.out, result)
        _configure(None, default_loads, shipped)
        del q, k, v, leaves
    write_json(args.out, result)
    print("| case | variant | fwd ms | x cuDNN | fwd+bwd ms | x cuDNN |")
    for r in result["rows"]:
        if "fwd_ms" in r:
            print(f"| {r['case']} | {r['variant']} | {r['fwd_ms']:.3f} | {r.get('fwd_x_cudnn', 1.0):.2f} | "
                  f"{r.get('fwd_bwd_ms', math.nan):.3f} | {r.get('fwd_bwd_x_cudnn', math.nan):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
