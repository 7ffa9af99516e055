"""``visattn bench-prune-kernels``: the LLM-stage pruning kernels vs the eager ops they replace.

* ``rowscore`` (visattn.tokenprune.kernels.rowscore): the scoring calls of the ``bench-prune`` workloads on the
  LLaVA-1.5-7B text model (32 heads, head dim 128, fp16): FastV / PyramidDrop (one query row) at batch 1 and 8 and
  on the 2,955-token NeXT shape, and SparseVLM's text raters (16 rows). Floor: raw keys and rotary tables read once.
  Error: against a float64 computation.
* ``select`` (visattn.tokenprune.kernels.select): the per-image top-k of a PyramidDrop stage (keep 288 of 576) at
  the same shapes. Floor: scores, image ids and mask read once, keep mask written. Error: kept-token mismatches.
* ``recycle`` (visattn.tokenprune.kernels.recycle): SparseVLM's first-stage recycling with 64 kept tokens (66 of
  576 kept: the best 154 deleted tokens clustered into 16) per image, LLaVA-1.5 b8 and NeXT b1 (5 images). Peer:
  the eager gather + DPC-KNN (batched over images). Floor: the picked hidden states read once and the Gram FLOPs.

Per row and peer: GPU time (CUDA-event median) and host wall time of one synchronised call (what a launch-bound
prefill pays).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from visattn.bench.common import device_ceilings, floor_ms, median_ms, save_result, short_dtype

# (name, batch, query rows, keys); select rows use batch and keys
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
    from visattn.tokenprune.scoring import eager_row_probs

    probs = eager_row_probs(q, k, cos, sin, rows, valid, scale).mean(1)
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
    from visattn.tokenprune.kernels.rowscore import row_scores

    name, batch, rows, keys = problem
    args = _inputs(batch, rows, keys, dtype)
    q64 = [a.double() if a.is_floating_point() else a for a in args[:-1]] + [args[-1]]
    want = _eager(*q64)
    nbytes = batch * keys * HEADS * HEAD_DIM * 2 + 2 * keys * HEAD_DIM * 2
    row = {"problem": name, "batch": batch, "rows": rows, "keys": keys, "dtype": str(dtype).removeprefix("torch."),
           "floor_ms": floor_ms(4.0 * batch * rows * keys * HEADS * HEAD_DIM, nbytes, ceilings)}
    for peer, fn in {"visattn": row_scores, "eager": _eager}.items():
        out = fn(*args)
        row[peer] = {"gpu_ms": median_ms(lambda fn=fn: fn(*args), iters=50),
                     "host_ms": _host_ms(lambda fn=fn: fn(*args)),
                     "rel_err": float((out.double() - want).abs().max() / want.abs().max())}
    return row


def run_select(problem, ceilings) -> dict:
    """PyramidDrop's first stage (288 of 576 per image, 5 images per row for the NeXT shape): kernel vs eager."""
    from visattn.tokenprune.kernels.select import topk_per_image
    from visattn.tokenprune.layout import select_per_image
    from visattn.tokenprune.selection import topk_in_order

    name, batch, _, keys = problem
    images = 5 if keys > 1000 else 1
    g = torch.Generator(device="cuda").manual_seed(1)
    scores = torch.rand(batch, keys, device="cuda", generator=g)
    image = torch.full((batch, keys), -1, dtype=torch.long, device="cuda")
    for i in range(images):
        image[:, 35 + 576 * i : 35 + 576 * (i + 1)] = torch.arange(batch, device="cuda")[:, None] * images + i
    valid = torch.ones(batch, keys, dtype=torch.bool, device="cuda")
    n = batch * images
    flat = scores.flatten()
    peers = {
        "visattn": lambda: topk_per_image(scores, image, valid, [288] * n, [images] * batch),
        "eager": lambda: select_per_image(image, valid, [576] * n, [576] * n,
                                          lambda j, x: topk_in_order(flat[x], 288)),
    }
    nbytes = batch * keys * (4 + 8 + 1 + 1)
    row = {"problem": f"select: {name.split(',')[0]}, 288/576", "batch": batch, "keys": keys,
           "floor_ms": floor_ms(0.0, nbytes, ceilings)}
    want = peers["eager"]()[0]
    for peer, fn in peers.items():
        row[peer] = {"gpu_ms": median_ms(fn, iters=50), "host_ms": _host_ms(fn),
                     "rel_err": float((fn()[0] != want).sum())}
    return row


