"""Diffusion benchmarks: LTX-2.5's decoder on visattn, and DiT / FLUX / HunyuanVideo blocks with NA, GNA and windows.

Usage (repo root, CUDA):
    python benchmarks/bench_diffusion.py --mode all --time-budget 420 --out benchmarks/results/diffusion-h200.json
    python benchmarks/bench_diffusion.py --tiny --out /tmp/diffusion.json   (CPU dry run)

Mode ``ltx2``: a randomly initialised ``LTX2VideoDiffusionDecoderModel`` of the released configuration (config
defaults; no weights are downloaded) decodes a production latent (121 frames at 512x768 -> latent grid from the
config's compression ratios) with :class:`visattn.diffusion.LTX2NeighborhoodAttnProcessor` (Triton engine), then
the tiled path on a larger video when time allows. Reported: end-to-end decode time, attention time and share
(CUDA events around every ``na3d`` call), peak memory, and for each stage shape the isolated NA time against its
floor = max(bytes / measured copy rate, 4*B*heads*N*prod(kernel)*head_dim / measured bf16 matmul rate), with
FlexAttention (compiled, diffusers' own block mask) where the mask fits in memory.

Mode ``blocks``: a DiT-XL block (visattn's ``DiTBlock``) and diffusers' FLUX double-stream and HunyuanVideo blocks
(their own classes, randomly initialised) at 1024² / 4K latents and 30x48x80, forward and forward+backward: dense
SDPA (cuDNN) against NA at several kernels, GNA strides and windows. Per variant: block time, attention-only time,
block speed-up, attention speed-up, the dense block's attention share, and the Amdahl bound
``1 / ((1 - share) + share / attention_speedup)`` with the block speed-up as a fraction of it (target >= 0.7).

``--time-budget`` (seconds) bounds the run (items that would start after the budget are listed under
``skipped``). ``--tiny`` runs every code path at toy sizes (CPU works), for tests. The JSON is strict (no NaN) and
names device, torch, triton, diffusers and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from visattn.bench.common import median_ms, strict  # noqa: E402
from visattn.diffusion import (  # noqa: E402
    DiTBlock,
    FluxNeighborhoodAttnProcessor,
    HunyuanVideoNeighborhoodAttnProcessor,
    LTX2NeighborhoodAttnProcessor,
    joint_neighborhood_attention,
)
from visattn.diffusion.processors import _kernel_args  # noqa: E402


# ------------------------------------------------------------------------------------------------ measuring
class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, item: str, need: float = 0.0) -> bool:
        if self.left() > need:
            return True
        self.skipped.append({"item": item, "reason": f"time budget ({self.left():.0f} s left, ~{need:.0f} s needed)"})
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, target_ms: float = 400.0, max_iters: int = 25) -> float:
    """Median ms of ``fn``: one warm-up call (compiles), then enough calls to fill ~target_ms (3..max_iters)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    estimate = (time.perf_counter() - start) * 1e3
    iters = int(min(max_iters, max(3, target_ms / max(estimate, 1e-3))))
    if device == "cuda":
        return median_ms(fn, iters=iters, warmup=0)  # CUDA events; warmed up above
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def ceilings(device: str) -> dict:
    """bf16 matmul TFLOP/s and copy GB/s (read + write), measured in this process."""
    n = 8192 if device == "cuda" else 512
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul = time_ms(lambda: a @ b, device)
    elements = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.randn(elements, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device)
    nbytes = 2 * elements * src.element_size()
    return {"matmul_tflops": 2 * n**3 / matmul / 1e9, "copy_gbs": nbytes / copy / 1e6,
            "matmul_dtype": str(dtype).replace("torch.", "")}


def na_floor_ms(batch: int, grid, heads: int, head_dim: int, kernel, elem_bytes: int, ceil: dict,
                backward: bool = False) -> tuple[float, float, float]:
    """(floor ms, useful FLOPs, bytes): FLOPs 4*B*heads*N*prod(kernel)*D (x3.5 with backward); bytes q,k,v,o once
    (backward also dO, dq, dk, dv and the fp32 LSE)."""
    tokens = batch * math.prod(grid) * heads
    flops = 4.0 * tokens * math.prod(kernel) * head_dim * (3.5 if backward else 1.0)
    nbytes = 4 * tokens * head_dim * elem_bytes + ((4 * tokens * head_dim * elem_bytes + 8 * tokens)
                                                   if backward else 0)
    floor = max(flops / (ceil["matmul_tflops"] * 1e9), nbytes / (ceil["copy_gbs"] * 1e6))
    return floor, flops, nbytes


