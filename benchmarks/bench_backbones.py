"""Backbone benchmark on CUDA: visattn's BiFormer and Agent-Swin variants against timm's swin_tiny and convnext_tiny,
plus two same-model comparisons (one process, one GPU, same settings for every row):

- every model: inference (no_grad forward) and a train step (forward, cross-entropy, backward, SGD step), bf16
  autocast, channels-last inputs and weights, batch 256 (128 for BiFormer), CUDA-event medians after warm-up;
  GMACs at 224 counted with torch.utils.flop_counter on the meta device (fused multiply-add = 1, as the papers);
- biformer_tiny on visattn's routing kernels vs the same model whose BRA modules run an official-style gather
  formulation (ops/bra_legacy.py's algorithm: gather the routed regions' k/v, dense attention per region), train
  step time and peak memory;
- agent_swin_t on visattn's agent path vs the same model whose AgentAttention modules run the official eager form
  (agent_swin.py: matmuls + softmax with materialised bias tensors), train step time and peak memory.

Usage (repo root, CUDA): python benchmarks/bench_backbones.py --out benchmarks/results/backbones_h200.json
The run bounds itself: rows that would start after --time-budget seconds are recorded as skipped and the JSON is
written.
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
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402

import visattn  # noqa: E402,F401  (registers the models)
from visattn.bench.common import median_ms  # noqa: E402
from visattn.functional import last_backend  # noqa: E402
from visattn.models.agent import AgentAttention  # noqa: E402
from visattn.models.biformer import BiLevelRoutingAttention  # noqa: E402

NEW_MODELS = ["biformer_tiny", "biformer_small", "biformer_base", "agent_swin_t", "agent_swin_s", "agent_swin_b",
              "agent_pvt_t", "agent_pvt_s", "agent_pvt_m", "agent_pvt_l",
              "agent_deit_t", "agent_deit_s", "agent_deit_b"]
BASELINES = ["swin_tiny_patch4_window7_224", "convnext_tiny"]


# ----------------------------------------------------------------------------------------------- peer formulations
def gather_bra_forward(self: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Official-style BRA (ops/bra_legacy.py's algorithm, written here): regions as a batch axis, routing by
    region-mean q·k top-k, the routed regions' k/v *gathered* into a [B, R, topk, tokens, C] copy, dense attention
    per region, LePE on v, output projection."""
    n = self.n_win
    batch, height, width, _ = x.shape
    pad_h, pad_w = -height % n, -width % n
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    rh, rw = hp // n, wp // n
    qkv = self.qkv(x)
    q, kv = qkv.split([self.qk_dim, self.qk_dim + self.dim], dim=-1)

    def regions(t):  # [B, Hp, Wp, C] -> [B, R, tokens, C]
        return t.reshape(batch, n, rh, n, rw, t.shape[-1]).permute(0, 1, 3, 2, 4, 5).reshape(batch, n * n, rh * rw, -1)

    q_r, kv_r = regions(q), regions(kv)
    q_win, k_win = q_r.mean(2), kv_r[..., : self.qk_dim].mean(2)
    logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-1, -2)
    idx = torch.topk(logits, k=self.topk, dim=-1).indices  # [B, R, topk]
    r, t, c = n * n, rh * rw, kv_r.shape[-1]
    gathered = torch.gather(kv_r.unsqueeze(1).expand(-1, r, -1, -1, -1), 2,
                            idx.view(batch, r, self.topk, 1, 1).expand(-1, -1, -1, t, c))  # the k/v copy
    k_sel, v_sel = gathered.split([self.qk_dim, self.dim], dim=-1)
    heads = self.num_heads
    k_sel = k_sel.reshape(batch * r, self.topk * t, heads, -1).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(batch * r, self.topk * t, heads, -1).transpose(1, 2)
    q_pix = q_r.reshape(batch * r, t, heads, -1).transpose(1, 2)
    attn = torch.softmax((q_pix * self.scale) @ k_sel, dim=-1)
    out = (attn @ v_sel).transpose(1, 2).reshape(batch, n, n, rh, rw, self.dim)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, self.dim)
    v = kv[..., self.qk_dim:]
    out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    out = self.wo(out)
    return out[:, :height, :width] if (pad_h or pad_w) else out


