"""CUDA-event medians of CDPruner's and VisPruner's selection, eager loops vs the one-launch Triton kernels (issue 24).

Rows, at LLaVA-1.5 shapes (576 patches; random tensors: projector output width 4096 fp16 with a 20-token
instruction, CLIP features width 1024 fp16), for each batch (images) in ``--batches``:

* ``dpp``: ``selection.dpp_greedy_map`` on CDPruner's conditional kernel (given), k in ``--keeps``: ``eager`` (the
  PyTorch loop, ``backends.use_backend("reference")``) vs ``fused`` (the ``kernels.dpp`` launch); plus
  ``cdpruner_select``: the whole ``CDPruner.select`` (kernel build + selection), eager vs fused;
* ``dedup``: ``vispruner.remove_duplicates`` for ``keep`` k with important ratio 0.5 (residual 576 - k/2 tokens,
  target k/2): ``previous`` (the implementation before the kernel: per-step matmuls of the gathered tokens,
  transcribed here), ``eager`` (the loop on the one similarity matrix) and ``fused`` (one bmm + the
  ``kernels.dedup`` launch).

Each row records the median ms, the device activities one call issues (kernel launches, memsets and copies, from
``torch.profiler``) and whether the fused indices equal the eager ones (and the previous ones); ``--sweep`` also
times a few tile configurations of each kernel. Finishes in well under a minute on an H100.

Usage (repo root, CUDA): python benchmarks/time_scorers.py --out /tmp/out/scorers.json
    [--batches 8 1] [--keeps 64 128] [--iters 20] [--sweep] [--time-budget 50]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn import backends  # noqa: E402
from visattn.bench.common import median_ms, save_result  # noqa: E402
from visattn.tokenprune import kernels  # noqa: E402
from visattn.tokenprune.cdpruner import CDPruner, conditional_kernel  # noqa: E402
from visattn.tokenprune.selection import dpp_greedy_map  # noqa: E402
from visattn.tokenprune.vispruner import REMOVE_PER_STEP, remove_duplicates  # noqa: E402

PATCHES, LM_WIDTH, CLIP_WIDTH, TEXT = 576, 4096, 1024, 20
DEVICE = "cuda"
# tile configurations --sweep times; the defaults at 576 tokens are (1024, 8, 8, 1) and (64, 128, 8)
DPP_TILES = [(128, 32, 4, 1), (256, 32, 8, 1), (512, 16, 8, 1), (1024, 8, 8, 1), (1024, 8, 4, 1), (1024, 16, 8, 1),
             (1024, 8, 8, 3), (256, 32, 8, 3), (128, 32, 4, 3)]  # block_n, block_t, warps, pipeline stages
DEDUP_TILES = [(32, 128, 4), (16, 128, 4), (64, 64, 4), (64, 128, 8), (32, 256, 8), (128, 64, 8)]  # i, j, warps


def previous_remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """``remove_duplicates`` before the fused kernel: each step's similarities by a matmul of the gathered tokens."""
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True)
    while True:
        size = residual.shape[1]
        r = min(REMOVE_PER_STEP, size - target, (size + 1) // 2)
        if r <= 0:
            return residual
        tokens = f.gather(1, residual[..., None].expand(-1, -1, f.shape[-1]))
        a, b = tokens[:, ::2], tokens[:, 1::2]
        score = (a @ b.transpose(1, 2)).amax(-1)
        distinct = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], 1)


def eager(fn):
    """``fn`` on the eager ops (the tokenprune kernels off)."""
    def run():
        with backends.use_backend("reference", family="tokenprune"):
            return fn()
    return run