def environment(device: str) -> dict:
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # CPU-only installs
        triton_version = f"unavailable ({type(err).__name__})"
    return {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda"
            else platform.processor() or "cpu", "torch": torch.__version__, "triton": triton_version,
            "diffusers": diffusers.__version__, "python": platform.python_version()}


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


# ------------------------------------------------------------------------------------------------ FlexAttention
def flex_na_ms(grid, heads: int, head_dim: int, kernel, device: str, dtype, max_mask_gib: float = 24.0):
    """Compiled FlexAttention with a clamped-window block mask (diffusers' rule); None + reason when it cannot run."""
    tokens = math.prod(grid)
    mask_gib = tokens * tokens / 2**30  # create_block_mask evaluates the dense boolean mask
    if device != "cuda":
        return None, "FlexAttention peer runs on CUDA only here"
    if mask_gib > max_mask_gib:
        return None, f"block mask needs ~{mask_gib:.0f} GiB (dense boolean Q x KV) > {max_mask_gib:.0f} GiB"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        sizes = torch.tensor(grid, device=device)
        kern = torch.tensor(kernel, device=device)
        strides = [math.prod(grid[i + 1:]) for i in range(len(grid))]

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = q_idx >= 0
            for axis, stride in enumerate(strides):
                qc, kc = (q_idx // stride) % sizes[axis], (kv_idx // stride) % sizes[axis]
                start = torch.clamp(qc - kern[axis] // 2, 0, sizes[axis] - kern[axis])
                allowed = allowed & (kc >= start) & (kc < start + kern[axis])
            return allowed

        block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device=device)
        q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        compiled = torch.compile(flex_attention)
        return time_ms(lambda: compiled(q, k, v, block_mask=block_mask), device), None
    except Exception as err:
        return None, _error(err)


# ------------------------------------------------------------------------------------------------ LTX-2.5
TINY_LTX2 = dict(latent_channels=8, patch_size=2, decoder_head_dim=8, decoder_stage_channels=(64, 32, 16, 16, 8),
                 decoder_stage_depths=(1, 1, 1, 1, 2), decoder_stage_kernels=((3, 3, 3), (3, 3, 5), (3, 5, 3),
                                                                               (3, 3, 3)),
                 decoder_upsample_strides=((1, 1, 1), (2, 1, 1), (1, 1, 1), (1, 1, 1)),
                 decoder_stage5_kernel=(3, 3, 5), decoder_t_emb_dim=32, spatial_compression_ratio=2,
                 temporal_compression_ratio=2)


class TimedLTX2Processor(LTX2NeighborhoodAttnProcessor):
    """Records CUDA events (or wall time) around every attention call, with its shape."""

    def __init__(self, device: str, backend=None):
        super().__init__(backend=backend)
        self.device, self.records = device, []

    def attend(self, query, key, value, kernel_size):
        shape = (tuple(query.shape[1:4]), query.shape[-2], query.shape[-1], tuple(kernel_size))
        if self.device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = super().attend(query, key, value, kernel_size)
            end.record()
            self.records.append((shape, begin, end))
        else:
            begin = time.perf_counter()
            out = super().attend(query, key, value, kernel_size)
            self.records.append((shape, begin, time.perf_counter()))
        return out

    def summary(self) -> tuple[float, dict]:
        total, stages = 0.0, {}
        for shape, begin, end in self.records:
            ms = begin.elapsed_time(end) if self.device == "cuda" else (end - begin) * 1e3
            total += ms
            entry = stages.setdefault(shape, {"calls": 0, "ms": 0.0})
            entry["calls"] += 1
            entry["ms"] += ms
        self.records.clear()
        return total, stages


def _timed_decode(decode, latent, processor, device: str) -> tuple[float, float, dict]:
    """(seconds, attention ms, per-stage records) of one ``decode(latent)`` after a warm-up: the warm-up's attention
    records are dropped and the peak-memory counter reset first."""
    processor.summary()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    decode(latent)
    _sync(device)
    seconds = time.perf_counter() - start
    attention_ms, stages = processor.summary()
    return seconds, attention_ms, stages


def bench_ltx2(args, device: str, dtype, ceil: dict, budget: Budget) -> dict:
    from diffusers.models.autoencoders.ltx2_diffusion_decoder import LTX2VideoDiffusionDecoderModel

    from visattn import functional

    config = TINY_LTX2 if args.tiny else {}
    torch.manual_seed(0)
    with torch.device(device):
        model = LTX2VideoDiffusionDecoderModel(**config)
    model = model.to(dtype).eval()
    cfg = model.config
    frames, height, width = (9, 10, 14) if args.tiny else (121, 512, 768)
    latent_grid = ((frames - 1) // cfg.temporal_compression_ratio + 1, height // cfg.spatial_compression_ratio,
                   width // cfg.spatial_compression_ratio)
    latent = torch.randn(1, cfg.latent_channels, *latent_grid, device=device, dtype=dtype)
    processor = TimedLTX2Processor(device)
    model.set_attn_processor(processor)
    out = {"config": "tiny" if args.tiny else "released (config defaults, random weights)",
           "video": {"frames": frames, "height": height, "width": width}, "latent_grid": latent_grid,
           "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", "")}

    def decode(z):
        with torch.no_grad():
            return model.decode(z, generator=torch.Generator(device=device).manual_seed(0)).sample

    start = time.perf_counter()
    video = decode(latent)  # compiles every kernel shape
    _sync(device)
    out["first_decode_s"] = time.perf_counter() - start
    out["output_shape"] = list(video.shape)
    del video
    e2e, attention_ms, stages = _timed_decode(decode, latent, processor, device)
    out.update(decode_s=e2e, attention_s=attention_ms / 1e3, attention_share=attention_ms / 1e3 / e2e,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
    rows = []
    for (grid, heads, head_dim, kernel), entry in stages.items():
        row = {"grid": grid, "heads": heads, "head_dim": head_dim, "kernel": kernel, "calls_per_decode": entry["calls"],
               "in_decode_ms_per_call": entry["ms"] / entry["calls"]}
        floor, flops, nbytes = na_floor_ms(1, grid, heads, head_dim, kernel, torch.finfo(dtype).bits // 8, ceil)
        row.update(floor_ms=floor, useful_tflop=flops / 1e12, bytes_gb=nbytes / 1e9)
        if budget.allows(f"ltx2 stage {grid} isolated", 5):
            q, k, v = (torch.randn(1, *grid, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
            ms = time_ms(lambda q=q, k=k, v=v, kernel=kernel: functional.na3d(q, k, v, kernel, scale=1.0), device)
            row.update(isolated_ms=ms, x_floor=ms / floor, useful_tflops=flops / ms / 1e9)
            del q, k, v
        if budget.allows(f"ltx2 stage {grid} flex", 60):
            flex, why = flex_na_ms(grid, heads, head_dim, kernel, device, dtype)
            row.update(flex_ms=flex, flex_note=why)
        rows.append(row)
    out["stages"] = rows
    out["target"] = "every stage within 3x of its floor"
    out["stages_within_3x_floor"] = all(r.get("x_floor", math.inf) <= 3 for r in rows)
    if budget.allows("ltx2 tiled decode", 4.5 * e2e + 20):
        try:
            # tiny: tiles of 12x12 px (stride 8) so the toy video really takes the tiled path
            model.enable_tiling(**(dict(tile_sample_min_height=12, tile_sample_min_width=12,
                                        tile_sample_stride_height=8, tile_sample_stride_width=8)
                                   if args.tiny else {}))
            tiled_calls = []
            stock_tiled = model.tiled_decode
            model.tiled_decode = lambda *a, **k: tiled_calls.append(1) or stock_tiled(*a, **k)
            scale = 2
            big = (frames, height * scale, width * scale)
            big_latent = torch.randn(1, cfg.latent_channels, latent_grid[0], latent_grid[1] * scale,
                                     latent_grid[2] * scale, device=device, dtype=dtype)
            decode(big_latent)  # warm-up for the tile shapes
            tiled, attention_ms, _ = _timed_decode(decode, big_latent, processor, device)
            out["tiled"] = {"video": dict(zip(("frames", "height", "width"), big, strict=True)), "decode_s": tiled,
                            "tiled_path_used": bool(tiled_calls),
                            "attention_share": attention_ms / 1e3 / tiled,
                            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                            else None}
        except Exception as err:
            out["tiled"] = {"error": _error(err)}
        finally:
            model.disable_tiling()
            model.__dict__.pop("tiled_decode", None)
    return out


# ------------------------------------------------------------------------------------------------ blocks
def _suites(tiny: bool) -> list[dict]:
    if tiny:
        return [
            dict(name="dit-tiny", kind="dit", grid=(8, 8), dim=32, heads=2,
                 variants=[("dense", {}), ("na", dict(kernel_size=3)), ("gna", dict(kernel_size=4, stride=2)),
                           ("window", dict(window_size=4))]),
            dict(name="flux-tiny", kind="flux", grid=(6, 6), dim=32, heads=2, head_dim=16, text=4,
                 variants=[("dense", {}), ("na", dict(kernel_size=3))]),
            dict(name="hunyuan-tiny", kind="hunyuan", grid=(3, 4, 4), dim=32, heads=2, head_dim=16, text=4,
                 variants=[("dense", {}), ("na", dict(kernel_size=(3, 3, 3)))]),
        ]
    dit = dict(kind="dit", dim=1152, heads=16)
    flux = dict(kind="flux", dim=3072, heads=24, head_dim=128, text=512)
    return [
        dict(name="dit_xl-1024px", grid=(64, 64), **dit, variants=[
            ("dense", {}), ("na-k13", dict(kernel_size=13)), ("na-k21", dict(kernel_size=21)),
            ("gna-k32-s16", dict(kernel_size=32, stride=16)), ("window-16", dict(window_size=16))]),
        dict(name="dit_xl-4k", grid=(256, 256), **dit, variants=[
            ("dense", {}), ("na-k13", dict(kernel_size=13)), ("na-k33", dict(kernel_size=33)),
            ("gna-k64-s32", dict(kernel_size=64, stride=32)), ("window-32", dict(window_size=32))]),
        dict(name="flux-1024px", grid=(64, 64), **flux, variants=[
            ("dense", {}), ("na-k21", dict(kernel_size=21)), ("gna-k32-s16", dict(kernel_size=32, stride=16))]),
        dict(name="flux-4k", grid=(256, 256), **flux, variants=[
            ("dense", {}), ("na-k33", dict(kernel_size=33)), ("na-k80", dict(kernel_size=80)),
            ("gna-k80-s16", dict(kernel_size=80, stride=16))]),
        dict(name="hunyuan-30x48x80", kind="hunyuan", grid=(30, 48, 80), dim=3072, heads=24, head_dim=128, text=256,
             variants=[("dense", {}), ("na-18x24x24", dict(kernel_size=(18, 24, 24))),
                       ("gna-18x24x24-s6x8x8", dict(kernel_size=(18, 24, 24), stride=(6, 8, 8))),
                       ("na-10x16x16", dict(kernel_size=(10, 16, 16)))]),
    ]


def _cudnn(device: str):
    if device != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.02)


class BlockCase:
    """One block of one suite: builds it, runs it with a given variant, and its attention alone."""

    def __init__(self, suite: dict, device: str, dtype):
        self.suite, self.device, self.dtype = suite, device, dtype
        self.grid, self.kind = tuple(suite["grid"]), suite["kind"]
        self.tokens = math.prod(self.grid)
        self.text = suite.get("text", 0)
        self.heads = suite["heads"]
        self.head_dim = suite.get("head_dim", suite["dim"] // suite["heads"])
        gen = torch.Generator(device=device).manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
        dim = suite["dim"]
        if self.kind == "dit":
            self.x, self.c = rand(1, *self.grid, dim), rand(1, dim)
            self.block = None
        else:
            from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock
            from diffusers.models.transformers.transformer_hunyuan_video import (
                HunyuanVideoRotaryPosEmbed,
                HunyuanVideoTransformerBlock,
            )

            torch.manual_seed(0)
            with torch.device(device):
                if self.kind == "flux":
                    self.block = FluxTransformerBlock(dim, self.heads, self.head_dim)
                    ids = torch.zeros(self.text + self.tokens, 3, device=device)
                    index = torch.arange(self.tokens, device=device)
                    ids[self.text:, 1] = index.div(self.grid[1], rounding_mode="floor")
                    ids[self.text:, 2] = index % self.grid[1]
                    axes = (16, 56, 56) if self.head_dim == 128 else (4, 6, 6)
                    self.rotary = FluxPosEmbed(10000, axes)(ids)
                else:
                    self.block = HunyuanVideoTransformerBlock(self.heads, self.head_dim, mlp_ratio=4.0)
                    axes = [16, 56, 56] if self.head_dim == 128 else [4, 6, 6]
                    self.rotary = HunyuanVideoRotaryPosEmbed(1, 1, axes, 256.0)(
                        torch.empty(1, 1, *self.grid, device=device))
            _randomize(self.block)
            self.block = self.block.to(dtype)
            self.stock = self.block.attn.processor
            self.x, self.text_states, self.temb = rand(1, self.tokens, dim), rand(1, self.text, dim), rand(1, dim)

    def na_kwargs(self, variant: dict) -> dict:
        return {key: value for key, value in variant.items() if key in ("kernel_size", "stride", "dilation")}

    def block_fn(self, name: str, variant: dict, backward: bool):
        """A closure running the block once (forward, or forward + backward)."""
        attention = "dense" if name == "dense" else ("window" if "window_size" in variant else "neighborhood")
        if self.kind == "dit":
            torch.manual_seed(0)
            block = DiTBlock(self.suite["dim"], self.heads, attention, **variant).to(self.device, self.dtype)
            _randomize(block)
            inputs = (self.x.detach().requires_grad_(backward), self.c)
            call = lambda: (block(*inputs),)  # noqa: E731
            params = list(block.parameters())
        else:
            if name == "dense":
                self.block.attn.set_processor(self.stock)
            else:
                cls = FluxNeighborhoodAttnProcessor if self.kind == "flux" else HunyuanVideoNeighborhoodAttnProcessor
                self.block.attn.set_processor(cls(grid=self.grid, **self.na_kwargs(variant)))
            hidden, text = (t.detach().requires_grad_(backward) for t in (self.x, self.text_states))
            if self.kind == "flux":
                call = lambda: self.block(hidden, text, self.temb, image_rotary_emb=self.rotary)  # noqa: E731
            else:
                call = lambda: self.block(hidden, text, self.temb, None, self.rotary)  # noqa: E731
            params = list(self.block.parameters())
        for param in params:
            param.requires_grad_(backward)

        def run():
            with _cudnn(self.device), torch.set_grad_enabled(backward):
                outputs = [o for o in call() if o is not None]
                if backward:
                    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
                    for param in params:
                        param.grad = None
        return run

    def attention_fn(self, name: str, variant: dict, backward: bool):
        """The attention alone, on random q/k/v of the block's shapes (joint blocks: text + image)."""
        length = self.tokens + self.text
        shape = (1, length, self.heads, self.head_dim)
        q, k, v = (torch.randn(shape, device=self.device, dtype=self.dtype, requires_grad=backward) for _ in range(3))
        if name == "dense":
            call = lambda: F.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        elif "window_size" in variant:
            from visattn import functional

            grid_view = lambda t: t.unflatten(1, self.grid)  # noqa: E731
            call = lambda: functional.window_attention(  # noqa: E731
                grid_view(q), grid_view(k), grid_view(v), variant["window_size"])
        else:
            na_args = _kernel_args(self.grid, variant["kernel_size"], variant.get("dilation", 1),
                                   variant.get("stride", 1), False)
            call = lambda: joint_neighborhood_attention(q, k, v, self.grid, self.text, True, na_args)  # noqa: E731

        def run():
            with _cudnn(self.device), torch.set_grad_enabled(backward):
                out = call()
                if backward:
                    out.backward(torch.ones_like(out))
                    for t in (q, k, v):
                        t.grad = None
        return run


def bench_blocks(args, device: str, dtype, ceil: dict, budget: Budget) -> list[dict]:
    results = []
    for suite in _suites(args.tiny):
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            if not budget.allows(f"{suite['name']} {pass_name}", 20):
                continue
            try:
                case = BlockCase(suite, device, dtype)
            except Exception as err:
                results.append({"suite": suite["name"], "pass": pass_name, "error": _error(err)})
                continue
            dense = None
            for name, variant in suite["variants"]:
                if not budget.allows(f"{suite['name']} {pass_name} {name}", 10):
                    continue
                row = {"suite": suite["name"], "pass": pass_name, "variant": name, "grid": case.grid,
                       "text_tokens": case.text, "heads": case.heads, "head_dim": case.head_dim, **variant}
                try:
                    row["block_ms"] = time_ms(case.block_fn(name, variant, backward), device)
                    row["attention_ms"] = time_ms(case.attention_fn(name, variant, backward), device)
                except Exception as err:
                    row["error"] = _error(err)
                    if args.verbose:
                        traceback.print_exc()
                    results.append(row)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if "kernel_size" in variant:
                    kernel = _kernel_args(case.grid, variant["kernel_size"], 1, 1, False)["kernel_size"]
                    floor, _, _ = na_floor_ms(1, case.grid, case.heads, case.head_dim, kernel,
                                              torch.finfo(dtype).bits // 8, ceil, backward)
                    row.update(na_floor_ms=floor)
                if name == "dense":
                    dense = row
                    row["attention_share"] = min(1.0, row["attention_ms"] / row["block_ms"])
                elif dense is not None:
                    share = dense["attention_share"]
                    attn_speedup = dense["attention_ms"] / row["attention_ms"]
                    amdahl = 1.0 / ((1 - share) + share / attn_speedup)
                    block_speedup = dense["block_ms"] / row["block_ms"]
                    row.update(attention_share=min(1.0, row["attention_ms"] / row["block_ms"]),
                               attention_speedup=attn_speedup, block_speedup=block_speedup, amdahl_bound=amdahl,
                               fraction_of_amdahl=block_speedup / amdahl,
                               meets_70pct_of_amdahl=block_speedup >= 0.7 * amdahl)
                results.append(row)
                print(json.dumps(strict(row)), flush=True)
            if (suite["kind"] == "dit" and not backward and budget.allows(f"{suite['name']} flex", 90)):
                name, variant = next((n, v) for n, v in suite["variants"] if "kernel_size" in v and "stride" not in v)
                kernel = _kernel_args(case.grid, variant["kernel_size"], 1, 1, False)["kernel_size"]
                flex, why = flex_na_ms(case.grid, case.heads, case.head_dim, kernel, device, dtype)
                results.append({"suite": suite["name"], "pass": "fwd", "variant": f"flex-{name}",
                                "attention_ms": flex, "note": why})
            del case
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("ltx2", "blocks", "all"), default="all")
    parser.add_argument("--time-budget", type=float, default=420.0, help="wall-clock budget for the whole run (s)")
    # the spelling of docs and result files before the benchmarks shared one flag name
    parser.add_argument("--max-seconds", dest="time_budget", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/diffusion-<date>.json)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU works): exercise every code path")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    budget = Budget(args.time_budget)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        parser.error("the production benchmark needs a CUDA GPU; use --tiny on the CPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    result = {"bench": "diffusion", **environment(device), "args": vars(args), "ceilings": ceilings(device)}
    if args.mode in ("ltx2", "all"):
        try:
            result["ltx2"] = bench_ltx2(args, device, dtype, result["ceilings"], budget)
        except Exception as err:
            result["ltx2"] = {"error": _error(err)}
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.mode in ("blocks", "all"):
        result["blocks"] = bench_blocks(args, device, dtype, result["ceilings"], budget)
    result["skipped"] = budget.skipped
    result["wall_s"] = time.perf_counter() - started
    path = Path(args.out or f"benchmarks/results/diffusion-{result['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict(result), indent=2, allow_nan=False))
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
