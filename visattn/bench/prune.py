"""``visattn bench-prune``: token pruning on LLaVA-shaped models with random weights (no downloads).

Models: a LLaVA-1.5-7B-architecture model (Llama-7B text config, CLIP ViT-L/14 at 336 px, 2-layer MLP projector,
576 visual tokens per image) and a LLaVA-NeXT-shaped workload (the same model fed 5 crops per sample, 2880 visual
tokens). fp16, ``attn_implementation="sdpa"``. Per configuration: time to first token (vision tower + scoring +
LLM prefill), LLM prefill time alone, prefill tokens/s (prompt tokens before pruning / TTFT), decode tokens/s,
peak memory, scoring time (CUDA events around the scorer) and its share of the pruned TTFT.
``--tiny`` runs tiny configs on the CPU (smoke test).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch

PREFIX, SUFFIX, IMAGE_TOKEN = 35, 40, 32000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny random configs on CPU (smoke test)")
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--methods", default=None, help="comma list (default: all); an LLM-side method with "
                        "'+eager' (e.g. pdrop+eager) scores with eager ops instead of the fused kernel")
    parser.add_argument("--keeps", default=None, help="comma list of kept tokens per 576-token image")
    parser.add_argument("--batches", default=None, help="comma list of batch sizes for LLaVA-1.5")
    parser.add_argument("--next-batches", default=None, help="comma list of batch sizes for the NeXT shape")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the grid, interleaved; report median rounds")
    parser.add_argument("--time-budget", type=float, default=450.0, help="seconds; later configs are skipped")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--doc", default="docs/PRUNE_PERF.md")


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """Random-weight LLaVA-1.5-7B architecture (or a tiny one), SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=56, patch_size=14)
    else:
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def make_inputs(model, batch: int, images: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    cfg = model.config.vision_config
    per_image = (cfg.image_size // cfg.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(100, 30000, (batch, n), generator=g)  # noqa: E731
    ids = torch.cat([text(PREFIX), torch.full((batch, per_image * images), IMAGE_TOKEN), text(SUFFIX)], 1)
    px = torch.randn(batch * images, 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": px.to(device, dtype)}


def pruner_for(name: str, keep: int, per_image: int, llm_layers: int = 32):
    from visattn import tokenprune as tp

    if name == "pdrop":
        return tp.PyramidDrop() if llm_layers > 24 else tp.PyramidDrop(layers=[1, 2, 3])
    if name == "visionzip":
        return tp.create("visionzip", keep=keep)
    if name == "vtc-cls":
        return tp.VTCCLS(keep=keep, start_layer=12 if per_image > 100 else 1)
    if name == "fastv":
        return tp.FastV(layer=2, keep=keep)
    return tp.create(name, keep=keep)


class _Clock:
    """Wall time of a callable, CUDA-synchronised."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3


def _lm_timer(model):
    """Hooks that time the language model's prefill calls (ms) into a list."""
    lm = model.model.language_model
    times: list[float] = []
    state: dict = {}

    def pre(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is not None and emb.shape[1] > 1:
            if emb.is_cuda:
                torch.cuda.synchronize()
            state["t0"] = time.perf_counter()

    def post(module, args, kwargs, out):
        if "t0" in state:
            if out.last_hidden_state.is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - state.pop("t0")) * 1e3)

    handles = [lm.register_forward_pre_hook(pre, with_kwargs=True), lm.register_forward_hook(post, with_kwargs=True)]
    return times, handles


def _repeat(clock, fn, iters: int, after=None, min_seconds: float = 1.0, max_iters: int = 25) -> list[float]:
    """At least ``iters`` timings, more (up to ``max_iters``) until ``min_seconds`` are spent: batch-1 prefills are
    host-bound and vary by tens of percent between calls, so short configs get more samples for their median.
    The garbage collector is paused while timing (a collection inside one sample is host noise, not pruning)."""
    gc.collect()
    gc.disable()
    try:
        times: list[float] = []
        while len(times) < iters or (sum(times) < min_seconds * 1e3 and len(times) < max_iters):
            times.append(clock(fn))
            if after is not None:
                after()
        return times
    finally:
        gc.enable()


def measure(model, inputs: dict, method, iters: int, decode_tokens: int, device: str) -> dict:
    from visattn import tokenprune as tp

    clock = _Clock(device)
    if method is not None:
        tp.apply(model, method, timing=True)
    lm_times, handles = _lm_timer(model)
    try:
        with torch.no_grad():
            prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
            if device.startswith("cuda"):  # every config starts from an empty allocator cache (no inherited
                torch.cuda.empty_cache()   # fragmentation from the previous config's generate())
            for _ in range(2):
                clock(prefill)
            lm_times.clear()
            scorings: list[float] = []
            read_scoring = None if method is None else lambda: scorings.append(tp.last_report(model).scoring_ms)
            ttft = _repeat(clock, prefill, iters, read_scoring)
            report = tp.last_report(model) if method is not None else None
            scoring = statistics.median(scorings) if scorings else 0.0
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            gen = lambda n: model.generate(**inputs, max_new_tokens=n,  # noqa: E731
                                           min_new_tokens=n, do_sample=False)
            t_first = clock(lambda: gen(1))
            t_gen = clock(lambda: gen(decode_tokens))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    finally:
        for h in handles:
            h.remove()
        if method is not None:
            tp.remove(model)
    bsz, length = inputs["input_ids"].shape
    t = statistics.median(ttft)
    llm = statistics.median(lm_times[: len(ttft)]) if lm_times else float("nan")
    decode_ms = t_gen - t_first if t_gen > t_first else float("nan")
    row = {
        "prompt_tokens": length, "ttft_ms": t, "llm_prefill_ms": llm, "ttft_min_ms": min(ttft), "samples": len(ttft),
        "llm_prefill_min_ms": min(lm_times[: len(ttft)]) if lm_times else float("nan"),
        "prefill_tok_s": bsz * length / t * 1e3,
        "decode_tok_s": bsz * (decode_tokens - 1) / decode_ms * 1e3, "peak_gib": peak, "scoring_ms": scoring,
        "scoring_pct": 100.0 * scoring / t,
    }
    if report is not None:
        row.update(llm_visual_tokens=report.visual_tokens_kept[0], layer_avg_visual=report.visual_tokens_layer_avg[0],
                   flops_saved=report.flops_saved[0])
    return row


def grid(args) -> list[tuple[str, int, int, str, int | None]]:
    """(shape, images per sample, batch, method, keep) in priority order."""
    all_methods = ["fastervlm", "visionzip", "divprune", "vtc-cls", "fastv", "pdrop", "sparsevlm"]
    methods = args.methods.split(",") if args.methods else all_methods
    if args.tiny:
        keeps, b15, bnx = [4], [1, 2], [1]
        methods = methods if args.methods else all_methods
    elif args.quick:
        keeps, b15, bnx = [64], [1, 8], [1]
        methods = args.methods.split(",") if args.methods else ["fastervlm", "visionzip", "divprune", "fastv"]
    else:
        keeps, b15, bnx = [192, 128, 64], [1, 8, 32], [1, 8]
    keeps = [int(k) for k in args.keeps.split(",")] if args.keeps else keeps
    b15 = [int(b) for b in args.batches.split(",")] if args.batches else b15
    bnx = [int(b) for b in args.next_batches.split(",")] if args.next_batches else bnx
    out = []

    def block(shape, images, batch, ks, ms):
        out.append((shape, images, batch, "none", None))
        for m in ms:
            for k in ([None] if m.startswith("pdrop") else ks):
                out.append((shape, images, batch, m, k))

    big = lambda b: b >= 32 and not args.tiny  # noqa: E731
    for b in b15:
        if not big(b):
            block("llava-1.5", 1, b, keeps, methods)
    for b in bnx:
        block("llava-next", 5, b, keeps if b == 1 else keeps[-1:], methods)
    for b in b15:
        if big(b):
            block("llava-1.5", 1, b, keeps[-1:], methods)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-prune", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    import transformers

    from visattn import backends
    from visattn.tokenprune.kernels import FAMILY

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    iters = args.iters or (1 if args.tiny else 3)
    decode_tokens = args.decode_tokens or (3 if args.tiny else 16)
    started = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    per_image = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows, skipped, baselines = [], [], {}
    configs = grid(args)
    for round_index, (shape, images, batch, method, keep) in enumerate(configs * args.rounds):
        if time.perf_counter() - started > args.time_budget:
            skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep})
            continue
        scaled_keep = keep  # tokens kept per image (NeXT shape: per crop, i.e. the same ratio)
        inputs = make_inputs(model, batch, images, device, dtype)
        base_method, _, variant = method.partition("+")  # "pdrop+eager": LLM-side scores on eager ops (A/B peer)
        pruner = None if method == "none" else pruner_for(base_method, scaled_keep or 1, per_image,
                                                          model.config.text_config.num_hidden_layers)
        # "+eager": the pruning kernels' reference backend (eager ops) for this config only
        backend = "reference" if variant == "eager" else backends.get_backend(FAMILY)
        try:
            with backends.use_backend(backend, family=FAMILY):
                row = measure(model, inputs, pruner, iters, decode_tokens, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append({"shape": shape, "batch": batch, "method": method, "keep": keep, "reason": "OOM"})
            continue
        row.update(shape=shape, images=images, batch=batch, method=method, keep_per_image=scaled_keep,
                   round=round_index // len(configs))
        if method == "none":
            baselines[(shape, batch)] = row["ttft_ms"]
        row["ttft_speedup"] = baselines.get((shape, batch), float("nan")) / row["ttft_ms"]
        rows.append(row)
        print(_line(row), flush=True)
    if args.rounds > 1:
        rows = _median_rounds(rows)
    result = {
        "rounds": args.rounds,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(dtype),
        "attn_implementation": "sdpa", "tiny": args.tiny, "iters": iters, "decode_tokens": decode_tokens,
        "configs": rows, "skipped": skipped, "wall_s": time.perf_counter() - started,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "-tiny" if args.tiny else ""
    path = out_dir / f"prune-{_dt.date.today().isoformat()}{tag}.json"
    path.write_text(json.dumps(strict_json(result), indent=1, allow_nan=False))
    if args.doc and not args.tiny:  # the page is generated from every result file and its hand-written preamble
        from visattn.bench import report

        preamble = Path(args.doc).with_name("prune_preamble.md")
        page = report.render_prune(report.load_results(args.out_dir),
                                   *([preamble.read_text()] if preamble.is_file() else []))
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(page)
    print(f"\nwrote {path}" + ("" if args.tiny or not args.doc else f" and {args.doc}"))
    print(table(rows))
    return 0


def strict_json(value):
    """``value`` with every non-finite float (a measurement that did not happen: NaN) replaced by None, so the
    result file is strict JSON (``null``), never ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _median_rounds(rows: list[dict]) -> list[dict]:
    """One row per config: the round with the median TTFT (its other columns kept with it), speed-up over the
    baseline's median round. Rounds interleave the configs, so slow drifts of the machine hit every method."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["method"], r["keep_per_image"]), []).append(r)
    out, base = [], {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["ttft_ms"])
        row = dict(rs[(len(rs) - 1) // 2], round_ttft_ms=[r["ttft_ms"] for r in rs])
        if key[2] == "none":
            base[key[:2]] = row["ttft_ms"]
        row["ttft_speedup"] = base.get(key[:2], float("nan")) / row["ttft_ms"]
        out.append(row)
    return out


def _line(r: dict) -> str:
    return (f"{r['shape']:10s} b={r['batch']:<3d} {r['method']:10s} keep={str(r['keep_per_image']):5s} "
            f"ttft={r['ttft_ms']:8.1f}ms x{r.get('ttft_speedup', float('nan')):.2f} llm={r['llm_prefill_ms']:8.1f}ms "
            f"dec={r['decode_tok_s']:8.1f}tok/s score={r['scoring_pct']:.1f}%")


def table(rows: list[dict]) -> str:
    head = ("| shape | batch | method | keep/img | LLM visual | TTFT ms | TTFT × | LLM prefill ms | prefill tok/s "
            "| decode tok/s | peak GiB | scoring % | FLOPs saved |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['method']} | {r['keep_per_image'] or '-'} | "
            f"{r.get('llm_visual_tokens', '-')} | {r['ttft_ms']:.1f} | {r['ttft_speedup']:.2f} | "
            f"{r['llm_prefill_ms']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | {r['peak_gib']:.1f} | "
            f"{r['scoring_pct']:.1f} | {r.get('flops_saved', 0.0):.2f} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    rounds = result.get("rounds", 1)
    repeats = f"; the median of {rounds} interleaved rounds of the grid" if rounds > 1 else ""
    return (
        "## Token pruning (visattn.tokenprune)\n\n"
        f"Measured {result['date']} on {result['device']}, torch {result['torch']}, transformers "
        f"{result['transformers']}, {result['dtype']}, SDPA, random weights (LLaVA-1.5-7B architecture; the NeXT "
        "shape feeds 5 crops = 2880 visual tokens). TTFT = vision tower + scoring + LLM prefill (median of at least "
        f"{result['iters']} calls{repeats}); decode over {result['decode_tokens']} tokens via `generate()`. "
        "`TTFT ×` is the speed-up over the unpruned model at the same shape and batch; `scoring %` is scoring time "
        "over the pruned TTFT (both medians over the same calls). Command: `python -m visattn.bench.prune`.\n\n"
        + table(result["configs"]) + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
