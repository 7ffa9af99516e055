"""Where the host time of a ``torch.compile``'d train step goes: is the step host-bound, and whose launches cost it.

One model (B256, bf16 autocast, channels-last, SGD; ``bench_backbones.make_step``, compiled, default mode): the
unprofiled wall time per step, then ``--steps`` profiled steps (torch.profiler, CPU and CUDA activity): CPU self
time by op (visattn's custom ops among them), GPU launches per step and their families (Inductor's Triton kernels,
GEMMs, other ATen kernels, visattn's kernels by name). A step whose wall time exceeds its GPU time waits on the
host; this says which launches to cut. The wall time depends on the machine's host (compare rows of one lease).

Usage (repo root, CUDA): python benchmarks/profile_compiled_host.py --out /tmp/out/compiled-host.json
    [--model nat_tiny] [--note "VISATTN_KV_DESC default"]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.bench.common import environment, require_cuda, write_json  # noqa: E402


def _family(name: str) -> str:
    if name.startswith("triton_"):
        return "inductor triton"
    if name.startswith("_"):  # visattn's @triton.jit kernels are private names
        return "visattn"
    if any(tag in name for tag in ("gemm", "sm90", "cutlass", "nvjet")):
        return "gemm"
    return "other aten"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="nat_tiny")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--note", default="", help="free text kept in the result (e.g. the environment flags)")
    args = parser.parse_args(argv)
    message = require_cuda("profile_compiled_host")
    if message:
        print(message, file=sys.stderr)
        return 2
    import timm
    from bench_backbones import make_step

    import visattn.models  # noqa: F401  (registers nat_* / dinat_*)

    step = make_step(timm.create_model(args.model, num_classes=1000), args.batch, "train", compiled=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 5 * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    n = args.steps
    rows = sorted(({"name": e.key[:90], "calls": e.count // n, "self_cpu_us": e.self_cpu_time_total / n,
                    "cpu_us": e.cpu_time_total / n} for e in prof.key_averages()), key=lambda r: -r["self_cpu_us"])
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    families = {k: v / n for k, v in collections.Counter(_family(k) for k in kernels).items()}
    ours = {k: v / n for k, v in collections.Counter(k[:60] for k in kernels if _family(k) == "visattn").items()}
    result = {"bench": "compiled-host", **environment(), "model": args.model, "batch": args.batch,
              "wall_ms": wall_ms, "gpu_launches_per_step": len(kernels) / n, "launch_families": families,
              "visattn_kernels_per_step": ours, "note": args.note, "top_self_cpu": rows[:40],
              "visattn_ops": [r for r in rows if "visattn" in r["name"]]}
    write_json(args.out, result)
    print(f"{args.model}: wall {wall_ms:.1f} ms/step, {len(kernels) / n:.0f} GPU launches/step; families {families}")
    for r in rows[:25]:
        print(f"{r['self_cpu_us'] / 1e3:8.2f} ms self {r['cpu_us'] / 1e3:8.2f} ms total {r['calls']:6d}x  {r['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
