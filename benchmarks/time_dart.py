"""DART's selection (issue 24): the per-image loop (``select_hidden_per_image`` + ``DART.select_image``: host lists,
a Python set, one ``topk``/sort and ``tolist`` per pivot and image) against the batched form
(``select_hidden_batched`` + ``DART.select_images``: all images at once, one host readback), on bench-prune's
LLaVA-1.5-7B shapes: 35 + 576 image + 40 text tokens per sample, hidden 4096, fp16 hidden states, float32 key
norms, keep 64 and 128 of 576 with the official 4 + 4 pivots, batch 8 and 1, and a left-padded batch of 8 with
different text lengths.

Per configuration: CUDA-synchronised wall time of one selection call (median, min over the timed calls: the
selection is host-bound, so wall time is what TTFT pays), the host synchronisations of one call (counted with
``torch.cuda.set_sync_debug_mode``), and whether both forms keep the same tokens (keep mask, kept indices per
image, last kept column). Synthetic inputs (random norms and hidden states): the selection's cost does not depend
on the model's weights.

Usage (repo root, CUDA):
    python benchmarks/time_dart.py --out benchmarks/results/time-dart-h100.json
    python benchmarks/time_dart.py --tiny   (CPU dry run at toy sizes; writes only with --out)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from visattn import tokenprune as tp  # noqa: E402
from visattn.bench.common import save_result  # noqa: E402
from visattn.tokenprune.hf_llm import select_hidden_batched, select_hidden_per_image  # noqa: E402

PREFIX, SUFFIX = 35, 40


def layout(batch: int, image: int, suffixes: list[int], hidden: int, device: str, seed: int = 0) -> dict:
    """A left-padded LM layout of ``batch`` samples (``PREFIX`` text, one image of ``image`` tokens, ``suffixes[b]``
    text) with random key norms (B, L) and final-normed hidden states (B, L, hidden) in fp16 (fp32 on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    lens = [PREFIX + image + s for s in suffixes]
    length = max(lens)
    ids = torch.full((batch, length), -1)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, length - n :] = True
        ids[b, length - n + PREFIX : length - n + PREFIX + image] = b
    dtype = torch.float16 if device == "cuda" else torch.float32
    return {"scores": (torch.rand(batch, length, generator=g) * 100).to(device),
            "normed": torch.randn(batch, length, hidden, generator=g).to(device, dtype),
            "image": ids.to(device), "valid": valid.to(device), "counts": [image] * batch,
            "spans": [[(0, 0)] for _ in range(batch)]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, iters: int) -> list[float]:
    """Wall times (ms) of ``iters`` calls, each CUDA-synchronised before and after, after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def host_syncs(fn, device: str) -> int | None:
    """Synchronising CUDA calls of one call of ``fn`` (``set_sync_debug_mode`` warnings); None on the CPU."""
    if device != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def same(a: tuple, b: tuple) -> bool:
    """Both selections keep the same tokens: keep mask, kept indices of every image, last kept column."""
    return (torch.equal(a[0], b[0]) and len(a[1]) == len(b[1])
            and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a[1], b[1], strict=True))
            and torch.equal(a[2].cpu(), b[2].cpu()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="result file (default on CUDA: benchmarks/results/"
                        "time-dart-<date>.json; --tiny writes only with --out)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run at toy sizes")
    parser.add_argument("--time-budget", type=float, default=50.0, help="seconds; later configs are skipped")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per form and configuration")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    image, hidden, iters = (16, 64, 3) if args.tiny else (576, 4096, args.iters)
    keeps = (4, 8) if args.tiny else (64, 128)
    shapes = [("b8", 8, [SUFFIX] * 8), ("b1", 1, [SUFFIX]),
              ("b8-padded", 8, [SUFFIX - 5 * b for b in range(8)])]
    started = time.perf_counter()
    rows, skipped = [], []
    for name, batch, suffixes in shapes:
        inputs = layout(batch, image, suffixes, hidden, device)
        for keep in keeps:
            if time.perf_counter() - started > args.time_budget:
                skipped.append({"shape": name, "keep": keep, "reason": "time budget"})
                continue
            pruner = tp.DART(layer=2, keep=keep)
            per_image = lambda p=pruner, x=inputs: select_hidden_per_image(  # noqa: E731
                p, 0, x["scores"], x["normed"], x["image"], x["valid"], x["spans"])
            batched = lambda p=pruner, x=inputs: select_hidden_batched(  # noqa: E731
                p, 0, x["scores"], x["normed"], x["image"], x["valid"], x["counts"])
            old_t, new_t = time_call(per_image, device, iters), time_call(batched, device, iters)
            old, new = per_image(), batched()
            row = {"shape": name, "batch": batch, "suffixes": suffixes, "image_tokens": image, "hidden": hidden,
                   "keep": keep, "kept_per_image": [int(x.shape[0]) for x in new[1]],
                   "per_image_ms": statistics.median(old_t), "per_image_min_ms": min(old_t),
                   "batched_ms": statistics.median(new_t), "batched_min_ms": min(new_t),
                   "per_image_syncs": host_syncs(per_image, device), "batched_syncs": host_syncs(batched, device),
                   "equal": same(old, new)}
            row["speedup"] = row["per_image_ms"] / row["batched_ms"]
            rows.append(row)
            print(f"{name:10s} keep={keep:4d}  per-image {row['per_image_ms']:8.3f} ms ({row['per_image_syncs']} "
                  f"syncs)  batched {row['batched_ms']:7.3f} ms ({row['batched_syncs']} syncs)  "
                  f"x{row['speedup']:.1f}  equal={row['equal']}", flush=True)
    payload = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "iters": iters,
               "timer": "perf_counter, CUDA-synchronised", "rows": rows, "skipped": skipped,
               "wall_s": time.perf_counter() - started}
    if args.out or not args.tiny:
        print(f"wrote {save_result('time-dart', payload, args.out)}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
