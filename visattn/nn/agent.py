"""Agent Attention module (Han et al., ECCV 2024) on ``[B, H, W, C]``: the one agent-attention module that the
Agent-Swin, Agent-PVT and Agent-DeiT families configure.

Agents are the adaptive average pool of q to ``sqrt(agent_num)``² positions. Agents attend the keys with a
position bias (``an_bias`` bilinearly resized to the key map, plus the separable ``ah_bias + aw_bias``); queries
attend the agents with the transposed counterparts (``na_bias``, ``ha_bias + wa_bias``); a 3×3 depthwise conv of v
is added before the output projection. Argument and parameter names follow the official modules
(LeapLabTHU/Agent-Attention, ``agent_swin.py``, ``agent_pvt.py``, ``agent_deit.py``), so their checkpoints load as is.

One bias layout: the separable biases are 4-D, ``ah_bias [heads, A, Hk, 1]``, ``aw_bias [heads, A, 1, Wk]``,
``ha_bias [heads, Hq, 1, A]``, ``wa_bias [heads, 1, Wq, A]`` (``SEPARABLE_BIAS_AXIS`` names each one's spatial axis).
The official tensors carry a leading 1 (5-D), which ``model.to(memory_format=torch.channels_last)`` refuses; a 5-D
tensor in a loaded state dict is squeezed to this layout.
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
SEPARABLE_BIAS_AXIS = {"ah_bias": 2, "aw_bias": 3, "ha_bias": 1, "wa_bias": 2}  # the spatial axis, 4-D layout
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



def add_position_biases(module: nn.Module, num_heads: int, agent_num: int, key_size: Sequence[int],
                        query_size: Sequence[int]) -> None:
    """The official Agent-Attention position biases as parameters of ``module`` (trunc-normal, std 0.02):
    ``an_bias`` / ``na_bias`` ``[heads, A, 7, 7]``, and in the 4-D layout ``ah_bias`` / ``aw_bias`` (agents -> keys,
    sized by ``key_size``) and ``ha_bias`` / ``wa_bias`` (queries -> agents, sized by ``query_size``)."""
    grid = BIAS_GRID
    shapes = dict(an_bias=(num_heads, agent_num, grid, grid), na_bias=(num_heads, agent_num, grid, grid),
                  ah_bias=(num_heads, agent_num, key_size[0], 1), aw_bias=(num_heads, agent_num, 1, key_size[1]),
                  ha_bias=(num_heads, query_size[0], 1, agent_num), wa_bias=(num_heads, 1, query_size[1], agent_num))
    for name, shape in shapes.items():
        setattr(module, name, nn.Parameter(trunc_normal_(torch.zeros(shape), std=0.02)))


def squeeze_official_biases(state_dict: dict, prefix: str = "") -> None:
    """In place: the official 5-D separable biases ``[1, heads, ...]`` under ``prefix`` -> the 4-D layout."""
    for name in SEPARABLE_BIAS_AXIS:
        value = state_dict.get(prefix + name)
        if isinstance(value, Tensor) and value.dim() == 5 and value.shape[0] == 1:
            state_dict[prefix + name] = value.squeeze(0)


def _reduced_key_attention(q: Tensor, k: Tensor, v: Tensor, agents: Tensor, agent_bias: Tensor, query_bias: Tensor,
                           scale: float, backend: str) -> Tensor:
    """Agent attention whose keys come from a spatially reduced map (``sr_ratio > 1``), outside what
    :func:`visattn.functional.agent_attention` takes (keys of the query's shape): the same two softmax attentions as
    two ``scaled_dot_product_attention`` calls, or explicit float32/float64 matmuls for ``backend="reference"``."""
    if backend == "triton":
        raise ValueError("backend='triton': the Triton agent kernel takes keys of the query's shape; keys from a "
                         "reduced map (sr_ratio > 1) run as two SDPA calls; use 'auto', 'sdpa' or 'reference'")
    batch, heads = q.shape[0], q.shape[-2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    def as_bhnd(t: Tensor) -> Tensor:
        t = t.reshape(batch, -1, heads, t.shape[-1]).transpose(1, 2)
        return t.to(compute) if backend == "reference" else t

    if backend == "reference":
        agent_values = torch.softmax(as_bhnd(agents) @ as_bhnd(k).transpose(-1, -2) * scale
                                     + agent_bias.to(compute), dim=-1) @ as_bhnd(v)
        out = torch.softmax(as_bhnd(q) @ as_bhnd(agents).transpose(-1, -2) * scale + query_bias.to(compute),
                            dim=-1) @ agent_values
    else:
        sdpa = F.scaled_dot_product_attention
        agent_values = sdpa(as_bhnd(agents), as_bhnd(k), as_bhnd(v), attn_mask=agent_bias.to(q.dtype), scale=scale)
        out = sdpa(as_bhnd(q), as_bhnd(agents), agent_values, attn_mask=query_bias.to(q.dtype), scale=scale)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)


class SpatialReduction(nn.Module):
    """PVT's key/value source, mixed into an attention module: the map itself, or (``sr_ratio > 1``) a conv with
    kernel = stride = ``sr_ratio`` + LayerNorm as the module's own ``sr`` / ``norm`` (PVT's names); NHWC in and
    out. Used by :class:`AgentAttention` and by Agent-PVT's spatial-reduction attention."""

    def _init_reduction(self, dim: int, sr_ratio: int) -> None:
        if isinstance(sr_ratio, bool) or not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive int, got {sr_ratio!r}")
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _reduce(self, x: Tensor) -> Tensor:
        if self.sr_ratio == 1:
            return x
        return self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class AgentAttention(SpatialReduction):
    """Agent attention over a ``window_size = (H, W)`` map (the whole feature map in Agent-Swin).

    Same arguments, order and parameters as the official ``AgentAttention(dim, window_size, num_heads,
    qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0, shift_size=0, agent_num=49)``; visattn's options
    are keyword-only. Differences: ``forward`` also takes the map as ``[B, H, W, C]``; a given ``qk_scale`` is used
    (the official module ignores it and always uses ``head_dim ** -0.5``); ``attn_drop`` must be 0. The keyword
    options give Agent-PVT's form (``fused_qkv=False``, ``sr_ratio``) and Agent-DeiT's (``class_token=True``).

    Args:
        dim: channels ``C``.
        window_size: int or ``(H, W)``, the map size the position biases are tied to.
        num_heads: attention heads; must divide ``dim``.
        qkv_bias: bias on the q/k/v projections (default True).
        qk_scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        attn_drop: must be 0: the fused path never materialises attention probabilities.
        proj_drop: dropout rate after the output projection, in [0, 1).
        shift_size: a non-negative int, accepted for the official signature and unused, as there: the module
            attends the whole ``window_size`` map (a surrounding block would do any shifting).
        agent_num: number of agent tokens, a perfect square (agents are a pooled square grid); default 49.
        fused_qkv: keyword-only. True (default, Agent-Swin / Agent-DeiT): one ``qkv`` Linear (dim -> 3 dim).
            False (Agent-PVT): a ``q`` Linear (dim -> dim) on the map and a ``kv`` Linear (dim -> 2 dim) on the
            (possibly reduced) key map.
        sr_ratio: keyword-only, Agent-PVT's key/value spatial reduction: 1 (default) none; > 1 takes k and v from
            the map reduced by an ``sr`` conv (kernel = stride = sr_ratio) + ``norm`` LayerNorm, sizes
            ``ah_bias`` / ``aw_bias`` for the reduced map and upsamples the depthwise-conv input bilinearly back to
            the map. Must divide both sides of ``window_size``; needs ``fused_qkv=False``. Such keys run as two
            SDPA calls (or the float reference with ``backend="reference"``); ``backend="triton"`` raises then.
        class_token: keyword-only, Agent-DeiT's form (default False): ``forward`` takes ``[B, 1 + H*W, C]`` tokens,
            a class token first. Agents pool the patch queries only; agents attend the class key with ``ac_bias``
            ``[1, heads, A, 1]`` and the class query attends the agents with ``ca_bias`` ``[1, heads, 1, A]``; the
            depthwise conv adds to the patch outputs only.
        backend: keyword-only, None/"auto", "triton", "sdpa", "reference" (see :func:`visattn.agent_attention`).
    """

    @_args.factory_kwargs
    def __init__(self, dim: int, window_size: _args.IntOrTuple, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, shift_size: int = 0,
                 agent_num: int = 49, *, fused_qkv: bool = True, sr_ratio: int = 1, class_token: bool = False,
                 backend: str | None = None):
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
        self.fused_qkv = _args.check_flag(fused_qkv, "fused_qkv")
        self.class_token = _args.check_flag(class_token, "class_token")
        _args.no_attn_drop(attn_drop)
        self.backend = _args.check_backend(backend, "AgentAttention", allow_sdpa=True)
        self.scale = _args.check_scale(qk_scale, self.head_dim, "qk_scale")
        self._init_reduction(dim, sr_ratio)
        if any(s % sr_ratio for s in self.window_size):
            raise ValueError(f"sr_ratio={sr_ratio} must divide the map size {self.window_size}")
        if sr_ratio > 1 and fused_qkv:
            raise ValueError(f"sr_ratio={sr_ratio} takes k and v from a reduced map: it needs fused_qkv=False")
        if class_token and (sr_ratio > 1 or not fused_qkv):
            raise ValueError("class_token=True (Agent-DeiT's form) takes fused_qkv=True and sr_ratio=1")
        self.kv_size = (self.window_size[0] // sr_ratio, self.window_size[1] // sr_ratio)
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        add_position_biases(self, num_heads, agent_num, self.kv_size, self.window_size)
        if class_token:
            self.ac_bias = nn.Parameter(trunc_normal_(torch.zeros(1, num_heads, agent_num, 1), std=0.02))
            self.ca_bias = nn.Parameter(trunc_normal_(torch.zeros(1, num_heads, 1, agent_num), std=0.02))
        self.pool = nn.AdaptiveAvgPool2d((pool, pool))

    def biases(self) -> tuple[Tensor, Tensor]:
        """(agent_bias ``[1, heads, A, keys]``, query_bias ``[1, heads, queries, A]``) for the configured map; with
        ``class_token`` the class token's entries come first."""
        agent_bias, query_bias = agent_position_biases(self, self.kv_size, self.window_size)
        if self.class_token:
            return torch.cat([self.ac_bias, agent_bias], dim=-1), torch.cat([self.ca_bias, query_bias], dim=-2)
        return agent_bias, query_bias

    def _check_x(self, x: Tensor) -> bool:
        """Validate ``x``; True when it is the token form."""
        height, width = self.window_size
        if self.class_token:
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1:] != (1 + height * width, self.dim):
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"AgentAttention: with class_token, x must have shape [B, 1 + {height}*{width}, "
                                 f"{self.dim}] for window_size {self.window_size}, got {got}")
            return True
        if isinstance(x, Tensor) and x.dim() == 3:
            if x.shape[1] != height * width or x.shape[-1] != self.dim:
                raise ValueError(f"AgentAttention: token input x must have shape [B, {height * width}, {self.dim}] "
                                 f"for window_size {self.window_size}, got {tuple(x.shape)}")
            return True
        _args.check_input(x, 2, self.dim, "AgentAttention")
        if tuple(x.shape[1:3]) != self.window_size:
            raise ValueError(f"AgentAttention: x's spatial size {tuple(x.shape[1:3])} must equal window_size "
                             f"{self.window_size} (the position biases are tied to it)")
        return False

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``[B, H, W, dim]``, or the official ``[B, H*W, dim]`` tokens (``[B, 1 + H*W, dim]`` with
        ``class_token``) -> the same shape.

        ``mask`` exists for the official signature and must be None (the official module ignores it; refusing it
        here keeps a shifted-window mask from being dropped silently).
        """
        if mask is not None:
            raise ValueError("AgentAttention: mask must be None (agent attention attends the whole map; a "
                             "shifted-window mask cannot apply)")
        tokens_in = self._check_x(x)
        height, width = self.window_size
        batch, heads, head_dim = x.shape[0], self.num_heads, self.head_dim
        if self.class_token:  # q, k, v over all 1 + H*W tokens; agents and the conv see the patches
            q, k, v = self.qkv(x).view(batch, x.shape[1], 3, heads, head_dim).unbind(2)
            patch_q, patch_v = q[:, 1:].unflatten(1, (height, width)), v[:, 1:]
        else:
            if tokens_in:
                x = x.reshape(batch, height, width, self.dim)
            if self.fused_qkv:
                q, k, v = self.qkv(x).view(batch, height, width, 3, heads, head_dim).unbind(-3)
            else:
                q = self.q(x).view(batch, height, width, heads, head_dim)
                k, v = self.kv(self._reduce(x)).view(batch, *self.kv_size, 2, heads, head_dim).unbind(-3)
            patch_q, patch_v = q, v
        agents = pool_agents(patch_q, self.pool.output_size[0])  # = self.pool (AdaptiveAvgPool2d) of q, no copy
        agent_bias, query_bias = self.biases()
        if k.shape == q.shape:
            out = functional.agent_attention(q, k, v, agents, agent_bias.to(q.dtype), query_bias.to(q.dtype),
                                             scale=self.scale, backend=self.backend)
        else:
            out = _reduced_key_attention(q, k, v, agents, agent_bias, query_bias, self.scale, self.backend)
        v_map = patch_v.reshape(batch, *self.kv_size, self.dim).permute(0, 3, 1, 2)
        if self.sr_ratio > 1:
            v_map = F.interpolate(v_map, size=self.window_size, mode="bilinear")
        conv = self.dwc(v_map).permute(0, 2, 3, 1)
        if self.class_token:
            out = out.reshape(batch, x.shape[1], self.dim)
            out = torch.cat([out[:, :1], out[:, 1:] + conv.reshape(batch, height * width, self.dim)], dim=1)
            return self.proj_drop(self.proj(out))
        out = self.proj_drop(self.proj(out.reshape(batch, height, width, self.dim) + conv))
        return out.reshape(batch, height * width, self.dim) if tokens_in else out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        squeeze_official_biases(state_dict, prefix)  # an official checkpoint's 5-D separable biases
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name, default in
                        (("fused_qkv", True), ("sr_ratio", 1), ("class_token", False))
                        if getattr(self, name) != default)
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"agent_num={self.agent_num}{extra}")
