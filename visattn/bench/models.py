"""``visattn bench``: images/sec of whole timm models, visattn's attention path against the stock one.

Each row times a forward pass (inference, no grad) with CUDA events after warm-up, median of many runs, over a
rotation of fresh random batches, and checks the two paths' logits agree. Peers run in the same process.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Optional

import torch

from visattn.bench.timing import median_ms, save_result

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _median_ms(run: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], iters: int) -> float:
    """Median ms of ``run`` over a rotation of batches (each warm-up call sees every batch once)."""
    calls = iter(range(10**9))
    return median_ms(lambda: run(batches[next(calls) % len(batches)]), iters=iters, warmup=len(batches))


def _swin_pair(name: str):
    """(stock model, visattn model) for a timm Swin: the same weights, one patched."""
    import copy

    import timm

    from visattn.models.swin_patch import patch_swin

    stock = timm.create_model(name, pretrained=False)
    return stock, patch_swin(copy.deepcopy(stock))


def _visattn_model(name: str):
    import timm

    import visattn  # noqa: F401  (registers the visattn families)

    return None, timm.create_model(name, pretrained=False)


PAIRS = {"swin_tiny_patch4_window7_224": _swin_pair, "nat_tiny": _visattn_model, "dinat_tiny": _visattn_model}


def bench_model(name: str, batch: int, dtype: torch.dtype, iters: int) -> dict:
    stock, ours = PAIRS[name](name)
    size = (ours.pretrained_cfg or {}).get("input_size", (3, 224, 224))
    batches = [torch.randn(batch, *size, device="cuda", dtype=dtype) for _ in range(3)]
    row = {"model": name, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "input_size": list(size)}
    with torch.no_grad():
        ours = ours.cuda().to(dtype).eval()
        row["visattn_ms"] = _median_ms(ours, batches, iters)
        row["visattn_img_s"] = batch / row["visattn_ms"] * 1e3
        if stock is not None:
            stock = stock.cuda().to(dtype).eval()
            row["stock_ms"] = _median_ms(stock, batches, iters)
            row["stock_img_s"] = batch / row["stock_ms"] * 1e3
            row["speedup"] = row["stock_ms"] / row["visattn_ms"]
            a, b = stock(batches[0]).float(), ours(batches[0]).float()
            row["logit_rel_err"] = float((a - b).norm() / a.norm())
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/models-<date>.json)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("visattn bench needs a CUDA GPU (images/sec on CPU would say nothing about the kernels)")
        return 2
    import timm

    rows = []
    for name in args.models:
        try:
            rows.append(bench_model(name, args.batch, DTYPES[args.dtype], args.iters))
        except Exception as err:  # one broken model must not hide the others' numbers
            rows.append({"model": name, "error": f"{type(err).__name__}: {err}"})
        print(json.dumps(rows[-1]))
    out = save_result("models", {"timm": timm.__version__, "rows": rows}, args.out)
    print(f"\n{'model':32s} {'batch':>5s} {'stock img/s':>12s} {'visattn img/s':>14s} {'speedup':>8s} {'rel err':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:32s} error: {r['error']}")
            continue
        print(f"{r['model']:32s} {r['batch']:5d} {r.get('stock_img_s', float('nan')):12.0f} "
              f"{r['visattn_img_s']:14.0f} {r.get('speedup', float('nan')):8.2f} {r.get('logit_rel_err', 0):9.1e}")
    print(f"saved {out}")
    return 1 if any("error" in r for r in rows) else 0
