"""Kernel benchmark of the Triton engine against its peers, with honest floors.

``python -m visattn.bench.attn [--only NAME,...] [--out FILE]`` (wired as ``visattn bench-attn``).

Every row: median time (CUDA events after warm-up, rotating fresh random inputs), useful TFLOP/s
(4*B*heads*N*prod(kernel)*head_dim; backward counts 2.5x), the floor = max(FLOPs / matmul rate, bytes / copy
rate) with both rates measured in this run, % of floor, and peers measured in the same process: dense SDPA (cuDNN,
flash), FlexAttention with a block mask of the same pattern, NATTEN's flex backend when ``natten`` imports, and for
Swin rows the timm-style roll + partition + masked SDPA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from visattn.bench.timing import device_ceilings


@dataclass
class Problem:
    name: str
    spatial: tuple
    kernel: tuple  # neighborhood kernel or window size
    heads: int
    head_dim: int
    batch: int = 1
    stride: tuple = ()
    window: bool = False
    shift: tuple = ()
    rpb: bool = False
    backward: bool = False
    dtype: str = "bfloat16"
    target: str = ""
    extra: dict = field(default_factory=dict)


PROBLEMS = [
    Problem("na2d-128-k13", (128, 128), (13, 13), 8, 64, batch=2, target="<= 2x memory floor"),
    Problem("natt-s1", (56, 56), (7, 7), 2, 32, batch=64, dtype="float16", target="<= 2x floor"),
    Problem("natt-s1-fwdbwd", (56, 56), (7, 7), 2, 32, batch=64, dtype="float16", backward=True,
            target="<= 0.2 ms"),
    Problem("flux-na", (256, 256), (80, 80), 24, 128, target=">= 6x cuDNN dense"),
    Problem("flux-gna-s16", (256, 256), (80, 80), 24, 128, stride=(16, 16), target=">= 9x cuDNN dense"),
    Problem("flux-na-fwdbwd", (256, 256), (80, 80), 24, 128, backward=True, target=">= 6x cuDNN dense"),
    Problem("hunyuan-3d", (30, 48, 80), (18, 24, 24), 24, 128, target=">= 3.6x cuDNN dense"),
    Problem("swin-t-s1", (56, 56), (7, 7), 3, 32, batch=256, window=True, shift=(3, 3), rpb=True,
            dtype="float16", target="vs timm roll+partition+SDPA"),
    Problem("swin-t-s2", (28, 28), (7, 7), 6, 32, batch=256, window=True, shift=(3, 3), rpb=True, dtype="float16"),
    Problem("swin-t-s3", (14, 14), (7, 7), 12, 32, batch=256, window=True, shift=(3, 3), rpb=True, dtype="float16"),
    Problem("swin-t-s4", (7, 7), (7, 7), 24, 32, batch=256, window=True, shift=(0, 0), rpb=True, dtype="float16"),
]


def bench(fn: Callable[[], object], quick: bool = False) -> float:
    """Median milliseconds with CUDA events (triton.testing.do_bench)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def _flops(p: Problem) -> float:
    n = math.prod(p.spatial)
    f = 4.0 * p.batch * p.heads * n * math.prod(p.kernel) * p.head_dim
    return f * 3.5 if p.backward else f  # forward + backward (2.5x)


def _bytes(p: Problem) -> float:
    elem = torch.finfo(getattr(torch, p.dtype)).bits // 8
    n = p.batch * math.prod(p.spatial) * p.heads
    per = n * p.head_dim * elem
    fwd = 4 * per
    if not p.backward:
        return fwd
    # backward: q, k, v, o, dO read; dq, dk, dv written; LSE (fp32) written and read
    return fwd + 8 * per + 2 * n * 4


def _inputs(p: Problem, sets: int = 3):
    dtype = getattr(torch, p.dtype)
    shape = (p.batch, *p.spatial, p.heads, p.head_dim)
    out = []
    for _ in range(sets):
        qkv = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=p.backward) for _ in range(3)]
        rpb = None
        if p.rpb:
            rpb = torch.randn(p.heads, *[2 * k - 1 for k in p.kernel], device="cuda", dtype=dtype,
                              requires_grad=p.backward)
        out.append((*qkv, rpb))
    return out


