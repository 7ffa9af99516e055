"""``visattn bench-bra``: bi-level routing attention, fused Triton kernel vs BiFormer's gather formulation.

Rows are BiFormer-T's routed stages at 224² (maps 56/28/14, 7×7 regions, top-k 1/4/16, head dim 32). Every row:
forward and forward+backward medians, peak extra memory, useful TFLOP/s and the floor (measured ceilings).
Peers in the same process: BiFormer's own formulation (gather the routed regions' keys/values into a top-k-times
larger tensor, then matmul-softmax-matmul) and the same gather followed by SDPA.
"""

from __future__ import annotations

import argparse

import torch

from visattn.bench.common import floor_ms, op_ms_and_peak_mib, run_peer_benchmark, short_dtype

# (name, batch, map size, channels, heads, regions per side, topk) — BiFormer-T stages 1-3 at 224².
PROBLEMS = [
    ("biformer_t stage1", 128, 56, 64, 2, 7, 1),
    ("biformer_t stage2", 128, 28, 128, 4, 7, 4),
    ("biformer_t stage3", 128, 14, 256, 8, 7, 16),
]


def biformer_gather(q, k, v, regions: int, topk: int, scale: float, use_sdpa: bool):
    """BiFormer's formulation on [B, H, W, heads, D]: region means, top-k, gather k/v copies, dense attention."""
    from visattn.reference import route_regions

    batch, height, width, heads, dim = q.shape
    rh, rw = height // regions, width // regions
    routing = route_regions(q, k, (regions, regions), topk)  # [B, R, topk]

    def by_region(t):  # [B, R, tokens, heads*D]
        t = t.reshape(batch, regions, rh, regions, rw, -1).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(batch, regions * regions, rh * rw, -1)

    qr, kr, vr = by_region(q), by_region(k), by_region(v)
    n_regions, tokens = qr.shape[1], qr.shape[2]
    index = routing.view(batch, n_regions, topk, 1, 1).expand(-1, -1, -1, tokens, kr.shape[-1])
    def gathered(t):
        return torch.gather(t[:, None].expand(-1, n_regions, -1, -1, -1), 2, index)
    k_sel = gathered(kr).reshape(batch * n_regions, topk * tokens, heads, dim).transpose(1, 2)
    v_sel = gathered(vr).reshape(batch * n_regions, topk * tokens, heads, dim).transpose(1, 2)
    q_sel = qr.reshape(batch * n_regions, tokens, heads, dim).transpose(1, 2)
    if use_sdpa:
        out = torch.nn.functional.scaled_dot_product_attention(q_sel, k_sel, v_sel, scale=scale)
    else:
        out = torch.softmax((q_sel * scale) @ k_sel.transpose(-1, -2), dim=-1) @ v_sel
    out = out.transpose(1, 2).reshape(batch, regions, regions, rh, rw, heads, dim).permute(0, 1, 3, 2, 4, 5, 6)
    return out.reshape(batch, height, width, heads, dim)


def run_problem(problem, dtype, ceilings) -> dict:
    from visattn.kernels.routing import bilevel_routing

    name, batch, size, channels, heads, regions, topk = problem
    dim = channels // heads
    scale = channels**-0.5  # BiFormer scales by the full qk dim
    qkv = torch.randn(batch, size, size, 3, heads, dim, device="cuda", dtype=dtype)
    inputs = [t.detach().requires_grad_() for t in qkv.unbind(3)]
    tokens = batch * size * size
    keys = topk * (size // regions) ** 2
    flops = 4 * tokens * heads * keys * dim
    nbytes = 4 * tokens * channels * qkv.element_size()
    peers = {
        "visattn": lambda q, k, v: bilevel_routing(q, k, v, (regions, regions), topk, scale),
        "biformer_gather": lambda q, k, v: biformer_gather(q, k, v, regions, topk, scale, use_sdpa=False),
        "gather_sdpa": lambda q, k, v: biformer_gather(q, k, v, regions, topk, scale, use_sdpa=True),
    }
    row = {"problem": name, "batch": batch, "map": size, "heads": heads, "head_dim": dim, "topk": topk,
           "dtype": str(dtype).removeprefix("torch."), "fwd_floor_ms": floor_ms(flops, nbytes, ceilings),
           "fwd_bwd_floor_ms": floor_ms(3.5 * flops, 2.5 * nbytes, ceilings)}
    reference = peers["biformer_gather"](*inputs).float()
    for peer, fn in peers.items():
        fwd_ms, _ = op_ms_and_peak_mib(fn, inputs, backward=False)
        both_ms, peak_mib = op_ms_and_peak_mib(fn, inputs, backward=True)
        err = float((fn(*inputs).float() - reference).norm() / reference.norm())
        row[peer] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "peak_mib": peak_mib,
                     "fwd_tflops": flops / fwd_ms / 1e9, "rel_err_vs_gather": err}
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bf16", type=short_dtype, choices=["bf16", "fp16"],
                        help="data type (float16 / bfloat16 are accepted too)")
    parser.add_argument("--out", default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-bra", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    return run_peer_benchmark("bra", PROBLEMS, run_problem, ("visattn", "biformer_gather", "gather_sdpa"),
                              "rel_err_vs_gather", args.dtype, args.out)
