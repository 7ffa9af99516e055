"""Engine profile at the stage shapes of visattn's own models (NAT-T, DiNAT-T, Swin-T), batch 256, bf16.

For each stage: the fused engine's forward and forward+backward (rpb on / off), the time of each kernel
(torch.profiler, one step), and dense SDPA over the same tokens (cuDNN and flash) measured in the same process.
``--tiles`` also times alternative tile volumes for the forward, dQ and dK/dV passes. Each step is bounded by
``--time-budget`` (seconds) so a long run still writes its JSON.

Usage (repo root, CUDA):
    python benchmarks/engine_profile.py --out /tmp/out/engine.json [--tiles] [--stages nat_s1,swin_s3] [--packed]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# This checkout's visattn. `import visattn` loads the functional API and the kernels only (no timm, no models), so
# the engine is timed without a stub package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.bench import common  # noqa: E402  (imports only torch)
from visattn.kernels import tiles as tiles_mod  # noqa: E402

# name: (spatial, heads, kernel, dilation, window, shift); head_dim 32 everywhere (NAT-T, DiNAT-T, Swin-T)
STAGES = {
    "nat_s1": ((56, 56), 2, 7, 1, False, 0),
    "nat_s2": ((28, 28), 4, 7, 1, False, 0),
    "nat_s3": ((14, 14), 8, 7, 1, False, 0),
    "nat_s4": ((7, 7), 16, 7, 1, False, 0),
    "dinat_s1": ((56, 56), 2, 7, 8, False, 0),
    "dinat_s2": ((28, 28), 4, 7, 4, False, 0),
    "dinat_s3": ((14, 14), 8, 7, 2, False, 0),
    "swin_s1": ((56, 56), 3, 7, 1, True, 0),
    "swin_s1_shift": ((56, 56), 3, 7, 1, True, 3),
    "swin_s2_shift": ((28, 28), 6, 7, 1, True, 3),
    "swin_s3_shift": ((14, 14), 12, 7, 1, True, 3),
    "swin_s4": ((7, 7), 24, 7, 1, True, 0),
}


# the engine rows time with 3 warm-up calls (visattn.bench.common's default is 5)
median_ms = functools.partial(common.median_ms, warmup=3)


def make_inputs(batch, spatial, heads, dim, rpb, kernel, requires_grad):
    qkv = torch.randn(batch, *spatial, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.unbind(-3)
    table = None
    if rpb:
        table = (torch.randn(heads, *(2 * kernel - 1 for _ in spatial), device="cuda", dtype=torch.bfloat16) * 0.1)
        table.requires_grad_(requires_grad)
    return qkv, q, k, v, table


def run_engine(q, k, v, table, spatial, kernel, dil, window, shift):
    """One call through the public API (argument checks and dispatch included), as a model makes it."""
    from visattn import functional

    if window:
        return functional.window_attention(q, k, v, kernel, shift=shift, rpb=table)
    na = (functional.na1d, functional.na2d, functional.na3d)[len(spatial) - 1]
    return na(q, k, v, kernel, dilation=dil, rpb=table)


def host_us(fn, calls: int = 50) -> float:
    """Host time per call in µs: a CPU timer around ``calls`` back-to-back calls on an idle GPU (the launch queue
    does not fill at these sizes, so the timer sees the Python and launch cost, not the GPU's)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 1)


def engine_calls(q, k, v, table, grad, stage):
    """(forward without autograd, forward + backward) closures for one stage's inputs."""
    spatial, _, kernel, dil, window, shift = stage

    def fwd():
        with torch.no_grad():
            return run_engine(q, k, v, table, spatial, kernel, dil, window, shift)

    def fwd_bwd():
        run_engine(q, k, v, table, spatial, kernel, dil, window, shift).backward(grad)

    return fwd, fwd_bwd


def kernel_breakdown(fn):
    """GPU time per kernel name (ms) over one call of fn, via torch.profiler."""
    out = {}
    for name, ms in common.kernel_gpu_ms(fn).items():
        out[name[:60]] = round(ms, 4)
    top = dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])
    # totals: all GPU kernels, and visattn's attention kernels (engine + routing + the rpb reduction's matmuls
    # are not separable, so only the Triton kernels of the engine count here)
    top["_total_gpu_ms"] = round(sum(out.values()), 3)
    engine = ("_fwd_kernel", "_bwd_", "_delta_kernel", "_small", "_cell_", "_expand_", "_bias_grad")
    top["_attention_kernels_ms"] = round(sum(v for k, v in out.items() if k.startswith(engine)), 3)
    return top


