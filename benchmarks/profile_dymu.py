"""Where DyMU's prefill time goes on bench-prune's LLaVA-1.5-7B shapes (issue 24: TTFT 1201 ms at batch 8, keep 64,
of which 833 ms in the language model, against 171 ms unpruned; 780 ms against 33 ms at batch 1).

Usage (repo root, CUDA):
    python benchmarks/profile_dymu.py --out benchmarks/results/profile-dymu-h100.json
    python benchmarks/profile_dymu.py --batch 1 --keep 64
    python benchmarks/profile_dymu.py --tiny   (CPU dry run on the tiny model; writes only with --out)

The bench row's model and inputs (:func:`visattn.bench.prune.build_model`, ``make_inputs``) and its DyMU
(:func:`~visattn.bench.prune.dymu_for`: thresholds found by DToMe on the row's own images, so every layer has a
pair of tokens exactly at its threshold). Per variant, ``--calls`` prefills (the bench's call, after two warm-up
calls), each CUDA-synchronised: total, vision tower and language-model time (hooks), the tower's token count after
every layer and the language model's input length **of every call** (``shapes_vary``: whether they change from
call to call, which would defeat every shape-keyed cache: cuDNN attention graphs, cuBLAS heuristics), and whether
the language model's input is finite. Variants:

* ``none``: unpruned;
* ``dymu``: the bench row (the merge adds into its partners with a one-hot matmul on CUDA: deterministic);
* ``dymu-scatter``: the same with ``scatter_reduce`` (CUDA atomics: the summation order changes per call);
* ``dymu-scatter-no-cudnn``: ``dymu-scatter`` with cuDNN attention excluded from SDPA (flash, efficient, math);
* ``dymu-other-thresholds``: thresholds found on other images (no pair sits exactly at a threshold);
* ``dymu-virtual``: ``unmerge="virtual"`` (VTU: the language model attends as over the full sequence).

Then ``torch.profiler`` of one call of ``dymu-scatter`` and of ``dymu``: the top CUDA kernels and CPU ops by self
time (printed, and in the result file).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from visattn import tokenprune as tp  # noqa: E402
from visattn.bench import prune as bench  # noqa: E402
from visattn.bench.common import save_result  # noqa: E402
from visattn.tokenprune import tome  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Probe:
    """Hooks timing the vision tower and the language model of each prefill and recording the language model's
    input length and finiteness (registered after the pruner's, so the input is the pruned one)."""

    def __init__(self, model, device: str):
        self.device, self.calls, self.now = device, [], {}
        core = model.model
        self.handles = [core.vision_tower.register_forward_pre_hook(self._start("tower")),
                        core.vision_tower.register_forward_hook(self._stop("tower")),
                        core.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
                        core.language_model.register_forward_hook(self._stop("lm"))]

    def _start(self, name):
        def hook(*args):
            _sync(self.device)
            self.now[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(*args, **kwargs):
            _sync(self.device)
            self.now[f"{name}_ms"] = (time.perf_counter() - self.now.pop(name)) * 1e3
        return hook

    def _lm_pre(self, module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None:
            self.now.update(lm_len=emb.shape[1], lm_finite=bool(emb.isfinite().all()))
        self._start("lm")()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_variant(model, inputs, pruner, device: str, calls: int, sdpa_backends=None) -> dict:
    """``calls`` timed prefills (after two warm-ups) with ``pruner`` attached (None: unpruned)."""
    ctx = contextlib.nullcontext()
    if sdpa_backends is not None:
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel(sdpa_backends)
    if pruner is not None:
        tp.apply(model, pruner)
    probe = Probe(model, device)
    rows = []
    try:
        with torch.no_grad(), ctx:
            for i in range(calls + 2):
                probe.now = {}
                _sync(device)
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(device)
                if i < 2:
                    continue
                row = {"total_ms": (time.perf_counter() - t0) * 1e3, **probe.now}
                adapter = getattr(model, "_visattn_tokenprune", None)
                rep = getattr(getattr(adapter, "tome", None), "last_report", None)
                if rep is not None:
                    row["tower_widths"] = list(rep.extra["tokens_per_layer"])
                    row["kept"] = list(rep.visual_tokens_kept)
                rows.append(row)
    finally:
        probe.remove()
        if pruner is not None:
            tp.remove(model)
    shapes = {(r.get("lm_len"), tuple(r.get("tower_widths", ()))) for r in rows}
    med = lambda key: statistics.median(r[key] for r in rows) if all(key in r for r in rows) else None  # noqa: E731
    return {"calls": rows, "total_ms": med("total_ms"), "tower_ms": med("tower_ms"), "lm_ms": med("lm_ms"),
            "shapes_vary": len(shapes) > 1, "distinct_shapes": len(shapes),
            "lm_finite": all(r.get("lm_finite", True) for r in rows)}


def profile_call(model, inputs, pruner, device: str, top: int = 15) -> dict:
    """Top CUDA kernels and CPU ops (self time) of one prefill with ``pruner``, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            with profile(activities=activities) as prof:
                model(**inputs, use_cache=True, logits_to_keep=1)
                _sync(device)
    finally:
        tp.remove(model)
    events = prof.key_averages()
    cuda_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"

    def rows(key):
        ranked = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
        return [{"name": e.key, "self_ms": getattr(e, key, 0.0) / 1e3, "count": e.count} for e in ranked]

    return {"cpu": rows("self_cpu_time_total"), "cuda": rows(cuda_key) if device == "cuda" else []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--keep", type=int, default=64, help="DyMU's target tokens per 576-token image (dymu_for)")
    parser.add_argument("--calls", type=int, default=5, help="timed prefills per variant")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny model")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds; later variants are skipped")
    parser.add_argument("--out", default=None, help="result file (default on CUDA: benchmarks/results/"
                        "profile-dymu-<date>.json; --tiny writes only with --out)")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    model = bench.build_model(args.tiny, device, dtype)
    vis = model.config.vision_config
    per_image = (vis.image_size // vis.patch_size) ** 2
    keep = max(1, round(args.keep * per_image / 576))
    batch = 2 if args.tiny else args.batch
    inputs = bench.make_inputs(model, batch, 1, device, dtype)
    other = bench.make_inputs(model, batch, 1, device, dtype, seed=1)
    dymu = bench.dymu_for(model, inputs["pixel_values"], keep, per_image)
    merge = tome.merge_dynamic
    scatter = lambda x, m, reduce="sum", deterministic=None: merge(x, m, reduce, False)  # noqa: E731
    no_cudnn = None
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    variants = [("none", None, False, None), ("dymu", dymu, False, None), ("dymu-scatter", dymu, True, None),
                ("dymu-scatter-no-cudnn", dymu, True, no_cudnn),
                ("dymu-other-thresholds", bench.dymu_for(model, other["pixel_values"], keep, per_image), False, None),
                ("dymu-virtual", tp.DyMU(thresholds=dymu.thresholds, unmerge="virtual"), False, None)]
    results, skipped = {}, []
    for name, pruner, use_scatter, backends in variants:
        if name == "dymu-scatter-no-cudnn" and backends is None:
            continue
        if time.perf_counter() - started > args.time_budget:
            skipped.append(name)
            continue
        tome.merge_dynamic = scatter if use_scatter else merge
        try:
            results[name] = run_variant(model, inputs, pruner, device, args.calls, backends)
        finally:
            tome.merge_dynamic = merge
        r = results[name]
        print(f"{name:24s} total {r['total_ms']:9.2f} ms  tower {r['tower_ms']:8.2f}  lm {r['lm_ms']:8.2f}  "
              f"shapes vary: {r['shapes_vary']} ({r['distinct_shapes']} distinct)  finite: {r['lm_finite']}",
              flush=True)
    profiles = {}
    for name, use_scatter in (("dymu-scatter", True), ("dymu", False)):
        if time.perf_counter() - started > args.time_budget:
            skipped.append(f"profile {name}")
            continue
        tome.merge_dynamic = scatter if use_scatter else merge
        try:
            profiles[name] = profile_call(model, inputs, dymu, device)
        finally:
            tome.merge_dynamic = merge
        for kind in ("cuda", "cpu"):
            for row in profiles[name][kind][:8]:
                print(f"  {name} {kind:4s} {row['self_ms']:9.3f} ms  x{row['count']:<5d} {row['name'][:90]}")
    payload = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": batch,
               "keep": keep, "thresholds": dymu.thresholds, "variants": results, "profiles": profiles,
               "skipped": skipped, "wall_s": time.perf_counter() - started}
    if args.out or not args.tiny:
        print(f"wrote {save_result('profile-dymu', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
