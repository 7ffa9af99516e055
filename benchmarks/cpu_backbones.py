"""CPU inference: each visattn-accelerated model against its stock / official-form counterpart, same process.

Pairs: biformer_tiny (visattn's CPU path) vs the same model on an official-style gather BRA; agent_swin_t,
agent_pvt_t and agent_deit_t vs the same models whose agent attention runs the official eager arithmetic
(agent_swin_t only: the PVT / DeiT forms differ); timm's swin_tiny on visattn windows (``patch_swin``) vs stock
timm. float32, eval mode, no_grad, median of ``--iters`` forwards after one warm-up, sides interleaved.

Usage (repo root): python benchmarks/cpu_backbones.py --out benchmarks/results/cpu-backbones-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
from bench_backbones import eager_agent_forward, gather_bra_forward, use_peer  # noqa: E402

import visattn  # noqa: E402
from visattn.models.agent import AgentAttention  # noqa: E402
from visattn.models.biformer import BiLevelRoutingAttention  # noqa: E402
from visattn.models.swin_patch import patch_swin  # noqa: E402


def pairs(img: int):
    def peer(name, cls, forward):
        def build():
            model = timm.create_model(name, img_size=img) if name.startswith("agent") else timm.create_model(name)
            assert use_peer(model, cls, forward) > 0
            return model
        return build

    return [
        ("biformer_tiny", lambda: timm.create_model("biformer_tiny"), "official-style gather BRA",
         peer("biformer_tiny", BiLevelRoutingAttention, gather_bra_forward)),
        ("agent_swin_t", lambda: timm.create_model("agent_swin_t", img_size=img), "official eager AgentAttention",
         peer("agent_swin_t", AgentAttention, eager_agent_forward)),
        ("swin_tiny_patch4_window7_224", lambda: patch_swin(timm.create_model("swin_tiny_patch4_window7_224")),
         "stock timm", lambda: timm.create_model("swin_tiny_patch4_window7_224")),
    ]


def timed(model, x, iters: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    img = 224
    x = torch.randn(args.batch, 3, img, img)
    rows = []
    for name, build_ours, peer_name, build_peer in pairs(img):
        torch.manual_seed(0)
        ours = build_ours().eval()
        torch.manual_seed(0)
        peer = build_peer().eval()
        with torch.no_grad():
            ours(x), peer(x)  # warm-up
            err = float((ours(x) - peer(x)).abs().max())
        t_ours, t_peer = [], []
        for _ in range(args.rounds):
            t_ours += timed(ours, x, args.iters)
            t_peer += timed(peer, x, args.iters)
        row = dict(model=name, peer=peer_name, batch=args.batch, ours_s=statistics.median(t_ours),
                   peer_s=statistics.median(t_peer), max_abs_logit_diff=err)
        row["speedup"] = round(row["peer_s"] / row["ours_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = dict(benchmark="cpu-backbones", device=f"CPU ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads, {os.cpu_count()} cores)", torch=torch.__version__,
                  timm=timm.__version__, visattn=visattn.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  settings=dict(dtype="float32", mode="eval, no_grad", img_size=img, iters=args.iters,
                                rounds=args.rounds, timing="perf_counter, median, sides interleaved"), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
