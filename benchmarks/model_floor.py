"""Whole-model train throughput of NAT / DiNAT beside Swin, with the attention-free floor (issue #18's model targets).

Rows (model, form, mode), B256, bf16 autocast, channels-last, SGD step, CUDA-event median of whole train steps:

* form ``visattn``: the model as registered; ``floor``: every ``NeighborhoodAttention2D`` core replaced by a copy
  of its value tensor (same qkv/proj Linears, MLPs, norms, convolutions, and the attention output's write), so no
  attention kernel can make the model faster than its floor; ``stock``: timm's own model (Swin).
* mode ``eager``; ``compile`` (``torch.compile(model)``, default mode); ``reduce-overhead`` (CUDA graphs).

For every compiled row one profiled step gives the step's GPU time (against its wall time: host stalls), and
for visattn's models the GPU time of the attention kernels and their share of the step (target: at most 15%).
Each row is bounded by ``--time-budget`` so a long run still writes.

Usage (repo root, CUDA): python benchmarks/model_floor.py --out /tmp/out/floor.json
    [--rows nat_tiny:visattn:compile,nat_tiny:floor:compile,swin_tiny_patch4_window7_224:stock:compile]
    [--time-budget 500]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visattn.bench.common import environment, kernel_gpu_ms, median_ms, save_result  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backbones import make_step  # noqa: E402

SWIN = "swin_tiny_patch4_window7_224"
DEFAULT_ROWS = ",".join([
    f"{SWIN}:stock:eager", "nat_tiny:visattn:eager", "dinat_tiny:visattn:eager", "nat_tiny:floor:eager",
    f"{SWIN}:stock:compile", "nat_tiny:visattn:compile", "nat_tiny:floor:compile", "dinat_tiny:visattn:compile",
    "nat_tiny:visattn:reduce-overhead",
])
ATTENTION_KERNELS = ("_cell_", "_fwd_kernel", "_bwd_", "_delta_kernel", "_small", "_expand_", "_bias_grad")


def strip_attention(model: torch.nn.Module) -> int:
    """Replace every neighborhood-attention core by its value tensor (made contiguous, as the output write): the
    module's qkv Linear, the value slice of its output, its proj Linear and dropout. ``_attend`` is replaced, not
    ``_op``: modules hand the packed projection to ``functional._na_packed`` and never call ``_op`` then."""
    from visattn.nn.neighborhood import _NeighborhoodAttention

    def floor_attend(module, x, additional_keys=None, additional_values=None):
        qkv = module.qkv(x).view(*x.shape[:-1], 3, module.num_heads, module.head_dim)
        out = qkv[..., 2, :, :].contiguous()
        return module.proj_drop(module.proj(out.reshape(*x.shape[:-1], module.embed_dim)))

    count = 0
    for module in model.modules():
        if isinstance(module, _NeighborhoodAttention):
            module._attend = functools.partial(floor_attend, module)
            count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no NeighborhoodAttention module to strip")
    return count


def attention_share(step) -> dict:
    """GPU ms of one step: all kernels, visattn's attention kernels (the twelve largest by name), and the share
    (torch.profiler)."""
    total = attention = 0.0
    kernels: dict[str, float] = {}
    for name, ms in kernel_gpu_ms(step).items():
        total += ms
        if any(name.startswith(p) or p in name for p in ATTENTION_KERNELS):
            attention += ms
            kernels[name[:48]] = round(kernels.get(name[:48], 0.0) + ms, 3)
    return {"gpu_ms": round(total, 3), "attention_gpu_ms": round(attention, 3),
            "attention_share": round(attention / total, 4) if total else None,
            "attention_kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])}


def run_row(spec: str, batch: int, iters: int) -> dict:
    import timm

    import visattn.models  # noqa: F401  (registers nat_* / dinat_*)

    name, form, mode = spec.split(":")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000)
    row = {"model": name, "form": form, "mode": mode, "batch": batch}
    if form == "floor":
        row["stripped_modules"] = strip_attention(model)
    step = make_step(model, batch, "train", compiled=mode != "eager",
                     compile_mode="reduce-overhead" if mode == "reduce-overhead" else None)

    try:
        start = time.perf_counter()
        for _ in range(3):  # compile (both graphs) and warm-up
            step()
        torch.cuda.synchronize()
        row["compile_s"] = round(time.perf_counter() - start, 1)
        ms = median_ms(step, iters, warmup=2)
        row.update(train_ms=round(ms, 3), train_img_s=round(batch / ms * 1e3, 1))
        if mode != "eager":  # the stock rows too: their GPU time against their wall time shows host stalls
            row.update(attention_share(step))
    finally:  # a failed row must not leave its graphs (and their CUDA-graph pool) to the next one
        del step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of model:form:mode")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--time-budget", type=float, default=500, help="seconds; later rows are skipped")
    args = parser.parse_args(argv)
    deadline = time.time() + args.time_budget
    rows, skipped = [], []
    for spec in args.rows.split(","):
        if time.time() > deadline:
            skipped.append(spec)
            continue
        try:
            row = run_row(spec, args.batch, args.iters)
        except Exception as exc:  # noqa: BLE001  (a row that fails is reported, the rest still run)
            row = {"spec": spec, "error": f"{type(exc).__name__}: {exc}"[:400]}
        rows.append(row)
        print(row, flush=True)
        save_result("model-floor", {**environment(), "rows": rows, "skipped": skipped}, args.out)
    by = {(r.get("model"), r.get("form"), r.get("mode")): r for r in rows if "train_img_s" in r}
    print(f"{'model':12s} {'form':8s} {'mode':16s} {'img/s':>8s} {'attn share':>10s}")
    for (m, f, mode), r in by.items():
        print(f"{m:12s} {f:8s} {mode:16s} {r['train_img_s']:8.0f} {r.get('attention_share') or '':>10}")
    swin = {mode: r["train_img_s"] for (m, f, mode), r in by.items() if m.startswith("swin_tiny")}
    for (m, f, mode), r in by.items():
        if not m.startswith("swin_tiny") and mode in swin:
            print(f"{m} {f} {mode}: {r['train_img_s'] / swin[mode]:.3f}x swin_tiny {mode}")
    save_result("model-floor", {**environment(), "rows": rows, "skipped": skipped}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
