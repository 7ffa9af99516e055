"""GPU correctness sweep of the Triton engine against ``visattn.reference`` (in float32/float64).

``python -m visattn.bench.check [--per-rank N] [--out FILE] [--workers W] [--seed S]``

Draws random neighborhood problems (1-D/2-D/3-D: kernel, dilation, stride, causal, rpb, extra KV) and window /
shifted-window problems (2-D/3-D, rpb), in float32/float16/bfloat16, head dims 16..128 (and padded ones),
contiguous and strided (fused-qkv views, permuted) inputs; compares the output and every gradient. Outputs are
poisoned with NaN before each launch. Work is spread over worker processes so Triton compiles run in parallel.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import traceback
from collections import Counter, defaultdict

import torch

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
BF16_ABS = 5e-2
MAX_TOKENS = 1 << 16
WORK_BUDGET = 1 << 24  # B * heads * tokens * keys-per-query, keeps the reference fast


def _lengths_for(rank: int, rng: random.Random) -> list[int]:
    total = int(2 ** rng.uniform(math.log2(8 ** rank), math.log2(MAX_TOKENS)))
    lengths = []
    for i in range(rank):
        left = rank - i
        side = max(1, round((total / math.prod(lengths or [1])) ** (1 / left) * rng.uniform(0.6, 1.6)))
        lengths.append(min(side, 1024))
    while math.prod(lengths) > MAX_TOKENS:
        j = lengths.index(max(lengths))
        lengths[j] = max(1, lengths[j] // 2)
    return lengths


DTYPES = ("float32", "float16", "bfloat16")


def draw_flags(rank: int, rng: random.Random, dtypes: tuple = DTYPES, rpb: str = "any") -> dict:
    """The compile-relevant part of a problem: op, dtype, head dim, layout, rpb / extra KV / causal flags.
    ``dtypes`` / ``rpb`` ('any', 'on', 'off') narrow the draw, e.g. to re-check one code path after a fix."""
    is_window = rank >= 2 and rng.random() < 0.3
    dtype = rng.choice(list(dtypes))
    layout = rng.choice(["contiguous", "fused_qkv", "permuted"])
    flags = dict(op="window" if is_window else "na", dtype=dtype, layout=layout,
                 head_dim=rng.choice([16, 32, 64, 128, 24, 80] if dtype != "float32" else [16, 32, 64, 24]),
                 rpb=rng.random() < 0.4 if rpb == "any" else rpb == "on")
    if not is_window:
        flags.update(causal=[rng.random() < 0.25 for _ in range(rank)], extra=rng.choice([0, 0, 1, 5, 17]))
    return flags


def draw_problem(rank: int, rng: random.Random, index: int, flags: dict | None = None) -> dict:
    """One random problem description (plain data, so it can go to a worker and into the JSON log).
    ``flags`` (from draw_flags) fixes the compile-relevant part; the geometry is always drawn fresh."""
    flags = dict(flags or draw_flags(rank, rng))
    heads = rng.choice([1, 2, 3, 4])
    lengths = _lengths_for(rank, rng)
    p = dict(index=index, rank=rank, heads=heads, seed=rng.randrange(1 << 30), **flags)
    if p["op"] == "window":
        window = [rng.choice([w for w in range(1, min(L, 16) + 1) if L % w == 0] or [1]) for L in lengths]
        window = [w if rng.random() < 0.8 else 1 for w in window]
        lengths = [max(L // w, 1) * w for L, w in zip(lengths, window, strict=True)]
        p.update(lengths=lengths, window=window, shift=[rng.randrange(w) if rng.random() < 0.6 else 0 for w in window])
        keys = math.prod(window)
    else:
        kernel, dilation, stride = [], [], []
        for L in lengths:
            k = rng.randint(1, max(1, min(L, 24 if rank == 1 else 13 if rank == 2 else 7)))
            d = rng.randint(1, max(1, L // k)) if rng.random() < 0.3 else 1
            kernel.append(k)
            dilation.append(min(d, 4))
            # rpb with stride > 1 is invalid (SEMANTICS.md): rpb problems keep stride 1
            stride.append(rng.randint(1, k) if rng.random() < 0.3 and not p["rpb"] else 1)
        p.update(lengths=lengths, kernel=kernel, dilation=dilation, stride=stride)
        keys = math.prod(kernel) + p["extra"]
    tokens = math.prod(p["lengths"])
    p["batch"] = max(1, min(4, WORK_BUDGET // max(1, heads * tokens * keys * 8)))
    if heads * tokens * keys * p["batch"] > WORK_BUDGET:
        p["heads"] = 1
    return p


def _make_inputs(p: dict, device: str):
    gen = torch.Generator(device="cpu").manual_seed(p["seed"])
    dtype = getattr(torch, p["dtype"])
    B, H, D, sp = p["batch"], p["heads"], p["head_dim"], p["lengths"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if p["layout"] == "fused_qkv":
        q, k, v = rand(B, *sp, 3, H, D).unbind(-3)
    elif p["layout"] == "permuted":
        perm = [0] + list(range(2, 2 + len(sp))) + [1, len(sp) + 2]
        q, k, v = (rand(B, H, *sp, D).permute(*perm) for _ in range(3))
    else:
        q, k, v = (rand(B, *sp, H, D) for _ in range(3))
    ks = p.get("kernel") or p["window"]
    rpb = rand(H, *[2 * x - 1 for x in ks]) if p["rpb"] else None
    extra = p.get("extra", 0)
    ek = rand(B, extra, H, D) if extra else None
    ev = rand(B, extra, H, D) if extra else None
    grad = rand(B, *sp, H, D)
    return q, k, v, rpb, ek, ev, grad


def _call(module, p, q, k, v, rpb, ek, ev, scale):
    if p["op"] == "window":
        return module.window(q, k, v, tuple(p["window"]), tuple(p["shift"]), rpb, scale)
    return module.na(q, k, v, tuple(p["kernel"]), tuple(p["dilation"]), tuple(p["stride"]), tuple(p["causal"]),
                     rpb, scale, ek, ev)


def _error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf"), float("inf")
    rel = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    return rel, (out64 - ref64).abs().max().item()


def run_problem(p: dict, device: str = "cuda") -> dict:
    """Run one problem through the engine and the reference; returns errors per tensor and pass/fail."""
    from visattn import kernels, reference
    from visattn.kernels import ops

    ops.POISON = True
    tensors = _make_inputs(p, device)
    q, k, v, rpb, ek, ev, grad = tensors
    scale = p["head_dim"] ** -0.5
    names = ["out", "dq", "dk", "dv"] + ["drpb"] * (rpb is not None) + ["dek", "dev"] * (ek is not None)
    why = (kernels.window_why_not(q, k, v, p.get("window"), p.get("shift"), rpb) if p["op"] == "window" else
           kernels.na_why_not(q, k, v, p["kernel"], p["dilation"], p["stride"], p["causal"], rpb, ek, ev))
    if why is not None:
        return dict(p, ok=False, error=f"why_not: {why}")
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, rpb, ek, ev) if t is not None]
    ref_dtype = torch.float64 if p["dtype"] == "float32" else torch.float32
    ref_inputs = [t.detach().to(ref_dtype).requires_grad_(True) for t in inputs]

    def unpack(ts):
        it = iter(ts)
        return [next(it) if t is not None else None for t in (q, k, v, rpb, ek, ev)]

    started = time.perf_counter()
    try:
        out = _call(kernels, p, *unpack(inputs), scale)
        grads = torch.autograd.grad(out, inputs, grad)
        if q.is_cuda:
            torch.cuda.synchronize()
    except Exception as err:  # a failure to compile or launch is a failed problem, with its message
        return dict(p, ok=False, error="".join(traceback.format_exception_only(type(err), err))[-600:])
    kernel_s = time.perf_counter() - started  # compiles included: what the sweep's throughput is bound by
    try:
        ref = _call(reference, p, *unpack(ref_inputs), scale)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad.to(ref_dtype))
    except torch.OutOfMemoryError:  # the oracle, not the kernel, ran out of memory: not a verdict
        torch.cuda.empty_cache()
        return dict(p, ok=True, skipped="reference out of memory")
    errors, ok = {}, True
    grad_norm = grad.double().norm().item()
    for name, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        rel, absmax = _error(a, b)
        errors[name] = (rel, absmax)
        # an absolute floor too: with one key per query dq, dk and drpb are exactly 0 (softmax of one logit), and
        # rounding noise (summed over the whole map for drpb) makes `rel` meaningless there.
        exact_zero = b.double().norm().item() <= 1e-6 * grad_norm and absmax < 1e-3
        if exact_zero:  # judged by the absolute floor; a relative error of ~0/0 would only clutter the summary
            errors[name] = (0.0, absmax)
        good = (rel < TOLERANCE[p["dtype"]] or exact_zero
                or absmax < (BF16_ABS if p["dtype"] == "bfloat16" else TOLERANCE[p["dtype"]]))
        ok = ok and good
    if q.is_cuda:
        torch.cuda.synchronize()
    return dict(p, ok=ok, errors=errors, kernel_s=kernel_s, reference_s=time.perf_counter() - started - kernel_s)


def _variant(p: dict) -> tuple:
    """What selects a compiled kernel (roughly): pattern flags, dtype, padded head dim, layout (stride alignment)."""
    padded = max(16, 1 << (p["head_dim"] - 1).bit_length())
    return (p["op"], p["rank"], p["dtype"], padded, p["rpb"], bool(p.get("extra")), tuple(p.get("causal", ())),
            p["layout"])


def _worker(args):
    problems, device_index = args
    torch.cuda.set_device(device_index)
    results = []
    for p in problems:
        try:
            results.append(run_problem(p))
        except Exception as err:  # record and go on: one bad problem must not end the sweep
            results.append(dict(p, ok=False, error=f"{type(err).__name__}: {str(err)[:400]}"))
        torch.cuda.empty_cache()
    return results


def _summarise(results: list[dict]) -> str:
    lines = [f"{'rank':>4} {'op':>6} {'dtype':>9} {'run':>5} {'failed':>6} {'worst rel err (out/dq/dk/dv)':>40}"]
    groups = defaultdict(list)
    for r in results:
        groups[(r["rank"], r["op"], r["dtype"])].append(r)
    for key in sorted(groups):
        rs = groups[key]
        worst = [max((r.get("errors", {}).get(n, (0.0,))[0] for r in rs), default=0.0)
                 for n in ("out", "dq", "dk", "dv")]
        lines.append(f"{key[0]:>4} {key[1]:>6} {key[2]:>9} {len(rs):>5} {sum(not r['ok'] for r in rs):>6} "
                     + " ".join(f"{w:9.1e}" for w in worst))
    per_rank = Counter(r["rank"] for r in results)
    failed = Counter(r["rank"] for r in results if not r["ok"])
    lines.append("per rank: " + ", ".join(f"{k}-D run {per_rank[k]} failed {failed[k]}" for k in sorted(per_rank)))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-rank", type=int, default=1000, help="random problems per spatial rank")
    parser.add_argument("--out", default=None, help="JSON log path")
    parser.add_argument("--variants", type=int, default=40, help="flag combinations per rank (compile variants)")
    # compiling kernel variants dominates the sweep and is CPU-bound: one worker per core (the H100 lease has 16)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=None, help="problem seed (default: from the clock; logged)")
    parser.add_argument("--time-budget", dest="time_limit", type=float, default=540.0,
                        help="stop handing out work after this many s")
    # the earlier spelling, kept for scripts that pass it (the other commands call it --time-budget)
    parser.add_argument("--time-limit", dest="time_limit", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--dtypes", default="fp32,fp16,bf16",
                        help="comma list of dtypes to draw from (default: fp32,fp16,bf16; float32 etc. accepted too)")
    parser.add_argument("--rpb", choices=["any", "on", "off"], default="any", help="relative-position bias draw")
    # one rank per call: 1000 problems take ~5 min at the ~4 problems/s an H100 sweep measured (compiles dominate)
    parser.add_argument("--ranks", default="1,2,3", help="comma list of spatial ranks to sweep (default: 1,2,3)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The sweep; exit 0 when every problem passed, 1 on any failure, 2 without a GPU or with bad arguments."""
    from visattn.bench.common import dtype_name, parse_dtype, require_cuda, write_json

    try:  # fp32 / fp16 / bf16 (the spelling of every other command) or the torch names the results use
        dtypes = tuple(dtype_name(parse_dtype(d, "--dtypes")) for d in args.dtypes.split(",") if d)
    except ValueError:
        dtypes = ()
    if not dtypes:
        print(f"visattn check: --dtypes={args.dtypes!r}: choose from fp32,fp16,bf16 (or {','.join(DTYPES)})",
              file=sys.stderr)
        return 2
    try:
        ranks = tuple(sorted({int(r) for r in args.ranks.split(",") if r.strip()}))
    except ValueError:
        ranks = ()
    if not ranks or not set(ranks) <= {1, 2, 3}:
        print(f"visattn check: --ranks={args.ranks!r}: a comma list drawn from 1,2,3", file=sys.stderr)
        return 2
    missing = require_cuda("check")
    if missing:
        print(missing)
        return 2
    seed = int(time.time()) if args.seed is None else args.seed
    print(f"seed {seed}")
    rng = random.Random(seed)
    # A pool of flag combinations per rank (each compiled once per tile shape), geometry fresh for every problem.
    pools = {rank: [draw_flags(rank, rng, dtypes, args.rpb) for _ in range(args.variants)] for rank in ranks}
    problems = [draw_problem(rank, rng, i, rng.choice(pools[rank])) for rank in ranks for i in range(args.per_rank)]
    # Chunks of problems that share a compiled-kernel variant: a worker compiles it once and reuses it (compiling
    # dominates the sweep); chunk order is shuffled so a time limit still cuts across all kinds of problems.
    by_variant = {}
    for p in problems:
        by_variant.setdefault(_variant(p), []).append(p)
    chunks = [group[i:i + 10] for group in by_variant.values() for i in range(0, len(group), 10)]
    rng.shuffle(chunks)
    start = time.time()
    results = []
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(args.workers) as pool:
        jobs = [pool.apply_async(_worker, ((c, i % torch.cuda.device_count()),)) for i, c in enumerate(chunks)]
        for job in jobs:
            remaining = args.time_limit - (time.time() - start)
            try:
                results.extend(job.get(timeout=max(remaining, 1.0)))
            except mp.TimeoutError:
                print("time limit reached; reporting the problems finished so far")
                pool.terminate()
                break
    fails = [r for r in results if not r["ok"]]
    for r in fails[:15]:
        print("FAIL", {k: r[k] for k in r if k not in ("seed",)})
    print(_summarise(results))
    skipped = sum(1 for r in results if r.get("skipped"))
    timed = [r for r in results if "kernel_s" in r]
    if timed:
        print(f"time in problems: kernels (compiles included) {sum(r['kernel_s'] for r in timed):.0f}s, "
              f"reference {sum(r['reference_s'] for r in timed):.0f}s, over {args.workers} workers")
    print(f"total run {len(results)} failed {len(fails)} (reference out of memory, not judged: {skipped}) "
          f"in {time.time() - start:.0f}s")
    if args.out:
        from visattn.bench.common import environment

        write_json(args.out, dict(bench="check", **environment(), seed=seed, results=results))
    return 0 if not fails and results else 1


if __name__ == "__main__":
    sys.exit(main())