def stage_rows(name, batch, iters, deadline):
    spatial, heads, kernel, dil, window, shift = STAGES[name]
    rows = []
    n = math.prod(spatial)
    for rpb in (False, True):
        if time.time() > deadline:
            break
        qkv, q, k, v, table = make_inputs(batch, spatial, heads, 32, rpb, kernel, True)
        grad = torch.randn(batch, *spatial, heads, 32, device="cuda", dtype=torch.bfloat16)
        fwd, fwd_bwd = engine_calls(q, k, v, table, grad, STAGES[name])

        t0 = time.time()
        row = {"stage": name, "rpb": rpb, "fwd_ms": median_ms(fwd, iters), "fwd_bwd_ms": median_ms(fwd_bwd, iters)}
        row["bwd_over_fwd"] = (row["fwd_bwd_ms"] - row["fwd_ms"]) / row["fwd_ms"]
        row["host_us_fwd"], row["host_us_fwd_bwd"] = host_us(fwd), host_us(fwd_bwd)
        row["kernels_fwd_bwd"] = kernel_breakdown(fwd_bwd)
        row["kernels_fwd"] = kernel_breakdown(fwd)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # dense SDPA over the same tokens
    x = torch.randn(batch, heads, n, 3 * 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dq, dk, dv = x.split(32, -1)
    g = torch.randn(batch, heads, n, 32, device="cuda", dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                def dfwd():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(dq, dk, dv)

                def dfb():
                    F.scaled_dot_product_attention(dq, dk, dv).backward(g)

                row = {"stage": name, "dense": label, "fwd_ms": median_ms(dfwd, iters),
                       "fwd_bwd_ms": median_ms(dfb, iters), "host_us_fwd": host_us(dfwd),
                       "host_us_fwd_bwd": host_us(dfb),
                       # every kernel of the step (the attention's and the qkv split's backward): for the dense
                       # backward/forward ratio beside the engine's
                       "kernels_fwd": kernel_breakdown(dfwd), "kernels_fwd_bwd": kernel_breakdown(dfb)}
        except Exception as err:  # a backend that cannot run this shape is recorded, not fatal
            row = {"stage": name, "dense": label, "error": f"{type(err).__name__}: {err}"[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


TILE_VARIANTS = {
    # pass key -> list of (BLOCK_M, BLOCK_N, warps, stages)
    ("dkv", 16, 64, "small"): [(32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 2, 2), (16, 64, 4, 2), (32, 128, 4, 2),
                               (32, 128, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2)],
    ("bwd", 16, 64, "small"): [(64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 2, 2), (64, 64, 4, 2), (32, 32, 4, 2)],
}


# small-map path (kernels/cells.py) launch shapes, per padded cell size: CellBox fields to override ({} = as chosen)
CELL_VARIANTS = {
    64: [{"sub_fwd": 64, "sub_bwd": 64, "warps": 4}, {"sub_fwd": 32, "sub_bwd": 32, "warps": 4},
         {"sub_fwd": 16, "sub_bwd": 16, "warps": 4}, {"sub_fwd": 64, "sub_bwd": 64, "warps": 8},
         {"sub_fwd": 32, "sub_bwd": 64, "warps": 2}],
}


def cell_sweep(stage_names, batch, iters, deadline):
    """fwd and fwd+bwd (rpb on) of the small-map kernels for each launch shape in CELL_VARIANTS."""
    from visattn.kernels import ops

    original = ops.cell_box
    rows = []
    for name in stage_names:
        spatial, heads, kernel, dil, window, shift = STAGES[name]
        qkv, q, k, v, table = make_inputs(batch, spatial, heads, 32, True, kernel, True)
        grad = torch.randn(batch, *spatial, heads, 32, device="cuda", dtype=torch.bfloat16)
        pat = ops.make_pattern(len(spatial), window, (kernel,) * len(spatial), (dil,) * len(spatial),
                               (1,) * len(spatial), (False,) * len(spatial), (shift,) * len(spatial))
        base = ops.engine_path(q, v, table, None, pat)
        if base.box is None:
            rows.append({"stage": name, "cells": "declined", "reason": base.reason})
            continue
        for variant in CELL_VARIANTS.get(math.prod(base.box), []):
            if time.time() > deadline:
                return rows
            ops.cell_box = lambda *a, _v=variant: original(*a)._replace(**_v)
            ops._PLANS.clear()
            fwd, fwd_bwd = engine_calls(q, k, v, table, grad, STAGES[name])
            try:
                row = {"stage": name, "cell_variant": variant, "fwd_ms": median_ms(fwd, iters),
                       "fwd_bwd_ms": median_ms(fwd_bwd, iters), "kernels": kernel_breakdown(fwd_bwd)}
            except Exception as err:
                row = {"stage": name, "cell_variant": variant, "error": f"{type(err).__name__}: {err}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ops.cell_box = original
        ops._PLANS.clear()
    return rows


def tile_sweep(stage_names, batch, iters, deadline):
    rows = []
    for name in stage_names:
        spatial, heads, kernel, dil, window, shift = STAGES[name]
        for key, variants in TILE_VARIANTS.items():
            saved = tiles_mod.volume_tables()
            for vol in variants:
                if time.time() > deadline:
                    tiles_mod.restore_volume_tables(saved)
                    return rows
                tiles_mod.set_volume(key, vol)
                try:
                    qkv, q, k, v, table = make_inputs(batch, spatial, heads, 32, False, kernel, True)
                    grad = torch.randn(batch, *spatial, heads, 32, device="cuda", dtype=torch.bfloat16)
                    fwd, fwd_bwd = engine_calls(q, k, v, table, grad, STAGES[name])

                    row = {"stage": name, "table_key": list(key), "volume": list(vol),
                           "fwd_ms": median_ms(fwd, iters), "fwd_bwd_ms": median_ms(fwd_bwd, iters)}
                    if key[0] == "bwd":
                        row["kernels"] = kernel_breakdown(fwd_bwd)
                except Exception as err:
                    row = {"stage": name, "table_key": list(key), "volume": list(vol),
                           "error": f"{type(err).__name__}: {err}"[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            tiles_mod.restore_volume_tables(saved)
    return rows


def model_rows(names, batch, iters, deadline):
    """Whole-model images/s: inference (eager) and an SGD train step, bf16 autocast, channels-last."""
    import timm

    import visattn.models  # noqa: F401  (registers nat_* / dinat_*)
    from visattn.models.swin_patch import patch_swin

    rows = []
    for name in names:
        if time.time() > deadline:
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = name.split("@")[0]
        model = timm.create_model(base, num_classes=1000).cuda().to(memory_format=torch.channels_last)
        if name.endswith("@visattn"):
            model = patch_swin(model)
        x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device="cuda")
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def infer(model=model, x=x):
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                return model(x)

        def train(model=model, x=x, target=target, opt=opt):
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.eval()
        inf_ms = median_ms(infer, iters, warmup=3)
        model.train()
        train_ms = median_ms(train, iters, warmup=3)
        row = {"model": name, "batch": batch, "infer_ms": inf_ms, "infer_img_s": batch / inf_ms * 1e3,
               "train_ms": train_ms, "train_img_s": batch / train_ms * 1e3,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "train_kernels": kernel_breakdown(train)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "train_kernels"}), flush=True)
        del model, opt
    return rows


def packed_rows(stage_names, batch, iters, deadline):
    """Forward+backward of each NA stage on the nn modules' packed path (``functional._na_packed`` on the qkv leaf:
    one packed gradient) beside the three unbound views (autograd stacks dq, dk, dv), alternated twice in one
    process; eager wall ms (median of the two rounds) and every kernel's GPU time."""
    from visattn import functional

    rows = []
    for name in stage_names:
        spatial, heads, kernel, dil, window, _ = STAGES[name]
        if window:
            continue
        for rpb in (False, True):
            if time.time() > deadline:
                return rows
            qkv, q, k, v, table = make_inputs(batch, spatial, heads, 32, rpb, kernel, True)
            grad = torch.randn(batch, *spatial, heads, 32, device="cuda", dtype=torch.bfloat16)
            _, views = engine_calls(q, k, v, table, grad, STAGES[name])
            rank = len(spatial)

            def packed(rank=rank, qkv=qkv, kernel=kernel, dil=dil, table=table, grad=grad):
                functional._na_packed(rank, qkv, kernel, 1, dil, False, None, table, None).backward(grad)

            walls: dict = {"packed": [], "views": []}
            for _ in range(2):
                for label, fn in (("packed", packed), ("views", views)):
                    walls[label].append(median_ms(fn, iters))
            row = {"stage": name, "rpb": rpb, **{f"{label}_fwd_bwd_ms": statistics.median(w)
                                                   for label, w in walls.items()},
                   "rounds_ms": walls, "packed_gpu_ms": kernel_breakdown(packed)["_total_gpu_ms"],
                   "views_gpu_ms": kernel_breakdown(views)["_total_gpu_ms"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--tiles", action="store_true")
    parser.add_argument("--tile-stages", default="nat_s1,nat_s3")
    parser.add_argument("--time-budget", type=float, default=400, help="seconds per step (see above)")
    # the older spelling: benchmarks/*.sh pass it to the .baseline/ checkout, which may predate the shared name
    parser.add_argument("--max-seconds", dest="time_budget", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--cells", default="", help="comma list of stages: sweep the small-map launch shapes")
    parser.add_argument("--models", default="", help="comma list of timm names (name@visattn: Swin on visattn)")
    parser.add_argument("--packed", action="store_true",
                        help="also time the NA stages on the modules' packed-qkv path beside the views")
    args = parser.parse_args(argv)
    import triton

    deadline = time.time() + args.time_budget
    result = {"bench": "engine-profile", "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "batch": args.batch, "dtype": "bfloat16", "head_dim": 32, "rows": [], "tile_rows": []}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in filter(None, args.stages.split(",")):
        if time.time() > deadline:
            result["truncated"] = True
            break
        result["rows"] += stage_rows(name, args.batch, args.iters, deadline)
        path.write_text(json.dumps(result, indent=1))
    if args.tiles:
        result["tile_rows"] = tile_sweep(args.tile_stages.split(","), args.batch, args.iters, deadline)
        path.write_text(json.dumps(result, indent=1))
    if args.cells:
        result["cell_rows"] = cell_sweep(args.cells.split(","), args.batch, args.iters, deadline + 120)
        path.write_text(json.dumps(result, indent=1))
    if args.packed:
        result["packed_rows"] = packed_rows(args.stages.split(","), args.batch, args.iters, deadline + 120)
        path.write_text(json.dumps(result, indent=1))
    if args.models:
        result["model_rows"] = model_rows(args.models.split(","), args.batch, args.iters, deadline + 240)
    path.write_text(json.dumps(result, indent=1))
    # short table last
    print(f"\n{'stage':14s} {'rpb':5s} {'fwd':>7s} {'fwd+bwd':>7s} {'b/f':>5s} {'gpu_f':>6s} {'gpu_fb':>6s} "
          f"{'hostf':>6s} {'hostfb':>6s}")
    for r in result["rows"]:
        if "dense" in r:
            print(f"{r['stage']:14s} {r['dense']:5s} {r.get('fwd_ms', float('nan')):7.3f} "
                  f"{r.get('fwd_bwd_ms', float('nan')):7.3f} {'':5s} "
                  f"{r.get('kernels_fwd', {}).get('_total_gpu_ms', float('nan')):6.3f} "
                  f"{r.get('kernels_fwd_bwd', {}).get('_total_gpu_ms', float('nan')):6.3f} "
                  f"{r.get('host_us_fwd', float('nan')):6.0f} {r.get('host_us_fwd_bwd', float('nan')):6.0f}")
        else:
            print(f"{r['stage']:14s} {str(r['rpb']):5s} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:7.3f} "
                  f"{r['bwd_over_fwd']:5.2f} {r['kernels_fwd']['_attention_kernels_ms']:6.3f} "
                  f"{r['kernels_fwd_bwd']['_attention_kernels_ms']:6.3f} {r['host_us_fwd']:6.0f} "
                  f"{r['host_us_fwd_bwd']:6.0f}")
    for r in result.get("packed_rows", []):
        print(f"{r['stage']:14s} {str(r['rpb']):5s} fwd+bwd packed {r['packed_fwd_bwd_ms']:7.3f} views "
              f"{r['views_fwd_bwd_ms']:7.3f}  GPU packed {r['packed_gpu_ms']:6.3f} views {r['views_gpu_ms']:6.3f}")
    for r in result.get("cell_rows", []):
        kern = r.get("kernels", {})
        cells = {k.replace("_cell_", "").replace("_kernel", ""): v for k, v in kern.items() if k.startswith("_cell_")}
        print(f"{r['stage']:10s} {json.dumps(r.get('cell_variant')):42s} fwd {r.get('fwd_ms', float('nan')):6.3f} "
              f"fb {r.get('fwd_bwd_ms', float('nan')):6.3f} {cells or r.get('error', r.get('reason', ''))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
