"""``visattn bench-attn``: the Triton engine against its peers on a YAML suite of problems, with honest floors.

``visattn bench-attn [--suite NAME|PATH ...] [--only NAME,...] [--out FILE] [--plot DIR]``; suites ship in
``visattn/configs`` (``core`` by default; ``--list`` prints a suite's problems).

Every row: median time (CUDA events after warm-up, rotating fresh random inputs), useful TFLOP/s
(4·B·heads·N·keys-per-query·head_dim; forward+backward counts 3.5×), the floor = max(FLOPs / matmul rate,
bytes / copy rate) with both rates measured in this run, % of floor, and the peers measured in the same process:
dense SDPA (cuDNN, flash), FlexAttention with a block mask of the same pattern, NATTEN's flex backend where
``natten`` imports, timm's roll + partition + masked SDPA for window rows and BiFormer's gather for routing rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from visattn.bench.common import default_result_path, device_ceilings, environment, require_cuda, write_json
from visattn.bench.suites import Problem, SuiteError, fewest_bytes, load_suite, useful_flops

DEFAULT_SUITE = "core"


def bench(fn: Callable[[], object], quick: bool = False) -> float:
    """Median milliseconds with CUDA events (triton.testing.do_bench)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def floor(p: Problem, ceilings: dict) -> dict:
    """FLOPs, bytes, the floor in ms and which ceiling sets it, for problem ``p`` at the measured ``ceilings``."""
    flops, nbytes = useful_flops(p), fewest_bytes(p)
    t_math = flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
    t_mem = nbytes / (ceilings["copy_gbs"] * 1e9) * 1e3
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(t_math, t_mem),
            "floor_kind": "memory" if t_mem >= t_math else "matmul"}


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


def engine_call(p: Problem) -> Callable:
    """``call(input_set) -> out`` of visattn's fused kernel for ``p`` (the one place that knows its signature)."""
    from visattn import kernels

    scale = p.softmax_scale
    rank = p.rank
    if p.op == "window":
        shift = p.shift or (0,) * rank
        return lambda s: kernels.window(s[0], s[1], s[2], p.kernel, shift, s[3], scale)
    if p.op == "routing":
        from visattn.kernels.routing import bilevel_routing

        return lambda s: bilevel_routing(s[0], s[1], s[2], p.regions, p.topk, scale)
    dilation, stride = p.dilation or (1,) * rank, p.stride or (1,) * rank
    return lambda s: kernels.na(s[0], s[1], s[2], p.kernel, dilation, stride, (False,) * rank, s[3], scale,
                                None, None)


def _ours(p: Problem, sets) -> float:
    return bench(_rotating(sets, engine_call(p), p.backward))


def _graphed(p: Problem, sets) -> float:
    """The engine replayed from a CUDA graph: GPU time without Python/launch overhead (same inputs each replay)."""
    s = sets[0]
    call = engine_call(p)
    grad = torch.randn(*s[0].shape[:-1], p.head_dim, device="cuda", dtype=s[0].dtype)

    def step():
        out = call(s)
        if p.backward:
            out.backward(grad)
        return out

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


