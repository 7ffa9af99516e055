"""timm's own MaxViT and HaloNet models, stock vs patched in place by ``visattn.models.patch_timm``, and their
attention-free floor (issue #22).

For each model and mode (eager inference, eager train step, and with ``--compile`` the same two under
``torch.compile``) three forms run in one process on the same weights and inputs: ``stock`` (timm's own
partition + SDPA / unfold + matmul path), ``visattn`` (``patch_timm``: one ``window_attention`` / dilated ``na2d``
/ ``halo_attention`` call per attention), and ``floor`` (the patched model with every attention core replaced by
its value tensor, every projection, convolution, norm and MLP kept): no attention kernel can make the model
faster than the floor, so ``stock / floor`` is the Amdahl bound of any attention speed-up. Steps are CUDA-event
medians after warm-up; bf16 autocast, channels-last, batch 256 (halved on out-of-memory), each model at its
default input size. The forms are interleaved over ``--rounds`` rounds and the median round is kept.

Usage (repo root, CUDA):
  python benchmarks/bench_timm_inplace.py --out benchmarks/results/timm-inplace-h100-DATE.json [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402
from bench_backbones import make_step  # noqa: E402

from visattn import functional  # noqa: E402
from visattn.bench.common import environment, median_ms, strict  # noqa: E402
from visattn.models import patch_timm  # noqa: E402

MODELS = ("maxvit_tiny_tf_224", "maxvit_rmlp_tiny_rw_256", "halonet26t", "sehalonet33ts")
FORMS = ("stock", "visattn", "floor")


@contextlib.contextmanager
def floor_attention():
    """Every attention core the patches call returns its value tensor (at the query's resolution for HaloNet's
    strided queries): the model without attention, everything else kept."""
    saved = functional.window_attention, functional.na2d, functional.halo_attention

    def halo_floor(q, k, v, block_size, halo_size, *args, **kwargs):
        step = (v.shape[1] // q.shape[1], v.shape[2] // q.shape[2])
        return v[:, ::step[0], ::step[1]]

    functional.window_attention = lambda q, k, v, *args, **kwargs: v
    functional.na2d = lambda q, k, v, *args, **kwargs: v
    functional.halo_attention = halo_floor
    try:
        yield
    finally:
        functional.window_attention, functional.na2d, functional.halo_attention = saved


def build(name: str, form: str) -> tuple[torch.nn.Module, dict]:
    """The model on CUDA, channels-last, and what ``patch_timm`` patched (empty for ``stock``)."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    report = {}
    if form != "stock":
        rep = patch_timm(model)
        report = {"patched": dict(rep.patched), "skipped": dict(rep.skipped)}
    return model.cuda().to(memory_format=torch.channels_last), report


def time_form(name, form, mode, compiled, batch, size, warmup, iters) -> dict:
    """Median step of one form, decaying the batch on out-of-memory."""
    while True:
        try:
            model, report = build(name, form)
            ctx = floor_attention() if form == "floor" else contextlib.nullcontext()
            with ctx:
                step = make_step(model, batch, mode, size=size, compiled=compiled)
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                ms = median_ms(step, iters=iters, warmup=warmup)
            peak = torch.cuda.max_memory_allocated() / 2**30
            del model, step
            torch.cuda.empty_cache()
            return dict(ms=ms, batch=batch, first_call_s=first_s, peak_gib=peak, **report)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch <= 8:
                raise
            batch //= 2


def run(args) -> list[dict]:
    start = time.perf_counter()
    rows = []
    modes = [(m, False) for m in ("infer", "train")] + ([(m, True) for m in ("infer", "train")] if args.compile else [])
    for name in args.models:
        size = timm.models.get_pretrained_cfg_value(name, "input_size")[-1]  # no model built to read it
        for mode, compiled in modes:
            if time.perf_counter() - start > args.time_budget:
                rows.append(dict(model=name, mode=mode, compiled=compiled, skipped="time budget"))
                continue
            forms = FORMS if not compiled else ("stock", "visattn")
            rounds: dict[str, list[dict]] = {f: [] for f in forms}
            batch = args.batch
            for _ in range(args.rounds if not compiled else 1):
                for form in forms:
                    r = time_form(name, form, mode, compiled, batch, size, args.warmup, args.iters)
                    batch = min(batch, r["batch"])
                    rounds[form].append(r)
            row = dict(model=name, img_size=size, mode=mode, compiled=compiled, batch=batch)
            for form, rs in rounds.items():
                ms = statistics.median(r["ms"] for r in rs)
                row[form] = dict(ms=ms, img_per_s=batch * 1e3 / ms, round_ms=[r["ms"] for r in rs],
                                 peak_gib=max(r["peak_gib"] for r in rs), first_call_s=rs[0]["first_call_s"],
                                 **{k: rs[0][k] for k in ("patched", "skipped") if k in rs[0]})
            row["speedup"] = row["stock"]["ms"] / row["visattn"]["ms"]
            if "floor" in row:
                row["amdahl_bound"] = row["stock"]["ms"] / row["floor"]["ms"]
                row["attention_share_stock"] = 1 - row["floor"]["ms"] / row["stock"]["ms"]
            rows.append(row)
            print(f"{name:26s} {mode:5s} {'compiled' if compiled else 'eager':8s} b{batch}: stock "
                  f"{row['stock']['img_per_s']:8.0f} visattn {row['visattn']['img_per_s']:8.0f} img/s "
                  f"({row['speedup']:.2f}x)" + (f", floor {row['floor']['img_per_s']:8.0f} (bound "
                                                f"{row['amdahl_bound']:.2f}x)" if "floor" in row else ""),
                  flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved eager rounds (compiled: one)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd inference and train rows")
    parser.add_argument("--time-budget", type=float, default=400.0, help="start no new row after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_timm_inplace needs a CUDA GPU", file=sys.stderr)
        return 2
    result = dict(benchmark="timm-inplace", **environment("cuda"),
                  settings=dict(dtype="bf16 autocast", memory_format="channels_last", warmup=args.warmup,
                                iters=args.iters, rounds=args.rounds, timing="CUDA events, median"),
                  rows=run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(strict(result), indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
