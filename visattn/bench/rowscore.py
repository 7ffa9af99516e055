"""``visattn bench-rowscore``: the fused row-score kernel (LLM-side pruning scores) vs the eager ops it replaces.

Rows are the scoring calls of the ``bench-prune`` workloads on the LLaVA-1.5-7B text model (32 heads, head dim
128, fp16): FastV / PyramidDrop (one query row) at batch 1 and 8 and on the 2,955-token NeXT shape, and SparseVLM's
text raters (16 rows). Per row and peer: GPU time (CUDA-event median), host wall time of one synchronised call
(what a launch-bound prefill pays), the floor (raw keys and rotary tables read once at the measured copy rate)
and the error against a float64 computation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch

from visattn.bench.timing import device_ceilings, floor_ms, median_ms, save_result

# (name, batch, query rows, keys)
PROBLEMS = [
    ("llava-1.5 b1, 1 row", 1, 1, 651),
    ("llava-1.5 b8, 1 row", 8, 1, 651),
    ("llava-1.5 b8, 16 raters", 8, 16, 651),
    ("llava-next b1, 1 row", 1, 1, 2955),
    ("llava-next b1, 16 raters", 1, 16, 2955),
]
HEADS, HEAD_DIM = 32, 128


def _inputs(batch: int, rows: int, keys: int, dtype: torch.dtype) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, rows, HEADS, HEAD_DIM, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, keys, HEADS, HEAD_DIM, device="cuda", generator=g).to(dtype)
    pos = torch.arange(keys, device="cuda")[None].float()
    freqs = pos[..., None] * (1e4 ** (-torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    emb = torch.cat([freqs, freqs], -1)
    row_ids = torch.arange(keys - rows, keys, device="cuda")[None].expand(batch, -1).contiguous()
    row_ok = torch.ones(batch, rows, dtype=torch.bool, device="cuda")
    valid = torch.ones(batch, keys, dtype=torch.bool, device="cuda")
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype), row_ids, row_ok, valid, HEAD_DIM**-0.5


def _eager(q, k, cos, sin, rows, row_ok, valid, scale):
    from visattn.tokenprune.scoring import _eager_rows

    probs = _eager_rows(q, k, cos, sin, rows, valid, scale).mean(1)
    w = row_ok.to(probs.dtype)[..., None]
    return (probs * w).sum(1) / w.sum(1).clamp(min=1)


def _host_ms(fn, iters: int = 50) -> float:
    """Median wall time of one call followed by a synchronise (ms)."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_problem(problem, dtype, ceilings) -> dict:
    from visattn.kernels.rowscore import row_scores

    name, batch, rows, keys = problem
    args = _inputs(batch, rows, keys, dtype)
    q64 = [a.double() if a.is_floating_point() else a for a in args[:-1]] + [args[-1]]
    want = _eager(*q64)
    nbytes = batch * keys * HEADS * HEAD_DIM * 2 + 2 * keys * HEAD_DIM * 2
    row = {"problem": name, "batch": batch, "rows": rows, "keys": keys, "dtype": str(dtype).removeprefix("torch."),
           "floor_ms": floor_ms(4.0 * batch * rows * keys * HEADS * HEAD_DIM, nbytes, ceilings)}
    for peer, fn in {"visattn": row_scores, "eager": _eager}.items():
        out = fn(*args)
        row[peer] = {"gpu_ms": median_ms(lambda: fn(*args), iters=50), "host_ms": _host_ms(lambda: fn(*args)),
                     "rel_err": float((out.double() - want).abs().max() / want.abs().max())}
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-rowscore", description=__doc__)
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("visattn bench-rowscore needs a CUDA GPU")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ceilings = device_ceilings()
    rows = [run_problem(p, dtype, ceilings) for p in PROBLEMS]
    path = save_result("rowscore", {"ceilings": ceilings, "rows": rows}, args.out)
    print(f"{'problem':26s} {'peer':8s} {'gpu ms':>8s} {'host ms':>8s} {'floor ms':>9s} {'err':>8s}")
    for row in rows:
        for peer in ("visattn", "eager"):
            r = row[peer]
            print(f"{row['problem']:26s} {peer:8s} {r['gpu_ms']:8.3f} {r['host_ms']:8.3f} {row['floor_ms']:9.4f} "
                  f"{r['rel_err']:8.1e}")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
