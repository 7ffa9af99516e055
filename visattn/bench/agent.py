"""``visattn bench-agent``: agent attention, the fused Triton kernels vs two SDPA calls vs the official eager form.

Rows are Agent-Swin-T's agent stages at 224² (maps 56/28/14, 9/16/49 agents, head dim 32, batch 256), with both
position biases as trainable ``[1, heads, ...]`` tensors (broadcast over the batch, as the model passes them), so
forward+backward includes their gradients. Every row: forward and forward+backward medians, peak extra memory,
useful TFLOP/s and the floor (measured ceilings). Peers in the same process: visattn's fused kernels, visattn's
two-SDPA path, and the official eager form (``agent_swin.py``: matmul, softmax, matmul with the biases repeated
per batch item, written here).
"""

from __future__ import annotations

import argparse

import torch

from visattn.bench.common import floor_ms, op_ms_and_peak_mib, run_peer_benchmark, short_dtype

# (name, batch, map size, channels, heads, agents) — Agent-Swin-T stages 1-3 at 224².
PROBLEMS = [
    ("agent_swin_t stage1", 256, 56, 96, 3, 9),
    ("agent_swin_t stage2", 256, 28, 192, 6, 16),
    ("agent_swin_t stage3", 256, 14, 384, 12, 49),
]


def official_eager(q, k, v, agents, agent_bias, query_bias, scale):
    """The official module's arithmetic on ``[B, H, W, heads, D]``: bias tensors repeated to the batch."""
    batch, height, width, heads, dim = q.shape
    to_bhnd = lambda t: t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)  # noqa: E731
    qh, kh, vh, ah = to_bhnd(q), to_bhnd(k), to_bhnd(v), agents.transpose(1, 2)
    agent_attn = torch.softmax((ah * scale) @ kh.transpose(-2, -1) + agent_bias.repeat(batch, 1, 1, 1), dim=-1)
    agent_v = agent_attn @ vh
    q_attn = torch.softmax((qh * scale) @ ah.transpose(-2, -1) + query_bias.repeat(batch, 1, 1, 1), dim=-1)
    return (q_attn @ agent_v).transpose(1, 2).reshape(batch, height, width, heads, -1)


def run_problem(problem, dtype, ceilings) -> dict:
    from visattn import functional

    name, batch, size, channels, heads, n_agents = problem
    dim = channels // heads
    scale = dim**-0.5
    tokens = size * size
    qkv = torch.randn(batch, size, size, 3, heads, dim, device="cuda", dtype=dtype)
    agents = torch.randn(batch, n_agents, heads, dim, device="cuda", dtype=dtype)
    agent_bias = 0.02 * torch.randn(1, heads, n_agents, tokens, device="cuda", dtype=dtype)
    query_bias = 0.02 * torch.randn(1, heads, tokens, n_agents, device="cuda", dtype=dtype)
    inputs = [t.detach().requires_grad_() for t in (*qkv.unbind(3), agents, agent_bias, query_bias)]
    flops = 4 * batch * heads * tokens * n_agents * dim * 2  # two attention stages
    nbytes = 4 * batch * tokens * channels * qkv.element_size()  # q, k, v in, out
    peers = {
        "visattn": lambda q, k, v, a, ab, qb: functional.agent_attention(q, k, v, a, ab, qb, scale, "triton"),
        "visattn_sdpa": lambda q, k, v, a, ab, qb: functional.agent_attention(q, k, v, a, ab, qb, scale, "sdpa"),
        "official_eager": lambda q, k, v, a, ab, qb: official_eager(q, k, v, a, ab, qb, scale),
    }
    row = {"problem": name, "batch": batch, "map": size, "heads": heads, "head_dim": dim, "agents": n_agents,
           "dtype": str(dtype).removeprefix("torch."), "fwd_floor_ms": floor_ms(flops, nbytes, ceilings),
           "fwd_bwd_floor_ms": floor_ms(3.5 * flops, 2.5 * nbytes, ceilings)}
    with torch.no_grad():
        reference = functional.agent_attention(*[t.double() for t in inputs], scale=scale, backend="reference")
    for peer, fn in peers.items():
        fwd_ms, _ = op_ms_and_peak_mib(fn, inputs, backward=False)
        both_ms, peak_mib = op_ms_and_peak_mib(fn, inputs, backward=True)
        with torch.no_grad():
            err = float((fn(*inputs).double() - reference).norm() / reference.norm())
        row[peer] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "peak_mib": peak_mib,
                     "fwd_tflops": flops / fwd_ms / 1e9, "rel_err_vs_float64": err}
    return row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="bf16", type=short_dtype, choices=["bf16", "fp16"],
                        help="data type (float16 / bfloat16 are accepted too)")
    parser.add_argument("--out", default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visattn bench-agent", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    return run_peer_benchmark("agent", PROBLEMS, run_problem, ("visattn", "visattn_sdpa", "official_eager"),
                              "rel_err_vs_float64", args.dtype, args.out)