def _interval(p: Problem, x, i: int):
    """[first, last] key index along dim i for query index x (same dilation group), NATTEN / Swin semantics."""
    length, k = p.spatial[i], p.kernel[i]
    if p.op == "window":
        shift = (p.shift or (0,) * p.rank)[i]
        origin = ((x - shift + k) // k - 1) * k + shift
        return origin.clamp(min=0), (origin + k - 1).clamp(max=length - 1)
    d = (p.dilation or (1,) * p.rank)[i]
    s = (p.stride or (1,) * p.rank)[i]
    group, index = x % d, x // d
    group_length = (length - group + d - 1) // d  # positions g, g+d, ... inside the map
    lead = torch.minimum((index // s) * s + s // 2, group_length - 1)
    left, right = k // 2, k - 1 - k // 2
    centre = torch.minimum(torch.clamp(lead, min=left), group_length - 1 - right)
    return (centre - left) * d + group, (centre + right) * d + group


def na_mask_mod(p: Problem):
    """FlexAttention mask_mod of problem p's neighborhood (dilation, stride; non-causal) or window pattern."""
    rank, sp = p.rank, p.spatial
    strides = [math.prod(sp[i + 1:]) for i in range(rank)]
    dilation = p.dilation or (1,) * rank

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for i in range(rank):
            qi = (q_idx // strides[i]) % sp[i]
            kj = (kv_idx // strides[i]) % sp[i]
            lo, hi = _interval(p, qi, i)
            ok = ok & (kj >= lo) & (kj <= hi)
            if p.op == "na" and dilation[i] > 1:
                ok = ok & (kj % dilation[i] == qi % dilation[i])
        return ok

    return mask_mod


def _flex(p: Problem, sets) -> float:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = p.tokens
    block_mask = create_block_mask(na_mask_mod(p), None, None, n, n, device="cuda")
    compiled = torch.compile(flex_attention)
    dense = [[_to_bhnd(t) for t in s[:3]] for s in sets]
    return bench(_rotating(dense, lambda s: compiled(*s, block_mask=block_mask), p.backward), quick=True)


def _natten(p: Problem, sets) -> float:
    import natten

    natten.allow_flex_compile(True, backprop=p.backward)
    fn = {2: natten.na2d, 3: natten.na3d, 1: natten.na1d}[p.rank]
    stride, dilation = p.stride or (1,) * p.rank, p.dilation or (1,) * p.rank

    def call(s):
        return fn(s[0], s[1], s[2], kernel_size=p.kernel, stride=stride, dilation=dilation, backend="flex-fna",
                  torch_compile=True)

    return bench(_rotating(sets, call, p.backward), quick=True)


def _swin_timm(p: Problem, sets) -> float:
    """timm-style shifted-window attention: roll, partition, SDPA with (rpb + shift mask), reverse, roll back."""
    B, (H, W), w, heads, D = p.batch, p.spatial, p.kernel[0], p.heads, p.head_dim
    t = (p.shift or (0, 0))[0]
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
        mask = shift_mask[:, None]
        if rpb is not None:
            mask = rpb[:, rel[0], rel[1]][None] + mask.to(rpb.dtype)  # gathered every call, as timm does
        mask = mask.to(q.dtype)

        def part(x):
            x = torch.roll(x, (-t, -t), (1, 2)) if t else x
            x = x.view(B, H // w, w, W // w, w, heads, D).permute(0, 1, 3, 5, 2, 4, 6)
            return x.reshape(B, nw, heads, w * w, D)

        o = F.scaled_dot_product_attention(part(q), part(k), part(v), attn_mask=mask)
        o = o.view(B, H // w, W // w, heads, w, w, D).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, heads, D)
        return torch.roll(o, (t, t), (1, 2)) if t else o

    return bench(_rotating(sets, call, p.backward))


def _biformer(p: Problem, sets) -> float:
    from visattn.bench.bra import biformer_gather

    def call(s):
        return biformer_gather(s[0], s[1], s[2], p.regions[0], p.topk, p.softmax_scale, use_sdpa=False)

    return bench(_rotating(sets, call, p.backward), quick=True)


def peer_candidates(p: Problem, skip_slow_peers: bool = False) -> list[str]:
    """The peers timed for ``p``: every one that applies, narrowed by the suite's ``peers`` and --skip-slow-peers."""
    names = ["sdpa_cudnn", "sdpa_flash"]
    if p.op == "window" and p.rank == 2:
        names = ["timm_roll_sdpa", *names, "flex"]
    elif p.op == "routing":
        names = ["biformer_gather", *names]
    else:
        names += ["flex", "natten_flex"]
    if p.peers is not None:
        names = [n for n in names if n in p.peers]
    if skip_slow_peers and (p.tokens > 32768 or p.backward):  # compile + autotune takes minutes
        names = [n for n in names if n not in ("flex", "natten_flex")]
    return names


def run_problem(p: Problem, ceilings: dict, peers: bool = True, skip_slow_peers: bool = False) -> dict:
    from torch.nn.attention import SDPBackend

    sets = _inputs(p)
    row = dict(dataclasses.asdict(p), **floor(p, ceilings))
    row["ms"] = _ours(p, sets)
    row["tflops"] = row["flops"] / row["ms"] / 1e9
    row["pct_of_floor"] = 100.0 * row["floor_ms"] / row["ms"]
    try:
        row["graph_ms"] = _graphed(p, sets)
    except Exception as err:  # capture can fail where a peer library is involved; the eager time still stands
        row["graph_ms"] = f"n/a ({type(err).__name__}: {str(err)[:80]})"
    row["peers"] = {}
    runners = {"sdpa_cudnn": lambda: _sdpa(p, sets[:2], SDPBackend.CUDNN_ATTENTION),
               "sdpa_flash": lambda: _sdpa(p, sets[:2], SDPBackend.FLASH_ATTENTION),
               "flex": lambda: _flex(p, sets[:2]), "natten_flex": lambda: _natten(p, sets[:2]),
               "timm_roll_sdpa": lambda: _swin_timm(p, sets), "biformer_gather": lambda: _biformer(p, sets[:2])}
    for name in peer_candidates(p, skip_slow_peers) if peers else []:
        try:
            row["peers"][name] = runners[name]()
        except Exception as err:  # a peer that cannot run this shape is recorded, not fatal
            row["peers"][name] = f"n/a ({type(err).__name__}: {str(err)[:120]})"
        torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict]) -> str:
    width = max([16] + [len(r["name"]) + 1 for r in rows])
    head = (f"{'problem':<{width}}{'ms':>9}{'graph ms':>9}{'TFLOP/s':>9}{'floor ms':>10}{'%floor':>8}"
            "  peers (ms; speed-up of ours)")
    lines = [head]
    for r in rows:
        graph = r.get("graph_ms")
        graph = f"{graph:9.3f}" if isinstance(graph, float) else f"{'n/a':>9}"
        peers = []
        for name, t in r["peers"].items():
            peers.append(f"{name} {t:.3f} ({t / r['ms']:.1f}x)" if isinstance(t, float) else f"{name} n/a")
        lines.append(f"{r['name']:<{width}}{r['ms']:>9.3f}{graph}{r['tflops']:>9.1f}{r['floor_ms']:>10.3f}"
                     f"{r['pct_of_floor']:>7.0f}%  " + "; ".join(peers))
    return "\n".join(lines)


def profile(p: Problem) -> str:
    """Per-kernel GPU time of the engine on one problem (torch.profiler), to see which pass costs what."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run = _rotating(_inputs(p), engine_call(p), p.backward)
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


def tune(problems: list[Problem]) -> list[dict]:
    """Time each NA / window problem under several tile volumes; keep the best for the rest of this run."""
    from visattn.kernels import tiles

    found = []
    for p in problems:
        if p.op == "routing":
            continue
        sets = _inputs(p)
        kernel3 = (1,) * (3 - p.rank) + tuple(p.kernel)
        bits = 16 if p.dtype != "float32" else 32
        key = tiles.volume_key("dq" if p.backward else "fwd", p.window, kernel3, bits, p.head_dim)
        best = (float("inf"), tiles._VOLUMES[key])
        for vol in TUNE_BWD if p.backward else TUNE_FWD:
            tiles.set_volume(key, vol)
            try:
                ms = _ours(p, sets)
                best = min(best, (ms, vol))
            except Exception as err:  # e.g. out of shared memory for this volume
                ms = f"n/a ({type(err).__name__})"
            found.append(dict(problem=p.name, key=list(key), volume=list(vol), ms=ms))
            print(f"tune {p.name:<16} {str(vol):<18} {ms if isinstance(ms, str) else f'{ms:.4f} ms'}", flush=True)
        tiles.set_volume(key, best[1])
        print(f"tune {p.name:<16} best {best[1]} for {key}", flush=True)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", action="append", default=None, metavar="NAME|PATH",
                        help=f"a built-in suite name or a YAML file; repeatable (default: {DEFAULT_SUITE})")
    parser.add_argument("--list", action="store_true", help="print the suites' problems and exit (no GPU needed)")
    parser.add_argument("--only", default="", help="comma-separated problem names (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="time the Triton engine only")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attn-<date>.json)")
    parser.add_argument("--plot", default=None, metavar="DIR", help="write speed-up and %%-of-floor PNGs into DIR")
    parser.add_argument("--profile", default="", help="print per-kernel GPU time of the engine on these problems")
    parser.add_argument("--tune", default="", help="time these problems under several tile volumes")
    parser.add_argument("--skip-slow-peers", action="store_true",
                        help="no Flex/NATTEN peers above 32768 tokens or with backward (their compile takes minutes)")


def select_problems(args: argparse.Namespace) -> tuple[list[str], list[Problem]]:
    """(suite names, problems in run order); raises SuiteError for a bad suite or an unknown --only name."""
    suites = [load_suite(s) for s in (args.suite or [DEFAULT_SUITE])]
    problems = [p for s in suites for p in s.problems]
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in {p.name for p in problems}]
    if unknown:
        raise SuiteError(f"--only: no problem named {unknown} in suite(s) {[s.name for s in suites]}")
    if wanted:
        problems = sorted((p for p in problems if p.name in wanted), key=lambda p: wanted.index(p.name))
    return [s.name for s in suites], problems


def run(args: argparse.Namespace) -> int:
    try:
        suite_names, problems = select_problems(args)
    except SuiteError as err:
        print(f"visattn bench-attn: {err}", file=sys.stderr)
        return 2
    if args.list:
        for p in problems:
            print(f"{p.name:32s} {p.op:8s} B={p.batch:<4d} {'x'.join(map(str, p.spatial)):>12s} "
                  f"k={'x'.join(map(str, p.kernel or p.regions)):9s} heads={p.heads:<3d} d={p.head_dim:<4d} "
                  f"{p.dtype}{' rpb' if p.rpb else ''}{' fwd+bwd' if p.backward else ''}")
        return 0
    missing = require_cuda("bench-attn")
    if missing:
        print(missing)
        return 2
    ceilings = device_ceilings()
    env = environment("cuda")
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"matmul {ceilings['matmul_tflops']:.0f} TFLOP/s  copy {ceilings['copy_gbs']:.0f} GB/s", flush=True)
    by_name = {p.name: p for p in problems}
    for name in filter(None, args.profile.split(",")):
        print(f"profile {name}\n" + profile(by_name[name]), flush=True)
    if args.tune:
        found = tune([by_name[n] for n in args.tune.split(",") if n in by_name])
        write_json((args.out or "tune.json").replace(".json", "-tune.json"), dict(bench="attn-tune", **env,
                                                                                    results=found))
        if not args.only:
            return 0
    out = args.out or default_result_path("attn")
    rows = []
    for p in problems:
        rows.append(run_problem(p, ceilings, peers=not args.no_peers, skip_slow_peers=args.skip_slow_peers))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
        payload = dict(bench="attn", **env, suites=suite_names, ceilings=ceilings, rows=rows)
        write_json(out, payload)  # rewritten after every row, so a run cut short still leaves its results
    print(format_table(rows))
    print(f"wrote {out}")
    if args.plot:
        from visattn.bench import plots

        for path in plots.plot_attn(payload, args.plot):
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-attn", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
