"""Video sparse attention (issue 23): Radial Attention, VMoBA and sliding-tile attention against dense attention.

Usage (repo root, CUDA):
    python benchmarks/bench_video_sparse.py --out benchmarks/results/video-sparse-h100.json
    python benchmarks/bench_video_sparse.py --tiny   (CPU dry run: prints, writes nothing)

Attention only, bf16, one process: for each released latent grid (Wan 2.1-14B 720p: 21x45x80 tokens, 40 heads;
HunyuanVideo 768x1280: 30x48x80 tokens, 24 heads; head dim 128) and a 4x longer video, each pattern's forward and
forward+backward time against cuDNN dense SDPA and (Radial, STA) compiled FlexAttention given the same block mask
(built from the block table, so no dense boolean mask is evaluated), plus the pattern's floor (its useful FLOPs at
the measured bf16 matmul rate, or q/k/v/o traffic at the measured copy rate) and % of floor. Radial rows also report
the mask density and the density-implied speed-up target (issue 23: >= 0.6 x 1/density over cuDNN, >= 2x Flex).

``--tiny`` runs every code path at toy sizes on the CPU (reference backend, wall-clock timing, no peers) for a
smoke test. Not yet run on a GPU by its author: the first device run is its test.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import visattn  # noqa: E402
from visattn.bench.common import device_ceilings, floor_ms, save_result  # noqa: E402

GRIDS = {  # name: (grid, heads, radial decay, radial sink, STA tile, VMoBA chunks)
    "wan2.1-14b-720p": ((21, 45, 80), 40, 0.2, True, (3, 5, 8), [3, (9, 16), (3, 9, 16)]),
    "hunyuan-768x1280": ((30, 48, 80), 24, 0.95, False, (6, 8, 8), [3, (8, 16), (6, 8, 16)]),
}
TINY = {"tiny": ((4, 4, 8), 2, 0.5, True, (2, 2, 4), [1, (2, 4), (2, 2, 4)])}


def time_ms(fn, device: str, iters: int = 10, warmup: int = 2, max_seconds: float = 3.0) -> float:
    """Median wall time (ms) after warm-up; calls slower than a few seconds (dense attention at the 4x video) get
    fewer timed iterations so that ``iters`` calls take at most about ``max_seconds`` (at least one)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    iters = max(1, min(iters, int(max_seconds / max(per_call, 1e-9))))
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fwd_and_fwd_bwd(run, inputs, device: str) -> tuple[float, float]:
    with torch.no_grad():
        fwd = time_ms(lambda: run(*inputs), device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad = torch.randn_like(run(*leaves))

    def step():
        torch.autograd.grad(run(*leaves), leaves, grad)

    return fwd, time_ms(step, device)


def dense_sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def bhnd(t):
        return t.flatten(1, 3).transpose(1, 2)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v))


