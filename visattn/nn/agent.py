"""Agent Attention module (Han et al., ECCV 2024), the Agent-Swin form, on ``[B, H, W, C]``.

Agents are the adaptive average pool of q to ``sqrt(agent_num)``² positions. Agents attend the keys with a
position bias (``an_bias`` bilinearly resized to the map, plus the separable ``ah_bias + aw_bias``); queries attend
the agents with the transposed counterparts (``na_bias``, ``ha_bias + wa_bias``); a 3×3 depthwise conv of v is
added before the output projection. Argument and parameter names follow the official module
(LeapLabTHU/Agent-Attention, ``agent_swin.py``), so its checkpoints load as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from visattn import functional
from visattn.caching import cached
from visattn.nn import _args

BIAS_GRID = 7  # an_bias / na_bias are stored on a 7×7 grid and resized to the map
_POOL_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _pool_matrix(height: int, width: int, pool: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of an (height, width) map to (pool, pool) bins as a 0/1 membership matrix
    ``[pool², height*width]`` (exact in any dtype) and the bins' reciprocal areas ``[pool²]`` (float64).
    Bins follow ``nn.AdaptiveAvgPool2d``: rows ``floor(i*H/p) .. ceil((i+1)*H/p)`` (neighbouring bins may share one)."""
    def bins(length: int) -> Tensor:
        i = torch.arange(pool, device=device)[:, None]
        pos = torch.arange(length, device=device)[None, :]
        return ((pos >= (i * length) // pool) & (pos < -((-(i + 1) * length) // pool))).float()  # [pool, length]

    rows, cols = bins(height), bins(width)
    member = (rows[:, None, :, None] * cols[None, :, None, :]).reshape(pool * pool, height * width)
    return member, 1.0 / member.double().sum(1)


def agent_position_biases(module: nn.Module, key_size: Sequence[int], query_size: Sequence[int]
                          ) -> tuple[Tensor, Tensor]:
    """(agent_bias ``[1, heads, A, keys]``, query_bias ``[1, heads, queries, A]``) from ``module``'s official
    Agent-Attention parameters: ``an_bias`` / ``na_bias`` (7×7 grids, bilinearly resized to ``key_size`` /
    ``query_size``) plus the separable ``ah_bias + aw_bias`` / ``ha_bias + wa_bias`` (4-D or the official 5-D)."""
    heads, agents = module.an_bias.shape[:2]

    def resized(bias: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(bias, size=tuple(size), mode="bilinear").reshape(1, heads, agents, -1)

    agent_bias = resized(module.an_bias, key_size) + (module.ah_bias + module.aw_bias).reshape(1, heads, agents, -1)
    query_bias = (resized(module.na_bias, query_size).transpose(-1, -2)
                  + (module.ha_bias + module.wa_bias).reshape(1, heads, -1, agents))
    return agent_bias, query_bias


def pool_agents(q: Tensor, pool: int) -> Tensor:
    """Agent tokens: the adaptive average pool of ``q`` ``[B, H, W, heads, D]`` to ``pool × pool`` positions,
    ``[B, pool², heads, D]``, as ``nn.AdaptiveAvgPool2d`` computes them.

    One GEMM with a 0/1 membership matrix, then the division by the bin area in float32 (float64 for float64):
    reads q in place (a strided view of a fused qkv projection is fine) where the NHWC adaptive-pool kernel needs
    a channels-last copy.
    """
    batch, height, width, heads, dim = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    key = (height, width, pool, str(q.device), q.dtype)

    def build() -> tuple[Tensor, Tensor]:
        member, inv_area = _pool_matrix(height, width, pool, q.device)
        return member.to(q.dtype), inv_area.to(compute)  # per dtype: no cast per call

    # never a fake, traced or inference tensor in the cache (visattn.caching.cached)
    member, inv_area = cached(_POOL_CACHE, key, build, q)
    sums = torch.matmul(member, q.reshape(batch, height * width, heads * dim))  # [B, pool², C]
    return (sums.to(compute) * inv_area[:, None]).to(q.dtype).reshape(batch, pool * pool, heads, dim)


class AgentAttention(nn.Module):
    """Agent attention over a ``window_size = (H, W)`` map (the whole feature map in Agent-Swin).

    Same arguments, order and parameters as the official ``AgentAttention(dim, window_size, num_heads,
    qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, shift_size=0, agent_num=49)``; ``backend`` is
    keyword-only. Differences: ``forward`` also takes the map as ``[B, H, W, C]``; a given ``qk_scale`` is used (the
    official module ignores it and always uses ``head_dim ** -0.5``); ``attn_drop`` must be 0.

    Args:
        dim: channels ``C``.
        window_size: int or ``(H, W)``, the map size the position biases are tied to.
        num_heads: attention heads; must divide ``dim``.
        qkv_bias: bias on the fused qkv Linear (default True).
        qk_scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        attn_drop: must be 0: the fused path never materialises attention probabilities.
        proj_drop: dropout rate after the output projection, in [0, 1).
        shift_size: a non-negative int, accepted for the official signature and unused, as there: the module
            attends the whole ``window_size`` map (a surrounding block would do any shifting).
        agent_num: number of agent tokens, a perfect square (agents are a pooled square grid); default 49.
        backend: keyword-only, None/"auto", "triton", "sdpa", "reference" (see :func:`visattn.agent_attention`).
    """

    @_args.factory_kwargs
    def __init__(self, dim: int, window_size: _args.IntOrTuple, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, shift_size: int = 0,
                 agent_num: int = 49, *, backend: str | None = None):
        super().__init__()
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(dim, num_heads, "dim")
        self.window_size = _args.int_tuple(window_size, 2, "window_size")
        self.shift_size = _args.non_negative_int(shift_size, "shift_size")
        self.agent_num = _args.positive_int(agent_num, "agent_num")
        pool = math.isqrt(self.agent_num)
        if pool * pool != self.agent_num:
            raise ValueError(f"agent_num must be a perfect square (agents are a pooled square grid), got {agent_num}")
        _args.check_flag(qkv_bias, "qkv_bias")
        _args.no_attn_drop(attn_drop)
        self.backend = _args.check_backend(backend, "AgentAttention", allow_sdpa=True)
        self.scale = _args.check_scale(qk_scale, self.head_dim, "qk_scale")
        height, width = self.window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, BIAS_GRID, BIAS_GRID))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, BIAS_GRID, BIAS_GRID))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, height, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, width))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, height, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, width, agent_num))
        for bias in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(bias, std=0.02)
        self.pool = nn.AdaptiveAvgPool2d((pool, pool))

    def biases(self) -> tuple[Tensor, Tensor]:
        """(agent_bias ``[1, heads, A, N]``, query_bias ``[1, heads, N, A]``) for the configured map."""
        return agent_position_biases(self, self.window_size, self.window_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B, H, W, dim]``, or the official ``[B, H*W, dim]`` tokens -> the same shape.

        ``mask`` exists for the official signature and must be None (the official module ignores it; refusing it
        here keeps a shifted-window mask from being dropped silently).
        """
        if mask is not None:
            raise ValueError("AgentAttention: mask must be None (agent attention attends the whole map; a "
                             "shifted-window mask cannot apply)")
        height, width = self.window_size
        tokens_in = isinstance(x, Tensor) and x.dim() == 3
        if tokens_in:
            if x.shape[1] != height * width or x.shape[-1] != self.dim:
                raise ValueError(f"AgentAttention: token input x must have shape [B, {height * width}, {self.dim}] "
                                 f"for window_size {self.window_size}, got {tuple(x.shape)}")
            x = x.reshape(x.shape[0], height, width, self.dim)
        _args.check_input(x, 2, self.dim, "AgentAttention")
        if tuple(x.shape[1:3]) != self.window_size:
            raise ValueError(f"AgentAttention: x's spatial size {tuple(x.shape[1:3])} must equal window_size "
                             f"{self.window_size} (the position biases are tied to it)")
        batch = x.shape[0]
        qkv = self.qkv(x).view(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)
        agents = pool_agents(q, self.pool.output_size[0])  # = self.pool (AdaptiveAvgPool2d) of q, without a copy
        agent_bias, query_bias = self.biases()
        out = functional.agent_attention(q, k, v, agents, agent_bias.to(q.dtype), query_bias.to(q.dtype),
                                         scale=self.scale, backend=self.backend)
        v_map = v.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
        out = out.reshape(batch, height, width, self.dim) + self.dwc(v_map).permute(0, 2, 3, 1)
        out = self.proj_drop(self.proj(out))
        return out.reshape(batch, height * width, self.dim) if tokens_in else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, agent_num={self.agent_num}"
