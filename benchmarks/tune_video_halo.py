"""Launch-config sweeps behind the block-sparse forward tiles and the halo gather-fold (issues #22, #23).

``bs``: forward tiles / warps / stages of the block-sparse kernels at Wan 2.1-14B 720p's Radial mask (bf16, d128),
then the backward configs on forward+backward. ``halo``: halo kernel launch configs at HaloNet's B256 shapes.
``prof``: the top CUDA kernels of a halonet26t B256 train step with patch_timm (what showed the fold's cost).

Usage (repo root, CUDA):  python benchmarks/tune_video_halo.py --only bs --out /tmp/tune-bs.json
"""

import argparse
import datetime
import importlib
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.getcwd())
import visattn  # noqa: E402
from visattn.bench.common import median_ms  # noqa: E402
from visattn.kernels import blocksparse as bs  # noqa: E402

halo = importlib.import_module("visattn.kernels.halo")  # the kernels package exports a function of that name
SAVED = bs._blocks, bs._forward_blocks, {k: dict(v) for k, v in bs.LAUNCH.items()}


def with_cfg(bm, bn, launch):
    """Every block-sparse kernel on ``bm x bn`` tiles (the forward's own tile choice, ``_forward_blocks``, too) and
    the given per-kernel launch options."""
    def blocks(q_block, k_block, hd, hdv, dtype):
        m = SAVED[0](q_block, k_block, hd, hdv, dtype)
        m.update(BLOCK_M=bm, BLOCK_N=bn)
        return m

    bs._blocks = bs._forward_blocks = blocks
    for k2, v2 in launch.items():
        bs.LAUNCH[k2] = v2


def restore_cfg():
    bs._blocks, bs._forward_blocks = SAVED[0], SAVED[1]
    bs.LAUNCH.clear()
    bs.LAUNCH.update({k: dict(v) for k, v in SAVED[2].items()})


def sweep(rows, label, configs, deadline, launch_of, measure):
    """One row per ``(bm, bn, warps, stages)`` config until ``deadline`` (time.time()): ``measure()``'s fields, or
    the error the config raised."""
    for bm, bn, w, s in configs:
        if time.time() > deadline:
            break
        try:
            with_cfg(bm, bn, launch_of(w, s))
            rows.append(dict(kernel=label, bm=bm, bn=bn, w=w, s=s, **measure()))
        except Exception as e:
            rows.append(dict(kernel=label, bm=bm, bn=bn, w=w, s=s, error=str(e)[:200]))
        print(rows[-1], flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("all", "bs", "halo", "prof"), default="all")
    parser.add_argument("--out", required=True, help="JSON result path")
    args = parser.parse_args(argv)
    which = args.only
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if which in ("all", "bs"):
        grid, heads = (21, 45, 80), 40
        q, k, v = (torch.randn(1, *grid, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def run():
            return visattn.radial_attention(q, k, v, 128, 0.2, True, backend="triton")

        ref = run().float()
        rows = []
        t0 = time.time()
        fwd_configs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2),
                       (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 1), (64, 64, 8, 2)]
        sweep(rows, "fwd", fwd_configs, t0 + 100, lambda w, s: {"fwd": dict(num_warps=w, num_stages=s)},
              lambda: dict(err=(run().float() - ref).abs().max().item(), ms=median_ms(run, iters=10, warmup=2)))
        restore_cfg()
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        g = torch.randn_like(q)

        def fb():
            out = visattn.radial_attention(*leaves, 128, 0.2, True, backend="triton")
            torch.autograd.grad(out, leaves, g)

        bwd_configs = [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 1),
                       (64, 64, 4, 3), (128, 64, 8, 1)]
        sweep(rows, "fwd+bwd(bwd cfg)", bwd_configs, t0 + 190,
              lambda w, s: {"dq": dict(num_warps=w, num_stages=s), "dkv": dict(num_warps=w, num_stages=s)},
              lambda: dict(ms=median_ms(fb, iters=5, warmup=1)))
        restore_cfg()
        res["blocksparse"] = rows
    if which in ("all", "halo"):
        rows = []
        shapes = [
            ((256, 16, 16, 8, 32), (256, 16, 16, 8, 32), 2),
            ((256, 8, 8, 8, 64), (256, 16, 16, 8, 64), 2),
            ((256, 8, 8, 8, 64), (256, 8, 8, 8, 64), 2),
            ((256, 32, 32, 8, 16), (256, 32, 32, 8, 16), 3),
        ]
        for qs, ks, hs in shapes:
            q = torch.randn(qs, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(ks, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            win = 8 + 2 * hs
            rh, rw = (torch.randn(2 * win - 1, qs[-1], device="cuda", dtype=torch.bfloat16) for _ in range(2))
            leaves = [t.requires_grad_() for t in (q, k, v, rh, rw)]
            for w, s in [(4, 3), (4, 1), (8, 1), (8, 2), (2, 1)]:
                halo.LAUNCH["fwd"] = dict(num_warps=w, num_stages=s)
                halo.LAUNCH["bwd"] = dict(num_warps=w, num_stages=s)

                def f(leaves=leaves, hs=hs):
                    return visattn.halo_attention(*leaves[:3], 8, hs, *leaves[3:], backend="triton")

                try:
                    with torch.no_grad():
                        fms = median_ms(f, iters=10, warmup=2)
                    gout = torch.randn_like(f())

                    def step(leaves=leaves, gout=gout):
                        torch.autograd.grad(f(), leaves, gout)

                    fb = median_ms(step, iters=10, warmup=2)

                    def ref_f(leaves=leaves, hs=hs):
                        return visattn.halo_attention(*leaves[:3], 8, hs, *leaves[3:], backend="reference")

                    with torch.no_grad():
                        rf = median_ms(ref_f, iters=10, warmup=2)
                    rows.append(dict(q=qs, k=ks, halo=hs, w=w, s=s, fwd_ms=fms, fwd_bwd_ms=fb, reference_fwd_ms=rf))
                except Exception as e:
                    rows.append(dict(q=qs, k=ks, halo=hs, w=w, s=s, error=str(e)[:200]))
                print(rows[-1], flush=True)
        halo.LAUNCH["fwd"] = {}
        halo.LAUNCH["bwd"] = {}
        res["halo"] = rows
    if which in ("all", "prof"):
        import timm
        import torch.nn.functional as F
        from torch.profiler import ProfilerActivity, profile

        from visattn.models import patch_timm

        m = timm.create_model("halonet26t").cuda().to(memory_format=torch.channels_last)
        patch_timm(m)
        m.train()
        x = torch.randn(256, 3, 256, 256, device="cuda").to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (256,), device="cuda")
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        tab = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in p.key_averages()), key=lambda t: -t[1])[:25]
        res["halonet26t_train_profile_top"] = tab
        for t in tab:
            print(f"{t[1]:8.2f} ms x{t[2]:4d} {t[0][:110]}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
