"""Where BiFormer / Agent-Swin spend a train step or an inference on CUDA, and what bounds their speed-ups.

For each (model, attention form, mode) row: the CUDA-event median of the step, peak memory, and one profiled step
(torch.profiler) with GPU time summed per kernel category (our Triton kernels, SDPA/flash, GEMM, convolution,
normalisation, everything else) and the top kernels. The ``floor`` form replaces the attention core by ``value``
(same projections, convolutions and MLPs): the time no attention kernel can go below (Amdahl's bound for a
model-level speed-up target).

Usage (repo root, CUDA): python benchmarks/profile_backbones.py --out /tmp/profile.json [--rows biformer agent]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import visattn  # noqa: E402,F401
from visattn import functional  # noqa: E402
from visattn.bench.common import median_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbones import eager_agent_forward, gather_bra_forward, make_step, use_peer  # noqa: E402

from visattn.models.agent import AgentAttention  # noqa: E402
from visattn.models.biformer import BiLevelRoutingAttention  # noqa: E402

CATEGORIES = [  # first match wins
    ("visattn triton", re.compile(r"_bra_|_fwd_kernel|_dq_kernel|_dkv_kernel|_agent|_na_|_window")),
    ("sdpa/flash", re.compile(r"fmha|flash|attention|efficient|cutlassF|cutlassB", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|sm90_xmma|cutlass|matmul|splitK", re.I)),
    ("conv", re.compile(r"conv|dgrad|wgrad|implicit|depthwise|winograd", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("copy/layout", re.compile(r"copy|transpose|permute|contiguous|cat|index|gather|scatter|Memcpy|Memset", re.I)),
]


@contextlib.contextmanager
def floor_attention():
    """Replace the attention cores by ``value`` (keeps every projection, conv and MLP)."""
    saved = functional.agent_attention, functional.bilevel_routing_attention
    functional.agent_attention = lambda q, k, v, agents, **kw: v
    functional.bilevel_routing_attention = lambda q, k, v, regions, topk, **kw: v.contiguous()
    try:
        yield
    finally:
        functional.agent_attention, functional.bilevel_routing_attention = saved


def build(name: str, form: str) -> torch.nn.Module:
    model = timm.create_model(name)
    if form == "official":
        cls, fwd = ((BiLevelRoutingAttention, gather_bra_forward) if name.startswith("biformer")
                    else (AgentAttention, eager_agent_forward))
        assert use_peer(model, cls, fwd) > 0
    if form == "patch_swin":
        from visattn.models.swin_patch import patch_swin

        model = patch_swin(model)
    return model


def kernel_table(step) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if t > 0:
            kernels[evt.key] = kernels.get(evt.key, 0.0) + t / 1e3
    groups = {}
    for key, ms in kernels.items():
        cat = next((c for c, rx in CATEGORIES if rx.search(key)), "other")
        groups[cat] = round(groups.get(cat, 0.0) + ms, 3)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:18]
    return dict(gpu_ms_total=round(sum(kernels.values()), 3), by_category=groups,
                top=[[k[:110], round(v, 3)] for k, v in top])


def run_row(name, form, mode, batch, iters) -> dict:
    row = dict(model=name, form=form, mode=mode, batch=batch)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build(name, "default" if form == "floor" else form)
        ctx = floor_attention() if form == "floor" else contextlib.nullcontext()
        with ctx:
            step = make_step(model, batch, mode)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(step, iters=iters, warmup=3)
            row.update(ms=round(ms, 3), img_per_s=round(batch * 1e3 / ms, 1),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
            row.update(kernel_table(step))
        row["backend"] = functional.last_backend()
    except Exception as err:  # one failing row must not lose the others
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    for k, v in row.get("top", [])[:10]:
        print(f"    {v:9.3f} ms  {k}", flush=True)
    return row


ROWS = {
    "biformer": [("biformer_tiny", form, "train", 128) for form in ("default", "official", "floor")]
    + [("biformer_tiny", form, "infer", 128) for form in ("default", "floor")],
    "agent": [("agent_swin_t", form, mode, 256) for mode in ("infer", "train")
              for form in ("default", "official", "floor")]
    + [("swin_tiny_patch4_window7_224", form, "infer", 256) for form in ("default", "patch_swin")],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--time-budget", type=float, default=400, help="start no new row after this many seconds")
    args = parser.parse_args(argv)
    start, rows = time.perf_counter(), []
    for group in args.rows:
        for name, form, mode, batch in ROWS[group]:
            if time.perf_counter() - start > args.time_budget:
                rows.append(dict(model=name, form=form, mode=mode, skipped=True))
                continue
            rows.append(run_row(name, form, mode, batch, args.iters))
    result = dict(benchmark="profile-backbones", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, timm=timm.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  settings=dict(dtype="bf16 autocast", memory_format="channels_last", timing="CUDA events, median",
                                iters=args.iters), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