def device_activities(fn) -> int | None:
    """Kernel launches (and memsets / copies) one call of ``fn`` puts on the GPU, from ``torch.profiler``."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a profiler that cannot run here: the timings still stand
        return None


def measure(fn, iters: int) -> dict:
    return {"ms": round(median_ms(fn, iters=iters, warmup=3), 4), "launches": device_activities(fn)}


def dpp_rows(batch: int, keep: int, iters: int, sweep: bool) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 1000 + keep)
    visual = torch.randn(batch, PATCHES, LM_WIDTH, device=DEVICE, dtype=torch.float16, generator=gen)
    text = torch.randn(batch, TEXT, LM_WIDTH, device=DEVICE, dtype=torch.float16, generator=gen)
    text_ok = torch.ones(batch, TEXT, dtype=torch.bool, device=DEVICE)
    kernel = conditional_kernel(visual, text, text_ok)
    want = eager(lambda: dpp_greedy_map(kernel, keep))()
    got = dpp_greedy_map(kernel, keep)
    row = {"op": "dpp", "batch": batch, "keep": keep, "eager": measure(eager(lambda: dpp_greedy_map(kernel, keep)),
                                                                       iters),
           "fused": measure(lambda: dpp_greedy_map(kernel, keep), iters),
           "equal": bool(torch.equal(got, want)), "rows_differing": int((got != want).any(-1).sum())}
    if sweep:
        row["tiles"] = []
        for bn, bt, warps, stages in DPP_TILES:
            call = functools.partial(kernels.dpp_picks, kernel, keep, block_n=bn, block_t=bt, num_warps=warps,
                                     num_stages=stages)
            same = bool(torch.equal(call().sort(-1).values, want))
            row["tiles"].append({"block_n": bn, "block_t": bt, "num_warps": warps, "num_stages": stages, "equal": same,
                                 "ms": round(median_ms(call, iters=iters, warmup=3), 4)})
    pruner = CDPruner(keep=keep)
    select = {"op": "cdpruner_select", "batch": batch, "keep": keep,
              "eager": measure(eager(lambda: pruner.select(visual, text, text_ok)), iters),
              "fused": measure(lambda: pruner.select(visual, text, text_ok), iters)}
    return [row, select]


def dedup_rows(batch: int, keep: int, iters: int, sweep: bool) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(batch * 1000 + keep + 1)
    feats = torch.randn(batch, PATCHES, CLIP_WIDTH, device=DEVICE, dtype=torch.float16, generator=gen)
    order = torch.rand(batch, PATCHES, device=DEVICE, generator=gen).argsort(-1)
    important = int(keep * 0.5)
    residual, target = order[:, important:], keep - important
    want = eager(lambda: remove_duplicates(feats, residual, target))()
    got = remove_duplicates(feats, residual, target)
    before = previous_remove_duplicates(feats, residual, target)
    row = {"op": "dedup", "batch": batch, "keep": keep, "residual": residual.shape[1], "target": target,
           "previous": measure(lambda: previous_remove_duplicates(feats, residual, target), iters),
           "eager": measure(eager(lambda: remove_duplicates(feats, residual, target)), iters),
           "fused": measure(lambda: remove_duplicates(feats, residual, target), iters),
           "equal": bool(torch.equal(got, want)), "equal_previous": bool(torch.equal(got, before)),
           "rows_differing": int((got != want).any(-1).sum())}
    if sweep:
        f = feats.float().gather(1, residual[..., None].expand(-1, -1, CLIP_WIDTH))
        f = f / f.norm(dim=-1, keepdim=True)
        sim = f @ f.transpose(1, 2)
        row["tiles"] = []
        for bi, bj, warps in DEDUP_TILES:
            call = functools.partial(kernels.dedup_positions, sim, target, REMOVE_PER_STEP, block_i=bi, block_j=bj,
                                     num_warps=warps)
            same = bool(torch.equal(residual.gather(1, call()), want))
            row["tiles"].append({"block_i": bi, "block_j": bj, "num_warps": warps, "equal": same,
                                 "ms": round(median_ms(call, iters=iters, warmup=3), 4)})
    return [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 1], help="images per call")
    parser.add_argument("--keeps", type=int, nargs="+", default=[64, 128], help="tokens kept per image")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per median")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configurations of each kernel")
    parser.add_argument("--time-budget", type=float, default=50, help="seconds; later rows are skipped")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/time-scorers-DATE.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/time_scorers.py needs a CUDA GPU (none is visible here)", file=sys.stderr)
        return 2
    for name, why in (("dpp", kernels.dpp_why_not(torch.empty(1, 1, 1, device=DEVICE))),
                      ("dedup", kernels.dedup_why_not(torch.empty(1, 1, 1, device=DEVICE)))):
        if why is not None:
            print(f"the {name} kernel cannot run here: {why}", file=sys.stderr)
            return 2
    deadline = time.time() + args.time_budget
    rows, skipped = [], []
    for batch in args.batches:
        for keep in args.keeps:
            for op, make in (("dpp", dpp_rows), ("dedup", dedup_rows)):
                if time.time() > deadline:
                    skipped.append({"op": op, "batch": batch, "keep": keep})
                    continue
                for row in make(batch, keep, args.iters, args.sweep):
                    rows.append(row)
                    timings = "  ".join(f"{k} {row[k]['ms']:.3f} ms / {row[k]['launches']} launches"
                                        for k in ("previous", "eager", "fused") if k in row)
                    print(f"{row['op']:16s} B{batch} keep {keep}: {timings}  equal {row.get('equal', '-')}",
                          flush=True)
    path = save_result("time-scorers", {"patches": PATCHES, "lm_width": LM_WIDTH, "clip_width": CLIP_WIDTH,
                                        "text_tokens": TEXT, "rows": rows, "skipped": skipped}, args.out)
    print(f"wrote {path}")
    return 0 if all(row.get("equal", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