def _rotating(sets, make_call, backward: bool):
    """A benchmark closure cycling through input sets (so cache-resident reruns don't flatter small rows)."""
    state = {"i": 0}
    grads = [torch.randn_like(make_call(s)) if backward else None for s in sets[:1]]

    def run():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        out = make_call(s)
        if backward:
            out.backward(grads[0])
        return out

    return run


def _ours(p: Problem, sets):
    from visattn import kernels

    scale = p.head_dim ** -0.5
    if p.window:
        call = lambda s: kernels.window(s[0], s[1], s[2], p.kernel, p.shift, s[3], scale)  # noqa: E731
    else:
        rank = len(p.spatial)
        stride = p.stride or (1,) * rank
        call = lambda s: kernels.na(s[0], s[1], s[2], p.kernel, (1,) * rank, stride, (False,) * rank,  # noqa: E731
                                    s[3], scale, None, None)
    return bench(_rotating(sets, call, p.backward))


def _graphed(p: Problem, sets) -> float:
    """The engine replayed from a CUDA graph: GPU time without Python/launch overhead (same inputs each replay)."""
    from visattn import kernels

    s = sets[0]
    rank = len(p.spatial)
    scale = p.head_dim ** -0.5

    def step():
        if p.window:
            out = kernels.window(s[0], s[1], s[2], p.kernel, p.shift, s[3], scale)
        else:
            out = kernels.na(s[0], s[1], s[2], p.kernel, (1,) * rank, p.stride or (1,) * rank, (False,) * rank,
                             s[3], scale, None, None)
        if p.backward:
            out.backward(grad)
        return out

    grad = torch.randn(*s[0].shape[:-1], p.head_dim, device="cuda", dtype=s[0].dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return bench(graph.replay)


def _to_bhnd(t):
    return t.flatten(1, -3).transpose(1, 2).detach().contiguous().requires_grad_(t.requires_grad)


def _sdpa(p: Problem, sets, backend) -> float:
    from torch.nn.attention import sdpa_kernel

    dense = [[_to_bhnd(t) for t in s[:3]] for s in sets]
    with sdpa_kernel(backend):
        return bench(_rotating(dense, lambda s: F.scaled_dot_product_attention(*s), p.backward), quick=True)


def _na_mask_mod(p: Problem):
    """FlexAttention mask_mod of the same neighborhood (dilation 1, non-causal) or window pattern."""
    rank, sp = len(p.spatial), p.spatial
    strides = [math.prod(sp[i + 1:]) for i in range(rank)]
    stride = p.stride or (1,) * rank

    def interval(x, i):
        L, k = sp[i], p.kernel[i]
        if p.window:
            origin = ((x - p.shift[i] + k) // k - 1) * k + p.shift[i]
            return origin.clamp(min=0), (origin + k - 1).clamp(max=L - 1)
        s = stride[i]
        lead = torch.clamp((x // s) * s + s // 2, max=L - 1)
        left, right = k // 2, k - 1 - k // 2
        centre = torch.clamp(torch.clamp(lead, min=left), max=L - 1 - right)
        return centre - left, centre + right

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for i in range(rank):
            qi = (q_idx // strides[i]) % sp[i]
            kj = (kv_idx // strides[i]) % sp[i]
            lo, hi = interval(qi, i)
            ok = ok & (kj >= lo) & (kj <= hi)
        return ok

    return mask_mod


def _flex(p: Problem, sets) -> float:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = math.prod(p.spatial)
    block_mask = create_block_mask(_na_mask_mod(p), None, None, n, n, device="cuda")
    compiled = torch.compile(flex_attention)
    dense = [[_to_bhnd(t) for t in s[:3]] for s in sets]
    return bench(_rotating(dense, lambda s: compiled(*s, block_mask=block_mask), p.backward), quick=True)


def _natten(p: Problem, sets) -> float:
    import natten

    natten.allow_flex_compile(True, backprop=p.backward)
    fn = {2: natten.na2d, 3: natten.na3d, 1: natten.na1d}[len(p.spatial)]
    stride = p.stride or (1,) * len(p.spatial)
    call = lambda s: fn(s[0], s[1], s[2], kernel_size=p.kernel, stride=stride, backend="flex-fna",  # noqa: E731
                        torch_compile=True)
    return bench(_rotating(sets, call, p.backward), quick=True)


def _swin_timm(p: Problem, sets) -> float:
    """timm-style shifted-window attention: roll, partition, SDPA with (rpb + shift mask), reverse, roll back."""
    B, (H, W), w, t, heads, D = p.batch, p.spatial, p.kernel[0], p.shift[0], p.heads, p.head_dim
    img = torch.zeros(1, H, W, device="cuda")
    cuts = ((0, -w), (-w, -t), (-t, None)) if t else ((0, None),)
    label = 0
    for hs in cuts:
        for ws in cuts:
            img[:, slice(*hs), slice(*ws)] = label
            label += 1
    win = img.view(1, H // w, w, W // w, w).permute(0, 1, 3, 2, 4).reshape(-1, w * w)
    shift_mask = torch.where(win[:, :, None] == win[:, None, :], 0.0, -100.0)  # [nW, w*w, w*w]
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1).cuda()
    rel = coords[:, None, :] - coords[:, :, None] + w - 1  # key - query + w - 1
    nw = (H // w) * (W // w)

    def call(s):
        q, k, v, rpb = s
        bias = rpb[:, rel[0], rel[1]]  # [heads, w*w, w*w], gathered every call as timm does
        mask = bias[None] + shift_mask[:, None].to(bias.dtype)  # [nW, heads, w*w, w*w], broadcast over batch

        def part(x):
            x = torch.roll(x, (-t, -t), (1, 2)) if t else x
            x = x.view(B, H // w, w, W // w, w, heads, D).permute(0, 1, 3, 5, 2, 4, 6)
            return x.reshape(B, nw, heads, w * w, D)

        o = F.scaled_dot_product_attention(part(q), part(k), part(v), attn_mask=mask)
        o = o.view(B, H // w, W // w, heads, w, w, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, heads, D)
        return torch.roll(o, (t, t), (1, 2)) if t else o

    return bench(_rotating(sets, call, p.backward))


def run_problem(p: Problem, ceilings: dict, peers: bool = True, skip_slow_peers: bool = False) -> dict:
    from torch.nn.attention import SDPBackend

    sets = _inputs(p)
    row = dict(asdict(p), flops=_flops(p), bytes=_bytes(p))
    row["ms"] = _ours(p, sets)
    t_math = row["flops"] / (ceilings["matmul_tflops"] * 1e12) * 1e3
    t_mem = row["bytes"] / (ceilings["copy_gbs"] * 1e9) * 1e3
    row.update(tflops=row["flops"] / row["ms"] / 1e9, floor_ms=max(t_math, t_mem),
               floor_kind="memory" if t_mem >= t_math else "matmul")
    row["pct_of_floor"] = 100.0 * row["floor_ms"] / row["ms"]
    try:
        row["graph_ms"] = _graphed(p, sets)
    except Exception as err:  # capture can fail where a peer library is involved; the eager time still stands
        row["graph_ms"] = f"n/a ({type(err).__name__}: {str(err)[:80]})"
    row["peers"] = {}
    if peers:
        candidates = {"sdpa_cudnn": lambda: _sdpa(p, sets[:2], SDPBackend.CUDNN_ATTENTION),
                      "sdpa_flash": lambda: _sdpa(p, sets[:2], SDPBackend.FLASH_ATTENTION),
                      "flex": lambda: _flex(p, sets[:2])}
        if p.window:
            candidates = {"timm_roll_sdpa": lambda: _swin_timm(p, sets), **candidates}
        else:
            candidates["natten_flex"] = lambda: _natten(p, sets[:2])
        if skip_slow_peers and (math.prod(p.spatial) > 32768 or p.backward):  # compile + autotune takes minutes
            candidates.pop("flex", None)
            candidates.pop("natten_flex", None)
        for name, fn in candidates.items():
            try:
                row["peers"][name] = fn()
            except Exception as err:  # a peer that cannot run this shape is recorded, not fatal
                row["peers"][name] = f"n/a ({type(err).__name__}: {str(err)[:120]})"
            torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'problem':<16}{'ms':>9}{'graph ms':>9}{'TFLOP/s':>9}{'floor ms':>10}{'%floor':>8}"
            "  peers (ms; speed-up of ours)")
    lines = [head]
    for r in rows:
        graph = r.get("graph_ms")
        graph = f"{graph:9.3f}" if isinstance(graph, float) else f"{'n/a':>9}"
        peers = []
        for name, t in r["peers"].items():
            peers.append(f"{name} {t:.3f} ({t / r['ms']:.1f}x)" if isinstance(t, float) else f"{name} n/a")
        lines.append(f"{r['name']:<16}{r['ms']:>9.3f}{graph}{r['tflops']:>9.1f}{r['floor_ms']:>10.3f}"
                     f"{r['pct_of_floor']:>7.0f}%  " + "; ".join(peers))
    return "\n".join(lines)


def profile(p: Problem) -> str:
    """Per-kernel GPU time of the engine on one problem (torch.profiler), to see which pass costs what."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sets = _inputs(p)
    from visattn import kernels

    run = _rotating(sets, lambda s: kernels.na(s[0], s[1], s[2], p.kernel, (1,) * len(p.spatial),
                                               p.stride or (1,) * len(p.spatial), (False,) * len(p.spatial),
                                               s[3], p.head_dim ** -0.5, None, None)
                    if not p.window else kernels.window(s[0], s[1], s[2], p.kernel, p.shift, s[3],
                                                        p.head_dim ** -0.5), p.backward)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8)


TUNE_FWD = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (32, 32, 4, 3), (128, 32, 4, 3)]
TUNE_BWD = [(64, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)]


def tune(names: list[str]) -> list[dict]:
    """Time each problem under several tile volumes; keep the best one in the table for the rest of this run."""
    from visattn.kernels import tiles

    found = []
    for p in PROBLEMS:
        if p.name not in names:
            continue
        sets = _inputs(p)
        rank = len(p.spatial)
        kernel3 = (1,) * (3 - rank) + tuple(p.kernel)
        bits = 16 if p.dtype != "float32" else 32
        key = tiles.volume_key("dq" if p.backward else "fwd", p.window, kernel3, bits, p.head_dim)
        best = (float("inf"), tiles._VOLUMES[key])
        for vol in TUNE_BWD if p.backward else TUNE_FWD:
            tiles._VOLUMES[key] = vol
            tiles.choose_tiles.cache_clear()
            try:
                ms = _ours(p, sets)
                best = min(best, (ms, vol))
            except Exception as err:  # e.g. out of shared memory for this volume
                ms = f"n/a ({type(err).__name__})"
            found.append(dict(problem=p.name, key=list(key), volume=list(vol), ms=ms))
            print(f"tune {p.name:<16} {str(vol):<18} {ms if isinstance(ms, str) else f'{ms:.4f} ms'}", flush=True)
        tiles._VOLUMES[key] = best[1]
        tiles.choose_tiles.cache_clear()
        print(f"tune {p.name:<16} best {best[1]} for {key}", flush=True)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default="", help="comma-separated problem names (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="time the Triton engine only")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attn-<date>.json)")
    parser.add_argument("--profile", default="", help="print per-kernel GPU time of the engine on these problems")
    parser.add_argument("--tune", default="", help="time these problems under several tile volumes")
    parser.add_argument("--skip-slow-peers", action="store_true",
                        help="no Flex/NATTEN peers above 32768 tokens or with backward (their compile takes minutes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: bench-attn needs a GPU")
        return 2
    import triton

    from visattn.kernels import tiles

    ceilings = device_ceilings()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"matmul {ceilings['matmul_tflops']:.0f} TFLOP/s  copy {ceilings['copy_gbs']:.0f} GB/s", flush=True)
    for name in filter(None, args.profile.split(",")):
        print(f"profile {name}\n" + profile(next(p for p in PROBLEMS if p.name == name)), flush=True)
    if args.tune:
        found = tune(args.tune.split(","))
        with open((args.out or "tune.json").replace(".json", "-tune.json"), "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), triton=triton.__version__, results=found), fh)
        if not args.only:
            return 0
    wanted = [n for n in args.only.split(",") if n]
    date = time.strftime("%Y-%m-%d")
    out = args.out or os.path.join("benchmarks", "results", f"attn-{date}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = []
    for p in sorted(PROBLEMS, key=lambda p: wanted.index(p.name) if p.name in wanted else len(wanted)):
        if wanted and p.name not in wanted:
            continue
        rows.append(run_problem(p, ceilings, peers=not args.no_peers, skip_slow_peers=args.skip_slow_peers))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
        with open(out, "w") as fh:  # rewritten after every row, so a run cut short still leaves its results
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           date=date, ceilings=ceilings, tile_volumes={str(k): v for k, v in tiles._VOLUMES.items()},
                           rows=rows), fh, indent=1)
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