def flex_from_blocks(mask: torch.Tensor, tokens: int, block: int, device: str):
    """Compiled FlexAttention over a [nb, nb] block mask, every listed block full (BlockMask.from_kv_blocks)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    mask = mask.to(device)
    counts = mask.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True).to(torch.int32)
    empty = torch.zeros_like(counts)
    block_mask = BlockMask.from_kv_blocks(empty[None, None], order[None, None], counts[None, None], order[None, None],
                                          BLOCK_SIZE=block, seq_lengths=(tokens, tokens))
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        def bhnd(t):
            return t.flatten(1, 3).transpose(1, 2)

        return compiled(bhnd(q), bhnd(k), bhnd(v), block_mask=block_mask)

    return run


def patterns(grid, heads, decay, sink, tile, chunks, backend, block=128):
    """(name, run, keys per query for the floor or None, block mask for Flex or None, block size)."""
    tokens = math.prod(grid)
    rows = []
    radial_mask = visattn.radial_attention_mask(grid[0], grid[1] * grid[2], block, decay, sink)
    token_block = torch.arange(tokens) // block
    sizes = torch.bincount(token_block, minlength=radial_mask.shape[0]).double()
    radial_pairs = float((radial_mask.double() * sizes[:, None] * sizes[None, :]).sum())
    rows.append(("radial", lambda q, k, v: visattn.radial_attention(q, k, v, block, decay, sink, backend=backend),
                 radial_pairs / tokens, radial_mask, block))
    if all(n % t == 0 for n, t in zip(grid, tile, strict=True)):
        window = (3, 3, 3)
        keys = math.prod(min(2 * (w // 2) + 1, n // t) * t for w, n, t in zip(window, grid, tile, strict=True))
        rows.append((f"sta tile {tile} window {window}",
                     lambda q, k, v: visattn.sliding_tile_attention(q, k, v, tile, window, backend=backend),
                     float(keys), None, None))
    for chunk in chunks:
        rows.append((f"vmoba chunk {chunk}",
                     lambda q, k, v, chunk=chunk: visattn.vmoba_attention(q, k, v, chunk, backend=backend), None,
                     None, None))
    return rows


def bench(args) -> dict:
    started = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    backend = "reference" if args.tiny else "triton"
    ceil = None if args.tiny else device_ceilings()
    results = []
    grids = TINY if args.tiny else {n: g for n, g in GRIDS.items() if args.grids is None or n in args.grids}
    for name, (grid, heads, decay, sink, tile, chunks) in grids.items():
        for length in args.lengths:
            if time.perf_counter() - started > args.time_budget:
                results.append({"grid": name, "length": length, "skipped": "time budget"})
                continue
            video = (grid[0] * length, *grid[1:])
            tokens = math.prod(video)
            q, k, v = (torch.randn(1, *video, heads, 16 if args.tiny else 128, device=device, dtype=dtype)
                       for _ in range(3))
            dim = q.shape[-1]
            base = {"grid": name, "video": list(video), "heads": heads, "head_dim": dim}
            dense_fwd = dense_fb = None
            if not args.tiny:
                try:
                    dense_fwd, dense_fb = fwd_and_fwd_bwd(dense_sdpa, (q, k, v), device)
                except Exception as err:  # e.g. out of memory at 4x length
                    results.append({**base, "pattern": "dense cuDNN", "error": f"{type(err).__name__}: {err}"})
                if dense_fwd is not None:
                    results.append({**base, "pattern": "dense cuDNN", "fwd_ms": dense_fwd, "fwd_bwd_ms": dense_fb})
            for pattern, run, keys, mask, block in patterns(video, heads, decay, sink, tile, chunks, backend,
                                                            16 if args.tiny else 128):
                if args.patterns and not pattern.startswith(tuple(args.patterns)):
                    continue
                row = {**base, "pattern": pattern}
                try:
                    row["fwd_ms"], row["fwd_bwd_ms"] = fwd_and_fwd_bwd(run, (q, k, v), device)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"
                    results.append(row)
                    continue
                if keys is not None:
                    row["density"] = keys / tokens
                    if ceil is not None:
                        flops = 4 * heads * tokens * keys * dim
                        nbytes = 4 * tokens * heads * dim * q.element_size()
                        row["floor_ms"] = floor_ms(flops, nbytes, ceil)
                        row["pct_floor"] = 100 * row["floor_ms"] / row["fwd_ms"]
                if dense_fwd is not None:
                    row["speedup_vs_dense_fwd"] = dense_fwd / row["fwd_ms"]
                    row["speedup_vs_dense_fwd_bwd"] = dense_fb / row["fwd_bwd_ms"]
                    if pattern == "radial":
                        row["target_vs_dense"] = 0.6 / row["density"]
                if mask is not None and not args.tiny and not args.no_flex:
                    try:
                        flex = flex_from_blocks(mask, tokens, block, device)
                        row["flex_fwd_ms"], row["flex_fwd_bwd_ms"] = fwd_and_fwd_bwd(flex, (q, k, v), device)
                        row["speedup_vs_flex_fwd"] = row["flex_fwd_ms"] / row["fwd_ms"]
                    except Exception as err:
                        row["flex_error"] = f"{type(err).__name__}: {err}"
                results.append(row)
                print(row, flush=True)
    return {"rows": results, "ceilings": ceil}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (reference backend), no peers")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/video-sparse-DATE.json)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 4], help="video lengths (x the released frames)")
    parser.add_argument("--grids", nargs="+", default=None, help=f"subset of {list(GRIDS)}")
    parser.add_argument("--patterns", nargs="+", default=None, help="only patterns starting with these names "
                        "(radial, sta, vmoba)")
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention peer")
    parser.add_argument("--time-budget", type=float, default=400.0, help="start no new video after this many seconds")
    args = parser.parse_args(argv)
    payload = bench(args)
    if not args.tiny:
        print(f"saved {save_result('video-sparse', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