def eager_agent_forward(self: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """Official eager AgentAttention (agent_swin.py's forward, written here): explicit matmuls and softmaxes with the
    bias tensors materialised per batch (``.repeat(b, 1, 1, 1)`` as released)."""
    b, h, w, c = x.shape
    n, heads, hd, agents = h * w, self.num_heads, c // self.num_heads, self.agent_num
    x = x.reshape(b, n, c)
    q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agent_tokens = self.pool(q.reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    agent_tokens = agent_tokens.reshape(b, agents, heads, hd).permute(0, 2, 1, 3)
    bias1 = F.interpolate(self.an_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
    bias2 = (self.ah_bias + self.aw_bias).reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
    agent_attn = torch.softmax((agent_tokens * self.scale) @ k.transpose(-2, -1) + bias1 + bias2, dim=-1)
    agent_v = agent_attn @ v
    bias3 = F.interpolate(self.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
    bias3 = bias3.permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
    bias4 = (self.ha_bias + self.wa_bias).reshape(1, heads, -1, agents).repeat(b, 1, 1, 1)
    q_attn = torch.softmax((q * self.scale) @ agent_tokens.transpose(-2, -1) + bias3 + bias4, dim=-1)
    out = (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)
    v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    out = out + self.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c)
    return self.proj_drop(self.proj(out)).reshape(b, h, w, c)


def use_peer(model: torch.nn.Module, cls: type, forward) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, cls):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------- measuring
def gmacs(name: str) -> float | None:
    """Multiply-accumulates of one 224² image (FLOP counter / 2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = timm.create_model(name).eval()
            x = torch.randn(1, 3, 224, 224)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(x)
        return round(counter.get_total_flops() / 2e9, 3)
    except Exception as err:  # a model the counter cannot trace: report null, never a made-up number
        print(f"  gmacs({name}) failed: {type(err).__name__}: {err}")
        return None


def make_step(model: torch.nn.Module, batch: int, mode: str, size: int = 224, compiled: bool = False,
              compile_mode: str | None = None):
    """One inference (no_grad) or train step (forward, cross-entropy, backward, SGD step) of ``model`` on CUDA,
    bf16 autocast, channels-last inputs and weights, fixed random ``size``-square inputs; ``compiled`` runs the
    model through ``torch.compile`` (with ``mode=compile_mode``, e.g. ``"reduce-overhead"``)."""
    device = torch.device("cuda")
    model = model.to(device).to(memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    fn = torch.compile(model, mode=compile_mode) if compiled else model
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                fn(x)
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    graphs = compiled and compile_mode == "reduce-overhead"

    def step():
        if graphs:  # a new CUDA-graph generation per step: the last step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(fn(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(model: torch.nn.Module, batch: int, mode: str, warmup: int, iters: int) -> dict:
    step = make_step(model, batch, mode)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(step, iters=iters, warmup=warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return dict(ms=round(ms, 3), img_per_s=round(batch * 1e3 / ms, 1), peak_gib=round(peak, 3),
                attn_backend=last_backend())


def run(args) -> dict:
    start = time.perf_counter()
    rows = []

    def out_of_time() -> bool:
        return time.perf_counter() - start > args.time_budget

    def row(name, mode, batch, variant="", build=None):
        entry = dict(model=name, variant=variant or "default", mode=mode, batch=batch)
        if out_of_time():
            entry.update(skipped=True, reason=f"--time-budget {args.time_budget} reached")
            rows.append(entry)
            return entry
        try:
            torch.manual_seed(0)
            model = build() if build else timm.create_model(name)
            entry.update(measure(model, batch, mode, args.warmup, args.iters))
        except torch.cuda.OutOfMemoryError as err:
            entry.update(error=f"OutOfMemoryError: {str(err).splitlines()[0]}")
        except Exception as err:  # report and go on: one failing row must not lose the others
            entry.update(error=f"{type(err).__name__}: {err}")
        finally:
            torch.cuda.empty_cache()
        print(json.dumps(entry))
        rows.append(entry)
        return entry

    names = BASELINES + NEW_MODELS if not args.models else args.models
    macs = {name: gmacs(name) for name in names}
    for name in names:
        batch = args.batch_biformer if name.startswith("biformer") else args.batch
        for mode in ("infer", "train"):
            row(name, mode, batch)

    def biformer_gather():
        model = timm.create_model("biformer_tiny")
        assert use_peer(model, BiLevelRoutingAttention, gather_bra_forward) > 0
        return model

    def agent_eager():
        model = timm.create_model("agent_swin_t")
        assert use_peer(model, AgentAttention, eager_agent_forward) > 0
        return model

    def swin_on_visattn():
        from visattn.models.swin_patch import patch_swin

        return patch_swin(timm.create_model("swin_tiny_patch4_window7_224"))

    if not args.models or "swin_tiny_patch4_window7_224" in args.models:
        for mode in ("infer", "train"):
            row("swin_tiny_patch4_window7_224", mode, args.batch, variant="patch_swin (visattn window attention)",
                build=swin_on_visattn)

    # Same-model comparisons, interleaved (ours, peer, ours, peer, ...) so that drift in host or GPU speed over
    # the run cannot favour either side; the ratio is of the per-side medians over the rounds.
    comparisons = []
    for name, variant, build, batch in (("biformer_tiny", "official-style gather BRA", biformer_gather,
                                         args.batch_biformer),
                                        ("agent_swin_t", "official eager AgentAttention", agent_eager, args.batch)):
        if out_of_time():
            break
        sides = {"ours": [], "peer": []}
        try:
            torch.manual_seed(0)
            models = {"ours": timm.create_model(name), "peer": build()}
            for _ in range(args.rounds):
                for side in ("ours", "peer"):
                    sides[side].append(measure(models[side], batch, "train", args.warmup, args.iters))
                    torch.cuda.empty_cache()
        except Exception as err:  # report and go on
            comparisons.append(dict(model=name, peer=variant, error=f"{type(err).__name__}: {err}"))
            continue
        med = {side: statistics.median(r["ms"] for r in runs) for side, runs in sides.items()}
        peak = {side: max(r["peak_gib"] for r in runs) for side, runs in sides.items()}
        entry = dict(model=name, peer=variant, mode="train", batch=batch, rounds=args.rounds,
                     ours_ms=[r["ms"] for r in sides["ours"]], peer_ms=[r["ms"] for r in sides["peer"]],
                     ours_peak_gib=peak["ours"], peer_peak_gib=peak["peer"],
                     speedup=round(med["peer"] / med["ours"], 3), memory_ratio=round(peak["ours"] / peak["peer"], 3))
        print(json.dumps(entry))
        comparisons.append(entry)
    return dict(rows=rows, gmacs_224=macs, comparisons=comparisons, seconds=round(time.perf_counter() - start, 1))


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(torch=torch.__version__, triton=triton_version, timm=timm.__version__, visattn=visattn.__version__,
                python=platform.python_version(), cuda=torch.version.cuda)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--time-budget", type=float, default=270.0, help="start no new row after this many seconds")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch-biformer", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each same-model comparison")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backbones needs a CUDA GPU", file=sys.stderr)
        return 2
    result = dict(
        benchmark="backbones", device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        settings=dict(dtype="bf16 autocast", memory_format="channels_last", batch=args.batch,
                      batch_biformer=args.batch_biformer, warmup=args.warmup, iters=args.iters, timing="CUDA events, "
                      "median", time_budget=args.time_budget, img_size=224, comparison_rounds=args.rounds),
        **versions(), **run(args),
    )

    def finite(obj):  # strict JSON: no NaN / inf anywhere
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: finite(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [finite(v) for v in obj]
        return obj

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
