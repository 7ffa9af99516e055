"""Launch options (num_warps, num_stages) of the routing (BiFormer) and agent kernels at their models' stage shapes.

For every kernel and option, the CUDA-event median of the forward (or backward) kernels at each stage shape of
BiFormer-T (batch 128) / Agent-Swin-T (batch 256), bf16, with the other kernels at their defaults; the best option
per kernel minimises the depth-weighted sum over the stages (the blocks a model runs). The chosen values go into
``visattn/kernels/routing.py`` / ``agent_attn.py`` ``LAUNCH`` by hand.

Usage (repo root, CUDA): python benchmarks/tune_small_kernels.py --out /tmp/tune.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.bench.common import median_ms  # noqa: E402
from visattn.kernels import agent_attn as agent_kernels  # noqa: E402
from visattn.kernels import routing as routing_kernels  # noqa: E402
from visattn.reference import route_regions  # noqa: E402

OPTIONS = [dict(num_warps=w, num_stages=s) for w, s in ((2, 2), (4, 2), (4, 3), (8, 2), (2, 1), (4, 1))]
# (batch, map, channels, heads, regions, topk, depth) — BiFormer-T stages 1-3
BRA_STAGES = [(128, 56, 64, 2, 7, 1, 2), (128, 28, 128, 4, 7, 4, 2), (128, 14, 256, 8, 7, 16, 8)]
# (batch, map, channels, heads, agents, depth) — Agent-Swin-T stages 1-3
AGENT_STAGES = [(256, 56, 96, 3, 9, 2), (256, 28, 192, 6, 16, 2), (256, 14, 384, 12, 49, 6)]


def bra_problem(batch, size, channels, heads, regions, topk):
    dim = channels // heads
    qkv = torch.randn(batch, size, size, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(3)
    table = route_regions(q, k, (regions, regions), topk).to(torch.int32).contiguous()
    scale = channels**-0.5
    out, lse = routing_kernels._forward(q, k, v, table, regions, regions, scale)
    grad = torch.randn_like(out)
    fwd = lambda: routing_kernels._forward(q, k, v, table, regions, regions, scale)  # noqa: E731
    bwd = lambda: routing_kernels._backward_kernels(grad, q, k, v, out, lse, table, regions, regions, scale)  # noqa: E731
    return {"fwd": fwd, "dq": bwd, "dkv": bwd}


def agent_problem(batch, size, channels, heads, n_agents):
    dim = channels // heads
    qkv = torch.randn(batch, size * size, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    agents = torch.randn(batch, n_agents, heads, dim, device="cuda", dtype=torch.bfloat16)
    ab = 0.02 * torch.randn(1, heads, n_agents, size * size, device="cuda", dtype=torch.bfloat16)
    qb = 0.02 * torch.randn(1, heads, size * size, n_agents, device="cuda", dtype=torch.bfloat16)
    scale = dim**-0.5
    out, av, lse = agent_kernels._forward(q, k, v, agents, ab, qb, scale)
    grad = torch.randn_like(out)
    fwd = lambda: agent_kernels._forward(q, k, v, agents, ab, qb, scale)  # noqa: E731
    bwd = lambda: agent_kernels._backward_kernels(grad, q, k, v, agents, ab, qb, av, lse, scale, True, True)  # noqa: E731
    return {"values": fwd, "output": fwd, "bwd": bwd}


def tune(module, problems, depths, deadline) -> dict:
    results = {}
    for kernel in module.LAUNCH:
        rows = []
        for option in [{}] + OPTIONS:
            if time.perf_counter() > deadline:
                break
            module.LAUNCH[kernel] = option
            try:
                times = [median_ms(p[kernel], iters=15, warmup=2) for p in problems]
                rows.append(dict(option=option or "default", ms=[round(t, 4) for t in times],
                                 weighted=round(sum(t * d for t, d in zip(times, depths, strict=True)), 4)))
            except Exception as err:  # an option that does not compile (resources) is recorded, not fatal
                rows.append(dict(option=option or "default", error=f"{type(err).__name__}: {str(err)[:160]}"))
            print(kernel, rows[-1], flush=True)
        module.LAUNCH[kernel] = {}
        ok = [r for r in rows if "weighted" in r]
        best = min(ok, key=lambda r: r["weighted"]) if ok else None
        results[kernel] = dict(rows=rows, best=best)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=240, help="seconds; later options are skipped")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.time_budget
    torch.manual_seed(0)
    bra = [bra_problem(*s[:-1]) for s in BRA_STAGES]
    agent = [agent_problem(*s[:-1]) for s in AGENT_STAGES]
    result = dict(benchmark="tune-small-kernels", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  note="ms per call (the kernel's family call: fwd = forward kernels, bwd = all backward kernels), "
                       "one option changed at a time",
                  routing=tune(routing_kernels, bra, [s[-1] for s in BRA_STAGES], deadline),
                  agent=tune(agent_kernels, agent, [s[-1] for s in AGENT_STAGES], deadline))
    Path(args.out).write_text(json.dumps(result, indent=1))
    for family in ("routing", "agent"):
        for kernel, res in result[family].items():
            best = res["best"]
            default = next((r for r in res["rows"] if r["option"] == "default" and "weighted" in r), None)
            print(f"{family:8s} {kernel:8s} default {default and default['weighted']}  best {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
