"""Tile volumes of the tiled engine's passes (forward, dQ, dK/dV) at NAT-T stages 1-3 or FLUX's 1024² block.

Suite ``nat``: B256, bf16, head_dim 32, kernel 7, with and without a trained bias. Suite ``flux``: B1, 64x64 image
tokens, 24 heads x 128, NA kernel 21 and GNA kernel 32 stride 16, with FLUX's 512 text tokens as extra keys. Suite
``flux4k``: the same heads on FLUX-4K's 256x256 map, kernel 80, NA and GNA stride 16, no text, and HunyuanVideo's
30x48x80 latent with an 18x24x24 kernel (3-D; the same candidates as ``flux``: all set the head_dim-128 "large"
volumes). Suite ``d128-dkv``: HunyuanVideo and FLUX-4K NA with only the dK/dV pass's volume varied;
``d128-dkv-wg``: the same with key tiles of 128 rows at 8 warps (one 64-key tile per warpgroup), plus FLUX-4K GNA.
Configuration ``i`` replaces the suite's volume of every pass by its ``i``-th candidate (``tiles.set_volume``: rows
per query tile, rows per key tile, warps, stages, in every table holding the key, so at maps of at most
``tiles.SMALL_MAP_TOKENS`` configuration 0 is the main table's volume, not the small-map one), so one profiled
forward+backward times one candidate of each pass; each kernel's GPU time is the mean over ``--reps`` profiled calls.
Every configuration's output and gradients are compared with configuration 0's (the shipped table) so a candidate
that computes something else is seen. Exploratory: chosen volumes go into ``visattn/kernels/tiles.py`` by hand.

Usage (repo root, CUDA): python benchmarks/tune_tiles.py --out /tmp/out/tune-tiles.json [--suite flux|d128-dkv]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visattn  # noqa: E402
from visattn.bench import common  # noqa: E402
from visattn.kernels import ops, tiles  # noqa: E402

# stage -> (map, heads, head_dim, batch, kernel, stride, text tokens, rpb draws)
STAGES = {"nat_s1": ((56, 56), 2, 32, 256, 7, 1, 0, (False, True)),
          "nat_s2": ((28, 28), 4, 32, 256, 7, 1, 0, (False, True)),
          "nat_s3": ((14, 14), 8, 32, 256, 7, 1, 0, (False, True)),
          "flux_na_k21": ((64, 64), 24, 128, 1, 21, 1, 512, (False,)),
          "flux_gna_k32_s16": ((64, 64), 24, 128, 1, 32, 16, 512, (False,)),
          "flux4k_na_k80": ((256, 256), 24, 128, 1, 80, 1, 0, (False,)),
          "flux4k_gna_k80_s16": ((256, 256), 24, 128, 1, 80, 16, 0, (False,)),
          "hunyuan_na": ((30, 48, 80), 24, 128, 1, (18, 24, 24), 1, 0, (False,))}
SUITES = {"nat": ("nat_s1", "nat_s2", "nat_s3"), "flux": ("flux_na_k21", "flux_gna_k32_s16"),
          "flux4k": ("flux4k_na_k80", "flux4k_gna_k80_s16", "hunyuan_na"),
          "d128-dkv": ("hunyuan_na", "flux4k_na_k80"),
          "d128-dkv-wg": ("hunyuan_na", "flux4k_na_k80", "flux4k_gna_k80_s16")}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass; index 0 is filled with the shipped table's entry at run time,
# as is every None (flux 8-10 keep the shipped forward and change the backward only; 10 is the table before the
# head_dim-128 dK/dV entry, whose dK/dV pass took the dQ pass's 64 x 64 at 8 warps).
CANDIDATES = {
    "nat": {
        "fwd": [None, (32, 64, 4, 2), (32, 128, 4, 2), (16, 128, 4, 2), (64, 32, 4, 2), (32, 64, 2, 2),
                (64, 64, 4, 3), (128, 64, 4, 3), (16, 64, 2, 2)],
        "bwd": [None, (32, 64, 4, 2), (32, 32, 2, 2), (16, 64, 2, 2), (32, 128, 4, 2), (64, 64, 4, 2),
                (16, 128, 4, 2), (32, 64, 2, 2), (64, 32, 4, 3)],
        "dkv": [None, (32, 32, 2, 2), (64, 32, 4, 2), (16, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2),
                (16, 32, 2, 2), (32, 64, 2, 2), (32, 64, 4, 3)],
    },
    "flux": {
        "fwd": [None, (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 32, 4, 3), (64, 128, 8, 3), None, None, None],
        "bwd": [None, (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2),
                (128, 64, 8, 3), (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2)],
        "dkv": [None, (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2),
                (64, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2)],
    },
}
# The head_dim-128 dK/dV pass alone (issue 21: per visited pair it costs ~2x the dQ pass at FLUX-4K and
# HunyuanVideo): forward and dQ keep the shipped volumes, the dK/dV pass tries fewer stages, fewer rows, more warps.
# Run it once more with VISATTN_KV_DESC=0 to see the descriptor loads' share.
_DKV128 = [None, (64, 64, 4, 1), (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 1), (64, 64, 8, 1),
           (32, 32, 4, 2), (128, 32, 4, 2)]
CANDIDATES["d128-dkv"] = {"fwd": [None] * len(_DKV128), "bwd": [None] * len(_DKV128), "dkv": _DKV128}
KEYS = {"nat": {"fwd": ("fwd", 16, 64, "small"), "bwd": ("bwd", 16, 64, "small"), "dkv": ("dkv", 16, 64, "small")},
        "flux": {"fwd": ("fwd", 16, 128, "large"), "bwd": ("bwd", 16, 128, "large"),
                 "dkv": ("dkv", 16, 128, "large")}}
CANDIDATES["flux4k"], KEYS["flux4k"] = CANDIDATES["flux"], KEYS["flux"]
KEYS["d128-dkv"] = KEYS["flux"]
# The same pass with the key tile sized to the warps (sm90 offline compiles, triton 3.6, ptxas -v): at 4 warps the
# shipped 64 x 64 pass holds two 64 x 128 float32 accumulators and spills (FLUX-4K 60 B, HunyuanVideo 88 B); 64 key
# rows at 8 warps run every score product twice (one 64-row warpgroup layout, replicated) and convert layouts; 128
# key rows at 8 warps give each warpgroup its own 64 keys (FlashAttention-3's backward layout), without spills.
_DKV128_WG = [None, (32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2), (16, 128, 8, 3), (64, 128, 8, 2),
              (32, 64, 4, 2), (16, 64, 4, 3)]
CANDIDATES["d128-dkv-wg"] = {"fwd": [None] * len(_DKV128_WG), "bwd": [None] * len(_DKV128_WG), "dkv": _DKV128_WG}
KEYS["d128-dkv-wg"] = KEYS["flux"]
ENGINE = ("_fwd_kernel", "_bwd_", "_bias_grad", "_expand_")


def stage_step(stage: str):
    """A forward+backward of ``stage`` without a bias or text keys on fresh seeded CUDA inputs (bf16, fused qkv
    leaf): a function returning the output and the qkv gradient (``ncu_backward.py``, ``bench_dkv_stats.py``)."""
    spatial, heads, dim, batch, kernel, stride, _, _ = STAGES[stage]
    torch.manual_seed(0)
    qkv = torch.randn(batch, *spatial, 3, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, *spatial, heads, dim, device="cuda", dtype=torch.bfloat16)
    op = visattn.na3d if len(spatial) == 3 else visattn.na2d

    def step():
        q, k, v = qkv.unbind(-3)
        out = op(q, k, v, kernel_size=kernel, stride=stride)
        return (out, *torch.autograd.grad(out, [qkv], grad))

    return step


def _apply(suite: str, config: int, shipped: dict) -> dict:
    chosen = {}
    for name, key in KEYS[suite].items():
        volume = CANDIDATES[suite][name][config] or shipped[name]
        # None: no entry of its own (the dK/dV pass then takes the dQ pass's): leave it absent
        tiles.set_volume(key, volume)
        chosen[name] = None if volume is None else list(volume)
    ops._PLANS.clear()
    if hasattr(ops, "bias_tile_layout"):
        ops.bias_tile_layout.cache_clear()
    return chosen


def _kernel_ms(fn, reps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    found: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        on_gpu = getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
        if us > 0 and on_gpu and evt.key.startswith(ENGINE):
            found[evt.key[:40]] = round(found.get(evt.key[:40], 0.0) + us / 1e3 / reps, 4)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--suite", choices=sorted(SUITES), default="nat")
    parser.add_argument("--stages", default=None, help="comma list (default: the suite's)")
    parser.add_argument("--configs", default=None, help="comma list of candidate indices (default: all)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--time-budget", type=float, default=300.0)
    args = parser.parse_args(argv)
    missing = common.require_cuda("tune_tiles")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    suite = args.suite
    stages = args.stages.split(",") if args.stages else SUITES[suite]
    n_configs = len(CANDIDATES[suite]["fwd"])
    configs = [int(c) for c in args.configs.split(",")] if args.configs else list(range(n_configs))
    deadline = time.time() + args.time_budget
    shipped = {name: tiles._VOLUMES.get(key) for name, key in KEYS[suite].items()}
    saved_tables = tiles.volume_tables()
    rows = []
    for stage in stages:
        spatial, heads, dim, batch, kernel, stride, text, rpb_draws = STAGES[stage]
        for rpb in rpb_draws:
            torch.manual_seed(0)
            qkv = torch.randn(batch, *spatial, 3, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            leaves = [qkv]
            table = None
            if rpb:
                table = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, device="cuda", dtype=torch.bfloat16) * 0.1
                table.requires_grad_(True)
                leaves.append(table)
            text_kv = None
            if text:
                text_kv = torch.randn(batch, text, 2, heads, dim, device="cuda", dtype=torch.bfloat16,
                                      requires_grad=True)
                leaves.append(text_kv)
            grad = torch.randn(batch, *spatial, heads, dim, device="cuda", dtype=torch.bfloat16)
            reference = None
            for config in configs:
                if time.time() > deadline:
                    break
                chosen = _apply(suite, config, shipped)

                def step(leaves=tuple(leaves), table=table, text_kv=text_kv, grad=grad, kernel=kernel, stride=stride,
                         spatial=spatial):
                    q, k, v = leaves[0].unbind(-3)
                    extra = {} if text_kv is None else dict(additional_keys=text_kv[:, :, 0],
                                                            additional_values=text_kv[:, :, 1])
                    op = visattn.na3d if len(spatial) == 3 else visattn.na2d
                    out = op(q, k, v, kernel_size=kernel, stride=stride, rpb=table, **extra)
                    return (out, *torch.autograd.grad(out, leaves, grad))

                try:
                    results = step()
                    kernels = _kernel_ms(step, args.reps)
                except Exception as exc:  # a candidate that does not compile or fit is a row, not the end
                    rows.append(dict(stage=stage, rpb=rpb, config=config, volumes=chosen, error=repr(exc)[:300]))
                    print(rows[-1], flush=True)
                    continue
                if reference is None:
                    reference = results
                err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results, reference, strict=True))
                rank = len(spatial)
                k3 = (1,) * (3 - rank) + (kernel if isinstance(kernel, tuple) else (kernel,) * rank)
                extents, s3 = (1,) * (3 - rank) + tuple(spatial), (1,) * (3 - rank) + (stride,) * rank
                boxes = {p: tuple(tiles.choose_tiles(p, False, extents, k3, s3, 16, dim, False, bias=rpb,
                                                     bins=p == "dq" and rpb)[:2]) for p in ("fwd", "dq", "dkv")}
                rows.append(dict(stage=stage, rpb=rpb, config=config, volumes=chosen, boxes=boxes, kernels=kernels,
                                 attention_ms=round(sum(kernels.values()), 4), max_diff_vs_config0=err))
                print(rows[-1], flush=True)
    tiles.restore_volume_tables(saved_tables)
    ops._PLANS.clear()
    common.save_result("tune-tiles", {"suite": suite, "dtype": "bfloat16", "stages": {s: STAGES[s] for s in stages},
                                      "candidates": CANDIDATES[suite], "shipped": shipped, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
