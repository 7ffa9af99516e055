"""Agent Attention module (Han et al., ECCV 2024), the Agent-Swin form, on ``[B, H, W, C]``.

Agents are the adaptive average pool of q to ``sqrt(agent_num)``² positions. Agents attend the keys with a
position bias (``an_bias`` bilinearly resized to the map, plus the separable ``ah_bias + aw_bias``); queries attend
the agents with the transposed counterparts (``na_bias``, ``ha_bias + wa_bias``); a 3×3 depthwise conv of v is
added before the output projection. Parameter names follow the official module, so its checkpoints load as is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from visattn import functional
from visattn.nn import _args

_BIAS_GRID = 7  # an_bias / na_bias are stored on a 7×7 grid and resized to the map


class AgentAttention(nn.Module):
    """Agent attention over a ``window_size = (H, W)`` map (the whole feature map in Agent-Swin)."""

    def __init__(self, dim: int, num_heads: int, window_size: _args.IntOrTuple, agent_num: int = 49,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(dim, num_heads)
        self.window_size = _args.int_tuple(window_size, 2, "window_size")
        self.agent_num = _args.positive_int(agent_num, "agent_num")
        pool = math.isqrt(self.agent_num)
        if pool * pool != self.agent_num:
            raise ValueError(f"agent_num must be a perfect square (agents are a pooled square grid), got {agent_num}")
        _args.no_attn_drop(attn_drop)
        self.backend = _args.backend_name(backend)
        self.scale = _args.scale_or_default(qk_scale, self.head_dim)
        height, width = self.window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _BIAS_GRID, _BIAS_GRID))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, _BIAS_GRID, _BIAS_GRID))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, height, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, width))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, height, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, width, agent_num))
        for bias in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(bias, std=0.02)
        self.pool = nn.AdaptiveAvgPool2d((pool, pool))

    def biases(self) -> tuple[Tensor, Tensor]:
        """(agent_bias ``[1, heads, A, N]``, query_bias ``[1, heads, N, A]``) for the configured map."""
        heads, agents = self.num_heads, self.agent_num
        resize = lambda t: F.interpolate(t, size=self.window_size, mode="bilinear").reshape(1, heads, agents, -1)
        agent_bias = resize(self.an_bias) + (self.ah_bias + self.aw_bias).reshape(1, heads, agents, -1)
        separable = (self.ha_bias + self.wa_bias).reshape(1, heads, -1, agents)
        query_bias = resize(self.na_bias).transpose(-1, -2) + separable
        return agent_bias, query_bias

    def forward(self, x: Tensor) -> Tensor:
        _args.check_input(x, 2, self.dim, "AgentAttention")
        if tuple(x.shape[1:3]) != self.window_size:
            raise ValueError(f"AgentAttention: x's spatial size {tuple(x.shape[1:3])} must equal window_size "
                             f"{self.window_size} (the position biases are tied to it)")
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).view(batch, height, width, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)
        pooled = self.pool(q.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2))  # [B, C, p, p]
        agents = pooled.flatten(2).transpose(1, 2).reshape(batch, self.agent_num, self.num_heads, self.head_dim)
        agent_bias, query_bias = self.biases()
        out = functional.agent_attention(q, k, v, agents, agent_bias.to(q.dtype), query_bias.to(q.dtype),
                                         scale=self.scale, backend=self.backend)
        v_map = v.reshape(batch, height, width, self.dim).permute(0, 3, 1, 2)
        out = out.reshape(batch, height, width, self.dim) + self.dwc(v_map).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, agent_num={self.agent_num}"
