"""Bi-level routing at BiFormer-T's stages: the map schedule against the region schedule, and cuDNN over the same
tokens, in one process (issue 18: every BiFormer-T stage at most dense attention's time).

For each stage of the ``vision`` suite's BiFormer-T rows (B128, bf16, head_dim 32, 7x7 regions), forward and
forward+backward: the fused call (routing included, as a model runs it) on the schedule ``routing_path`` picks and
with the region schedule forced (``MAP_MAX_TOKENS = 0``), and for forward+backward the region forward feeding the
map backward ("mixed", ``MAP_PASSES``), each in eager wall time and replayed from a CUDA graph
(GPU time), the routing step alone (``route_regions``), dense cuDNN SDPA over the same tokens, and the memory /
matmul floor. Outputs of the two schedules are compared (max abs difference). CUDA-event medians.

Usage (repo root, CUDA): python benchmarks/bench_routing_schedules.py --out /tmp/out/routing-schedules.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.bench import attn  # noqa: E402
from visattn.bench.common import device_ceilings, environment, require_cuda, write_json  # noqa: E402
from visattn.bench.suites import load_suite  # noqa: E402

STAGES = ("biformer-t-s1", "biformer-t-s2", "biformer-t-s3")


@contextlib.contextmanager
def _schedule(map_tokens: int, passes: tuple = ("fwd", "bwd")):
    """Run the routing kernels with ``routing.MAP_MAX_TOKENS = map_tokens`` and the map schedule on ``passes``."""
    from visattn.kernels import routing

    previous = routing.MAP_MAX_TOKENS, routing.MAP_PASSES
    routing.MAP_MAX_TOKENS, routing.MAP_PASSES = map_tokens, passes
    try:
        yield
    finally:
        routing.MAP_MAX_TOKENS, routing.MAP_PASSES = previous


def _timed(p, sets, map_tokens: int, passes: tuple = ("fwd", "bwd")) -> tuple[float, float]:
    """(eager ms, CUDA-graph ms) of the fused call under ``_schedule(map_tokens, passes)``."""
    with _schedule(map_tokens, passes):
        return attn._ours(p, sets), attn._graphed(p, sets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args(argv)
    message = require_cuda("bench_routing_schedules")
    if message:
        print(message, file=sys.stderr)
        return 2
    from torch.nn.attention import SDPBackend

    from visattn.geometry import route_regions
    from visattn.kernels import routing, routing_path

    wanted = set(args.stages.split(","))
    problems = [p for p in load_suite("vision").problems if p.op == "routing" and p.name.rsplit("-backward")[0]
                in wanted]
    ceilings = device_ceilings()
    result = {"bench": "routing-schedules", **environment(), "ceilings": ceilings, "rows": []}
    for p in problems:
        sets = attn._inputs(p)
        path, why = routing_path(p.spatial[0], p.spatial[1], p.regions)
        row = {"problem": p.name, "backward": p.backward, "batch": p.batch, "spatial": list(p.spatial),
               "heads": p.heads, "topk": p.topk, "path": path, "why": why, **attn.floor(p, ceilings)}
        row["region_ms"], row["region_graph_ms"] = _timed(p, sets, 0)
        if path in ("map", "mixed"):
            row["map_ms"], row["map_graph_ms"] = _timed(p, sets, routing.MAP_MAX_TOKENS)
            if p.backward:  # the region forward feeding the map backward
                row["mixed_ms"], row["mixed_graph_ms"] = _timed(p, sets, routing.MAP_MAX_TOKENS, ("bwd",))
            q, k, v = (t.detach() for t in sets[0][:3])
            outs = []
            for tokens in (routing.MAP_MAX_TOKENS, 0):  # the map forward (both passes on it), then the region one
                with _schedule(tokens):
                    outs.append(routing.bilevel_routing(q, k, v, p.regions, p.topk, p.softmax_scale).float())
            row["max_diff_map_vs_region"] = float((outs[0] - outs[1]).abs().max())
        q, k = sets[0][0].detach(), sets[0][1].detach()
        row["routing_only_ms"] = attn.bench(lambda q=q, k=k, p=p: route_regions(q, k, p.regions, p.topk))
        row["cudnn_ms"] = attn._sdpa(p, sets[:2], SDPBackend.CUDNN_ATTENTION)
        result["rows"].append(row)
        print(row, flush=True)
        write_json(args.out, result)
        torch.cuda.empty_cache()
    write_json(args.out, result)
    print("| stage | path | region ms (graph) | map ms (graph) | mixed ms (graph) | routing only | cuDNN ms "
          "| floor ms |")
    for r in result["rows"]:
        new = f"{r['map_ms']:.3f} ({r['map_graph_ms']:.3f})" if "map_ms" in r else "—"
        mixed = f"{r['mixed_ms']:.3f} ({r['mixed_graph_ms']:.3f})" if "mixed_ms" in r else "—"
        print(f"| {r['problem']} | {r['path']} | {r['region_ms']:.3f} ({r['region_graph_ms']:.3f}) | {new} | {mixed} "
              f"| {r['routing_only_ms']:.3f} | {r['cudnn_ms']:.3f} | {r['floor_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