def run_recycle(problem, ceilings) -> dict:
    from visattn.tokenprune.kernels.recycle import recycle_tokens
    from visattn.tokenprune.sparsevlm import SparseVLM

    name, batch, _, keys = problem
    images = 5 if keys > 1000 else 1
    g = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(batch, keys, HEADS * HEAD_DIM, device="cuda", generator=g).half()
    scores = torch.rand(batch, keys, device="cuda", generator=g)
    image = torch.full((batch, keys), -1, dtype=torch.long, device="cuda")
    keep = torch.ones(batch, keys, dtype=torch.bool, device="cuda")
    for i in range(images):
        sl = slice(35 + 576 * i, 35 + 576 * (i + 1))
        image[:, sl] = torch.arange(batch, device="cuda")[:, None] * images + i
        keep[:, sl] = torch.rand(batch, 576, device="cuda", generator=g).argsort(1) < 66  # 66 kept per image
    valid = torch.ones(batch, keys, dtype=torch.bool, device="cuda")
    n, pruner, removed = batch * images, SparseVLM(), 576 - 66
    picks, made = [pruner.recycle_pick(removed)] * n, [pruner.recycled_count(removed)] * n
    rows = [j // images for j in range(n)]
    gone = torch.stack([((image == j) & ~keep).flatten().nonzero().flatten() for j in range(n)])  # (n, removed)
    flat_h, flat_s = hidden.flatten(0, 1), scores.flatten()

    def eager():  # the adapter's eager path: all images (same deleted count) in one batched call
        return pruner.recycled(flat_h[gone], flat_s[gone]).flatten(0, 1)

    peers = {
        "visattn": lambda: recycle_tokens(hidden, scores, image, valid, keep, rows, picks, made),
        "eager": eager,
    }
    nbytes = sum(picks) * hidden.shape[-1] * 2
    flops = sum(2 * p * p * hidden.shape[-1] for p in picks)
    row = {"problem": f"recycle: {name.split(',')[0]}, 66/576 kept", "batch": batch, "keys": keys,
           "floor_ms": floor_ms(flops, nbytes, ceilings)}
    want = eager().float()
    for peer, fn in peers.items():
        out = fn()
        row[peer] = {"gpu_ms": median_ms(fn, iters=30), "host_ms": _host_ms(fn, iters=30),
                     "rel_err": float((out.float() - want).abs().max() / want.abs().max())}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-prune-kernels", description=__doc__)
    parser.add_argument("--dtype", default="fp16", type=short_dtype, choices=["fp16", "bf16"],
                        help="data type (float16 / bfloat16 are accepted too)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("visattn bench-prune-kernels needs a CUDA GPU")
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ceilings = device_ceilings()
    rows = [run_problem(p, dtype, ceilings) for p in PROBLEMS]
    rows += [run_select(p, ceilings) for p in PROBLEMS if p[2] == 1]
    rows += [run_recycle(p, ceilings) for p in PROBLEMS if p[2] == 1 and p[1] * p[3] > 1000]
    path = save_result("prune-kernels", {"ceilings": ceilings, "rows": rows}, args.out)
    print(f"{'problem':34s} {'peer':8s} {'gpu ms':>8s} {'host ms':>8s} {'floor ms':>9s} {'err':>8s}")
    for row in rows:
        for peer in ("visattn", "eager"):
            r = row[peer]
            print(f"{row['problem']:34s} {peer:8s} {r['gpu_ms']:8.3f} {r['host_ms']:8.3f} {row['floor_ms']:9.4f} "
                  f"{r['rel_err']:8.1e}")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
