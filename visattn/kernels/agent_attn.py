"""Agent attention (Han et al., ECCV 2024) in Triton: both softmax stages fused, no logits or bias copies in memory.

Stage A (agents attend keys) is a flash-attention pass with the few agents as queries, one program per
(batch, head) streaming the N keys with an online softmax; it leaves the agent values (float32) and their log2-LSE.
Stage B (queries attend agents) needs no online softmax: all agents (at most 256) fit one tile, so a program takes
a tile of queries, the exact row softmax over the agents and the product with the agent values.

Backward, one program per (batch, head), deterministic (no atomics): stage B's loop over query tiles writes dQ and
accumulates d(agents) and d(agent values) in registers (delta = rowsum(P * dP): the row sees all agents), then
stage A's loop over key tiles writes dK, dV and adds its share of d(agents) (FA2 with the saved LSE). The bias
gradients are the logit gradients dS, written per batch item in float32 and summed to the bias's broadcast shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from visattn.kernels.tiles import agent_tiles, dot_precision

_LOG2E = 1.4426950408889634
# Launch options per kernel; benchmarks/tune_small_kernels.py on the H200 found Triton's defaults (4 warps,
# 3 stages) best at Agent-Swin-T's stages.
LAUNCH: dict[str, dict[str, int]] = {"values": {}, "output": {}, "bwd": {}}


@triton.jit
def _rows(base, rows, s_row, cols, s_col, n_rows, n_cols):
    """A [len(rows), len(cols)] tile ``base[rows * s_row + cols * s_col]``, zero outside (n_rows, n_cols)."""
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _bias(base, rows, s_row, cols, s_col, n_rows, n_cols, HAS_BIAS: tl.constexpr):
    """An additive-bias tile in log2 units (zeros without a bias)."""
    if HAS_BIAS:
        return _rows(base, rows, s_row, cols, s_col, n_rows, n_cols).to(tl.float32) * 1.4426950408889634
    return tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)


@triton.jit
def _agent_values_kernel(K, V, AG, AB, AV, LSE,
                         k_b, k_n, k_h, v_b, v_n, v_h, a_b, a_a, a_h, ab_b, ab_h, ab_a, ab_n,
                         HEADS, N, A, qk_scale, HEAD_D, HEAD_DV,
                         BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Stage A of one (batch, head): the agents' online softmax over all keys; writes AV (float32) and log2-LSE."""
    b, h = tl.program_id(0) // HEADS, tl.program_id(0) % HEADS
    ag, d, dv = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    agents = _rows(AG + b.to(tl.int64) * a_b + h * a_h, ag, a_a, d, 1, A, HEAD_D)
    k_base, v_base = K + b.to(tl.int64) * k_b + h * k_h, V + b.to(tl.int64) * v_b + h * v_h
    bias_base = AB + b.to(tl.int64) * ab_b + h * ab_h
    m_i = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    acc = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        k = _rows(k_base, keys, k_n, d, 1, N, HEAD_D)
        v = _rows(v_base, keys, v_n, dv, 1, N, HEAD_DV)
        s = tl.dot(agents, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s += _bias(bias_base, ag, ab_a, keys, ab_n, A, N, HAS_BIAS)
        s = tl.where(keys[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # the first tile has a valid key: never -inf
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    head = (b * HEADS + h).to(tl.int64)
    tl.store(AV + head * BLOCK_A * BLOCK_DV + ag[:, None] * BLOCK_DV + dv[None, :], acc / l_i[:, None])
    tl.store(LSE + head * BLOCK_A + ag, m_i + tl.log2(l_i))


@triton.jit
def _agent_output_kernel(Q, AG, QB, AV, OUT,
                         q_b, q_n, q_h, a_b, a_a, a_h, qb_b, qb_h, qb_n, qb_a, o_b, o_n, o_h,
                         HEADS, N, A, qk_scale, HEAD_D, HEAD_DV,
                         BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Stage B of one query tile: exact softmax over every agent, times the agent values."""
    b, h = tl.program_id(1) // HEADS, tl.program_id(1) % HEADS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ag, d, dv = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q = _rows(Q + b.to(tl.int64) * q_b + h * q_h, rows, q_n, d, 1, N, HEAD_D)
    agents = _rows(AG + b.to(tl.int64) * a_b + h * a_h, ag, a_a, d, 1, A, HEAD_D)
    head = (b * HEADS + h).to(tl.int64)
    agent_values = tl.load(AV + head * BLOCK_A * BLOCK_DV + ag[:, None] * BLOCK_DV + dv[None, :])
    s = tl.dot(q, tl.trans(agents), input_precision=DOT_PREC) * qk_scale
    s += _bias(QB + b.to(tl.int64) * qb_b + h * qb_h, rows, qb_n, ag, qb_a, N, A, HAS_BIAS)
    s = tl.where(ag[None, :] < A, s, float("-inf"))
    p = tl.math.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    out = tl.dot(p.to(q.dtype), agent_values.to(q.dtype), input_precision=DOT_PREC)
    tl.store(OUT + b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_n + dv[None, :],
             out.to(OUT.dtype.element_ty), mask=(rows[:, None] < N) & (dv[None, :] < HEAD_DV))


@triton.jit
def _agent_bwd_kernel(Q, K, V, AG, AB, QB, AV, LSE, DO, DQ, DK, DV, DAG, DAB, DQB,
                      q_b, q_n, q_h, k_b, k_n, k_h, v_b, v_n, v_h, a_b, a_a, a_h,
                      ab_b, ab_h, ab_a, ab_n, qb_b, qb_h, qb_n, qb_a, g_b, g_n, g_h,
                      HEADS, N, A, qk_scale, scale, HEAD_D, HEAD_DV,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_AB: tl.constexpr, HAS_QB: tl.constexpr,
                      GRAD_AB: tl.constexpr, GRAD_QB: tl.constexpr, DOT_PREC: tl.constexpr):
    """Backward of one (batch, head): stage B over query tiles, then stage A over key tiles (module docstring).

    dQ / dK / dV are contiguous ``[B, N, heads, D]``; d(agents) float32 ``[B, heads, BLOCK_A, BLOCK_D]``; the bias
    gradients float32 ``[B, heads, A, N]`` / ``[B, heads, N, A]``."""
    b, h = tl.program_id(0) // HEADS, tl.program_id(0) % HEADS
    head = (b * HEADS + h).to(tl.int64)
    ag, d, dv = tl.arange(0, BLOCK_A), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    agents = _rows(AG + b.to(tl.int64) * a_b + h * a_h, ag, a_a, d, 1, A, HEAD_D)
    agent_values = tl.load(AV + head * BLOCK_A * BLOCK_DV + ag[:, None] * BLOCK_DV + dv[None, :])
    av_lp = agent_values.to(agents.dtype)
    d_agents = tl.zeros([BLOCK_A, BLOCK_D], tl.float32)
    d_values = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    grad_stride_d = HEAD_D * HEADS  # the gradients are contiguous [B, N, heads, D]
    # ---- stage B: queries -> agents
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q = _rows(Q + b.to(tl.int64) * q_b + h * q_h, rows, q_n, d, 1, N, HEAD_D)
        do = _rows(DO + b.to(tl.int64) * g_b + h * g_h, rows, g_n, dv, 1, N, HEAD_DV)
        s = tl.dot(q, tl.trans(agents), input_precision=DOT_PREC) * qk_scale
        s += _bias(QB + b.to(tl.int64) * qb_b + h * qb_h, rows, qb_n, ag, qb_a, N, A, HAS_QB)
        s = tl.where(ag[None, :] < A, s, float("-inf"))
        p = tl.math.exp2(s - tl.max(s, 1)[:, None])
        p = tl.where(row_ok[:, None], p / tl.sum(p, 1)[:, None], 0.0)
        dp = tl.dot(do, tl.trans(av_lp), input_precision=DOT_PREC)
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
        dq = tl.dot(ds.to(q.dtype), agents, input_precision=DOT_PREC) * scale
        tl.store(DQ + b.to(tl.int64) * N * grad_stride_d + h * HEAD_D + rows[:, None] * grad_stride_d + d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < HEAD_D))
        d_agents += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale
        d_values += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        if GRAD_QB:
            tl.store(DQB + head * N * A + rows[:, None] * A + ag[None, :], ds,
                     mask=row_ok[:, None] & (ag[None, :] < A))
    # ---- stage A: agents -> keys (FA2 backward with the saved LSE; delta = rowsum(dAV * AV))
    lse = tl.load(LSE + head * BLOCK_A + ag)
    delta = tl.sum(d_values * agent_values, 1)
    dav_lp = d_values.to(agents.dtype)
    grad_stride_v = HEAD_DV * HEADS
    for n0 in range(0, N, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        k = _rows(K + b.to(tl.int64) * k_b + h * k_h, keys, k_n, d, 1, N, HEAD_D)
        v = _rows(V + b.to(tl.int64) * v_b + h * v_h, keys, v_n, dv, 1, N, HEAD_DV)
        s = tl.dot(agents, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s += _bias(AB + b.to(tl.int64) * ab_b + h * ab_h, ag, ab_a, keys, ab_n, A, N, HAS_AB)
        p = tl.where((ag[:, None] < A) & key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dvk = tl.dot(tl.trans(p.to(v.dtype)), dav_lp, input_precision=DOT_PREC)
        dp = tl.dot(dav_lp, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(k.dtype)), agents, input_precision=DOT_PREC) * scale
        d_agents += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
        tl.store(DK + b.to(tl.int64) * N * grad_stride_d + h * HEAD_D + keys[:, None] * grad_stride_d + d[None, :],
                 dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (d[None, :] < HEAD_D))
        tl.store(DV + b.to(tl.int64) * N * grad_stride_v + h * HEAD_DV + keys[:, None] * grad_stride_v + dv[None, :],
                 dvk.to(DV.dtype.element_ty), mask=key_ok[:, None] & (dv[None, :] < HEAD_DV))
        if GRAD_AB:
            tl.store(DAB + head * A * N + ag[:, None] * N + keys[None, :], ds,
                     mask=(ag[:, None] < A) & key_ok[None, :])
    tl.store(DAG + head * BLOCK_A * BLOCK_D + ag[:, None] * BLOCK_D + d[None, :], d_agents)


# ------------------------------------------------------------------------------------------------ launchers
def _bias_view(bias: Tensor | None, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The bias broadcast to ``shape`` (a view: broadcast dims get stride 0) and its 4 strides; a dummy without."""
    if bias is None:
        return like, (0, 0, 0, 0)
    view = bias.expand(shape)
    return view, tuple(view.stride())


def _unit_last(t: Tensor) -> Tensor:
    """The kernels address the last dim with stride 1 (every other stride is passed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat(t: Tensor) -> Tensor:
    """``[B, *spatial, heads, D]`` as ``[B, N, heads, D]`` (a view whenever the spatial dims are mergeable)."""
    return _unit_last(t.reshape(t.shape[0], -1, t.shape[-2], t.shape[-1]))


def _forward(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None,
             query_bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Fused agent attention on ``[B, N, heads, D]`` tokens; returns (out, agent values float32
    ``[B, heads, BLOCK_A, BLOCK_DV]``, log2-LSE of stage A ``[B, heads, BLOCK_A]``)."""
    batch, n, heads, head_d = q.shape
    n_agents, head_dv = agents.shape[1], v.shape[-1]
    t = agent_tiles(n_agents, head_d, head_dv, q.dtype)
    av = torch.empty(batch, heads, t["BLOCK_A"], t["BLOCK_DV"], device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, t["BLOCK_A"], device=q.device, dtype=torch.float32)
    out = torch.empty(batch, n, heads, head_dv, device=q.device, dtype=q.dtype)
    ab, ab_strides = _bias_view(agent_bias, (batch, heads, n_agents, n), q)
    qb, qb_strides = _bias_view(query_bias, (batch, heads, n, n_agents), q)
    tiles = dict(BLOCK_A=t["BLOCK_A"], BLOCK_D=t["BLOCK_D"], BLOCK_DV=t["BLOCK_DV"], DOT_PREC=dot_precision(q.dtype))
    _agent_values_kernel[(batch * heads,)](
        k, v, agents, ab, av, lse, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        agents.stride(0), agents.stride(1), agents.stride(2), *ab_strides, heads, n, n_agents, scale * _LOG2E,
        head_d, head_dv, BLOCK_N=t["tokens"], HAS_BIAS=agent_bias is not None, **tiles, **LAUNCH["values"])
    _agent_output_kernel[(triton.cdiv(n, t["tokens"]), batch * heads)](
        q, agents, qb, av, out, q.stride(0), q.stride(1), q.stride(2), agents.stride(0), agents.stride(1),
        agents.stride(2), *qb_strides, out.stride(0), out.stride(1), out.stride(2), heads, n, n_agents,
        scale * _LOG2E, head_d, head_dv, BLOCK_M=t["tokens"], HAS_BIAS=query_bias is not None, **tiles,
        **LAUNCH["output"])
    return out, av, lse


@torch.library.custom_op("visattn::agent_fwd", mutates_args=())
def agent_forward(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None,
                  query_bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward as a custom op (what ``torch.compile`` traces): see ``_forward``."""
    return _forward(q, k, v, agents, agent_bias, query_bias, scale)


@agent_forward.register_fake
def _(q, k, v, agents, agent_bias, query_bias, scale):
    t = agent_tiles(agents.shape[1], q.shape[-1], v.shape[-1], q.dtype)
    batch, n, heads, _ = q.shape
    return (q.new_empty(batch, n, heads, v.shape[-1]),
            q.new_empty(batch, heads, t["BLOCK_A"], t["BLOCK_DV"], dtype=torch.float32),
            q.new_empty(batch, heads, t["BLOCK_A"], dtype=torch.float32))


def _backward_kernels(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None,
                      query_bias: Tensor | None, av: Tensor, lse: Tensor, scale: float, grad_agent_bias: bool,
                      grad_query_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_agents, d_agent_bias ``[B, heads, A, N]`` float32, d_query_bias ``[B, heads, N, A]``
    float32); a bias gradient that is not wanted comes back empty."""
    batch, n, heads, head_d = q.shape
    n_agents, head_dv = agents.shape[1], v.shape[-1]
    t = agent_tiles(n_agents, head_d, head_dv, q.dtype)
    grad_out = _unit_last(grad_out)
    dq = q.new_empty(batch, n, heads, head_d)
    dk = k.new_empty(batch, n, heads, head_d)
    dv = v.new_empty(batch, n, heads, head_dv)
    d_agents = torch.empty(batch, heads, t["BLOCK_A"], t["BLOCK_D"], device=q.device, dtype=torch.float32)
    d_ab = q.new_empty((batch, heads, n_agents, n) if grad_agent_bias else (0,), dtype=torch.float32)
    d_qb = q.new_empty((batch, heads, n, n_agents) if grad_query_bias else (0,), dtype=torch.float32)
    ab, ab_strides = _bias_view(agent_bias, (batch, heads, n_agents, n), q)
    qb, qb_strides = _bias_view(query_bias, (batch, heads, n, n_agents), q)
    _agent_bwd_kernel[(batch * heads,)](
        q, k, v, agents, ab, qb, av, lse, grad_out, dq, dk, dv, d_agents, d_ab, d_qb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), agents.stride(0), agents.stride(1), agents.stride(2),
        *ab_strides, *qb_strides, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        heads, n, n_agents, scale * _LOG2E, scale, head_d, head_dv,
        BLOCK_M=t["tokens"], BLOCK_N=t["tokens"], BLOCK_A=t["BLOCK_A"], BLOCK_D=t["BLOCK_D"],
        BLOCK_DV=t["BLOCK_DV"], HAS_AB=agent_bias is not None, HAS_QB=query_bias is not None,
        GRAD_AB=grad_agent_bias, GRAD_QB=grad_query_bias, DOT_PREC=dot_precision(q.dtype), **LAUNCH["bwd"])
    # contiguous [B, A, heads, D] whatever the dtype (the fake says so; .to() of an unchanged dtype would not copy)
    d_agents = d_agents[:, :, :n_agents, :head_d].transpose(1, 2).contiguous().to(agents.dtype)
    return dq, dk, dv, d_agents, d_ab, d_qb


@torch.library.custom_op("visattn::agent_bwd", mutates_args=())
def agent_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None,
                   query_bias: Tensor | None, av: Tensor, lse: Tensor, scale: float, grad_agent_bias: bool,
                   grad_query_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward as a custom op: see ``_backward_kernels``."""
    return _backward_kernels(grad_out, q, k, v, agents, agent_bias, query_bias, av, lse, scale, grad_agent_bias,
                             grad_query_bias)


@agent_backward.register_fake
def _(grad_out, q, k, v, agents, agent_bias, query_bias, av, lse, scale, grad_agent_bias, grad_query_bias):
    batch, n, heads, _ = q.shape
    n_agents = agents.shape[1]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            agents.new_empty(batch, n_agents, heads, agents.shape[-1]),
            q.new_empty((batch, heads, n_agents, n) if grad_agent_bias else (0,), dtype=torch.float32),
            q.new_empty((batch, heads, n, n_agents) if grad_query_bias else (0,), dtype=torch.float32))


def _bias_grads(d_ab: Tensor, d_qb: Tensor, want: tuple[bool, bool], agent_bias, query_bias):
    """The float32 per-batch-item bias gradients summed to each bias's (broadcast) shape and dtype."""
    return tuple(grad.sum_to_size(bias.shape).to(bias.dtype) if wanted else None
                 for grad, wanted, bias in zip((d_ab, d_qb), want, (agent_bias, query_bias), strict=True))


def _setup_context(ctx, inputs, output):
    q, k, v, agents, agent_bias, query_bias, scale = inputs
    ctx.save_for_backward(q, k, v, agents, agent_bias, query_bias, output[1], output[2])
    ctx.scale = scale


def _backward(ctx, grad_out, grad_av, grad_lse):
    q, k, v, agents, agent_bias, query_bias, av, lse = ctx.saved_tensors
    want = (agent_bias is not None and ctx.needs_input_grad[4], query_bias is not None and ctx.needs_input_grad[5])
    dq, dk, dv, d_agents, d_ab, d_qb = agent_backward(grad_out, q, k, v, agents, agent_bias, query_bias, av, lse,
                                                      ctx.scale, *want)
    return (dq, dk, dv, d_agents, *_bias_grads(d_ab, d_qb, want, agent_bias, query_bias), None)


agent_forward.register_autograd(_backward, setup_context=_setup_context)


class _AgentAttention(torch.autograd.Function):
    """The custom op's forward/backward for eager mode, without ``torch.library`` dispatch (its host time is
    comparable to these kernels' GPU time at Agent-Swin's small stages; see ops._LocalAttention)."""

    @staticmethod
    def forward(ctx, q, k, v, agents, agent_bias, query_bias, scale: float):
        out, av, lse = _forward(q, k, v, agents, agent_bias, query_bias, scale)
        ctx.save_for_backward(q, k, v, agents, agent_bias, query_bias, av, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, agents, agent_bias, query_bias, av, lse = ctx.saved_tensors
        want = (agent_bias is not None and ctx.needs_input_grad[4],
                query_bias is not None and ctx.needs_input_grad[5])
        dq, dk, dv, d_agents, d_ab, d_qb = _backward_kernels(grad_out, q, k, v, agents, agent_bias, query_bias, av,
                                                             lse, ctx.scale, *want)
        return (dq, dk, dv, d_agents, *_bias_grads(d_ab, d_qb, want, agent_bias, query_bias), None)


def agent_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor | None,
                    query_bias: Tensor | None, scale: float) -> Tensor:
    """Backend entry: ``[B, *spatial, heads, D]`` in, same layout out (biases as the public op takes them). The
    custom op while ``torch.compile`` traces, the equivalent ``autograd.Function`` in eager mode."""
    spatial = q.shape[1:-2]
    args = (_flat(q), _flat(k), _flat(v), _unit_last(agents), agent_bias, query_bias, float(scale))
    if torch.compiler.is_compiling():
        out = agent_forward(*args)[0]
    else:
        out = _AgentAttention.apply(*args)
    return out.reshape(q.shape[0], *spatial, q.shape[-2], v.shape[-1])
