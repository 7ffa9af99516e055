"""Diffusion-transformer blocks over 2-D ``[B, H, W, C]`` and 3-D ``[B, T, H, W, C]`` latents.

* :class:`LatentSelfAttention` — self-attention chosen by name: ``"dense"`` (SDPA), ``"neighborhood"`` (NA / DiNA /
  GNA: ``kernel_size``, ``dilation``, ``stride``), ``"window"`` (``window_size``, ``shift``) or ``"agent"``
  (``agent_grid``: agents are the mean of q over a regular grid of cells); optional causal time (3-D) and axial
  RoPE. Every choice has the same parameters (``qkv``, ``proj``), so one state dict serves all of them.
* :class:`DiTBlock` — DiT's adaLN-Zero block (Peebles & Xie 2023), optional cross-attention to text tokens.
* :class:`HDiTBlock` — an HDiT-style block (Crowson et al. 2024): AdaRMSNorm, axial RoPE, GEGLU feed-forward;
  :class:`TokenMerge` / :class:`TokenSplit` move between hierarchy levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visattn import functional

ATTENTIONS = ("dense", "neighborhood", "window", "agent")


def _per_dim(value, rank: int, name: str) -> tuple:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        raise ValueError(f"{name} must be one value or {rank} values, got {value!r}")
    return items


class AxialRoPE(nn.Module):
    """Axial rotary embedding: the head's channel pairs are split evenly between the grid axes, and each axis's pairs
    rotate by ``position * frequency`` along that axis (frequencies ``theta ** (-2i / n)`` per axis).

    Args:
        head_dim: channels per head; ``head_dim`` must be divisible by ``2 * rank``.
        rank: number of grid axes (2 or 3).
        theta: frequency base.
    """

    def __init__(self, head_dim: int, rank: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % (2 * rank):
            raise ValueError(f"AxialRoPE: head_dim={head_dim} must be divisible by 2*rank={2 * rank}")
        pairs = head_dim // (2 * rank)
        self.rank = rank
        self.register_buffer("freqs", theta ** (-torch.arange(pairs, dtype=torch.float32) / pairs), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, *grid, heads, head_dim]`` -> rotated, same shape and dtype."""
        grid = x.shape[1:1 + self.rank]
        axes = [torch.arange(n, device=x.device, dtype=torch.float32) for n in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [*grid, rank]
        angles = (coords[..., :, None] * self.freqs.to(x.device)).flatten(-2)  # [*grid, rank*pairs]
        cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)


class LatentSelfAttention(nn.Module):
    """Multi-head self-attention over a latent grid, with the attention pattern chosen by name.

    Args:
        dim: channels ``C``.
        num_heads: heads (``C`` divisible by it).
        attention: "dense", "neighborhood", "window" or "agent".
        rank: grid dimensions (2 or 3).
        causal_time: 3-D only: a query at frame ``t`` sees keys at frames ``<= t`` ("dense", "neighborhood").
        qk_norm: RMS-normalise q and k per head.
        rope: apply :class:`AxialRoPE` to q and k.
        backend: visattn backend (None: the default).
        **attention_kwargs: "neighborhood": ``kernel_size`` (required), ``dilation``, ``stride``; "window":
            ``window_size`` (required), ``shift``; "agent": ``agent_grid`` (agents per axis, default 4).
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "dense", rank: int = 2, causal_time: bool = False,
                 qk_norm: bool = False, rope: bool = False, backend: str | None = None, **attention_kwargs):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if rank not in (2, 3):
            raise ValueError(f"rank must be 2 or 3, got {rank!r}")
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if causal_time and (rank != 3 or attention not in ("dense", "neighborhood")):
            raise ValueError(f"causal_time needs a 3-D grid and 'dense' or 'neighborhood' attention, got rank={rank}, "
                             f"attention={attention!r}")
        allowed = {"dense": set(), "neighborhood": {"kernel_size", "dilation", "stride"},
                   "window": {"window_size", "shift"}, "agent": {"agent_grid"}}[attention]
        unknown = set(attention_kwargs) - allowed
        if unknown:
            raise ValueError(f"attention={attention!r} does not take {sorted(unknown)}; it takes {sorted(allowed)}")
        required = {"neighborhood": "kernel_size", "window": "window_size"}.get(attention)
        if required and required not in attention_kwargs:
            raise ValueError(f"attention={attention!r} needs {required}=")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attention, self.rank, self.causal_time, self.backend = attention, rank, causal_time, backend
        self.options = dict(attention_kwargs)
        if attention == "agent":
            self.options["agent_grid"] = _per_dim(self.options.get("agent_grid", 4), rank, "agent_grid")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.rope = AxialRoPE(self.head_dim, rank) if rope else None
        self.proj = nn.Linear(dim, dim)

    def _backend(self) -> dict:
        return {} if self.backend is None else {"backend": self.backend}

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The chosen attention on heads-last ``[B, *grid, heads, D]`` q/k/v (views of the fused projection)."""
        grid = q.shape[1:-2]
        if self.attention == "neighborhood":
            op = (functional.na2d, functional.na3d)[self.rank - 2]
            causal = (True, False, False) if self.causal_time else False
            return op(q, k, v, self.options["kernel_size"], dilation=self.options.get("dilation", 1),
                      stride=self.options.get("stride", 1), is_causal=causal, **self._backend())
        if self.attention == "window":
            return functional.window_attention(q, k, v, self.options["window_size"],
                                               shift=self.options.get("shift", 0), **self._backend())
        if self.attention == "agent":
            agent_grid = tuple(min(a, n) for a, n in zip(self.options["agent_grid"], grid, strict=False))
            pool = F.adaptive_avg_pool2d if self.rank == 2 else F.adaptive_avg_pool3d
            q_map = q.flatten(-2).movedim(-1, 1)  # [B, heads*D, *grid]
            agents = pool(q_map, agent_grid).flatten(2).transpose(1, 2).unflatten(-1, (self.num_heads, -1))
            return functional.agent_attention(q, k, v, agents.contiguous(), **self._backend())
        batch = q.shape[0]
        def flat(t):
            return t.reshape(batch, -1, self.num_heads, t.shape[-1]).transpose(1, 2)
        mask = None
        if self.causal_time:
            frames = torch.arange(grid[0], device=q.device).repeat_interleave(math.prod(grid[1:]))
            mask = frames[None, :] <= frames[:, None]
        out = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=mask)
        return out.transpose(1, 2).reshape(q.shape)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, *grid, C]`` -> ``[B, *grid, C]``."""
        if x.dim() != self.rank + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, *grid({self.rank}), {self.dim}], got {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        return self.proj(self.attend(q, k, v).flatten(-2))


class CrossAttention(nn.Module):
    """Latent tokens attend text tokens ``[B, L, context_dim]`` (dense SDPA; optional key padding mask)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        batch, shape = x.shape[0], x.shape
        q = self.q(x).reshape(batch, -1, self.num_heads, shape[-1] // self.num_heads).transpose(1, 2)
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, -1)).unbind(-3)
        mask = None if context_mask is None else context_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(shape))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with ``[B, C]`` modulation broadcast over the grid."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning over a 2-D or 3-D latent grid.

    ``x = x + g1 * attn(mod(LN(x), c)); [x = x + xattn(LN(x), text)]; x = x + g2 * mlp(mod(LN(x), c))`` where the
    shift/scale/gate vectors come from ``Linear(SiLU(c))`` initialised to zero and the cross-attention's output
    projection is zero-initialised too (PixArt-α's initialisation), so a fresh block is the identity, with or
    without ``cross_attention_dim``.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        attention: "dense", "neighborhood", "window" or "agent" (see :class:`LatentSelfAttention`).
        mlp_ratio: MLP hidden width / ``C``.
        rank: 2 (``x [B, H, W, C]``) or 3 (``x [B, T, H, W, C]``).
        causal_time: 3-D only, frames attend only to earlier frames.
        cross_attention_dim: width of text tokens to cross-attend (None: no cross-attention).
        backend: visattn backend (None: default).
        **attention_kwargs: the attention's own arguments (``kernel_size``, ``stride``, ``window_size``, ...).
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "dense", mlp_ratio: float = 4.0, rank: int = 2,
                 causal_time: bool = False, cross_attention_dim: int | None = None, backend: str | None = None,
                 **attention_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = LatentSelfAttention(dim, num_heads, attention, rank=rank, causal_time=causal_time,
                                        backend=backend, **attention_kwargs)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if cross_attention_dim else None
        self.cross_attn = CrossAttention(dim, num_heads, cross_attention_dim) if cross_attention_dim else None
        if self.cross_attn is not None:  # ungated branch: a zero output projection keeps the fresh block the identity
            nn.init.zeros_(self.cross_attn.proj.weight)
            nn.init.zeros_(self.cross_attn.proj.bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """``x [B, *grid, C]``, ``c [B, C]``, ``context [B, L, cross_attention_dim]`` -> ``[B, *grid, C]``."""
        if c.dim() != 2 or c.shape != (x.shape[0], x.shape[-1]):
            raise ValueError(f"c must be [B, C] = [{x.shape[0]}, {x.shape[-1]}], got {tuple(c.shape)}")
        if (context is None) != (self.cross_attn is None):
            raise ValueError("context must be given exactly when the block was built with cross_attention_dim")
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        x = x + gate1.view(view) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), context, context_mask)
        return x + gate2.view(view) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class AdaRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is ``1 + Linear(c)`` (zero-initialised), as in HDiT."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale = 1 + self.linear(c).view((x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],))
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * scale


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.down.weight)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class HDiTBlock(nn.Module):
    """HDiT-style transformer block: AdaRMSNorm -> self-attention (axial RoPE, qk RMSNorm) -> AdaRMSNorm -> GEGLU.

    The arguments are :class:`DiTBlock`'s, in the same order (``dim, num_heads, attention, mlp_ratio, rank,
    causal_time``, then ``cond_dim`` where DiTBlock has ``cross_attention_dim``, then ``backend``). The attention and
    feed-forward output projections are zero-initialised, so a fresh block is the identity.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (``C / num_heads`` divisible by ``2 * rank`` for the RoPE).
        attention: "dense", "neighborhood", "window" or "agent".
        mlp_ratio: GEGLU hidden width / ``C``.
        rank: 2 or 3.
        causal_time: 3-D only.
        cond_dim: width of the conditioning vector ``c`` (None: ``dim``, as ``DiTBlock``'s ``c``).
        backend: visattn backend (None: default).
        **attention_kwargs: the attention's own arguments.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "dense", mlp_ratio: float = 3.0, rank: int = 2,
                 causal_time: bool = False, cond_dim: int | None = None, backend: str | None = None,
                 **attention_kwargs):
        if not isinstance(attention, str):
            raise TypeError(f"HDiTBlock: attention must be a string (one of {ATTENTIONS}), got {attention!r}; the "
                            "third positional argument is attention, as in DiTBlock: pass cond_dim= by keyword")
        cond_dim = dim if cond_dim is None else cond_dim
        if isinstance(cond_dim, bool) or not isinstance(cond_dim, int) or cond_dim < 1:
            raise ValueError(f"HDiTBlock: cond_dim must be a positive int, got {cond_dim!r}")
        super().__init__()
        self.norm1 = AdaRMSNorm(dim, cond_dim)
        self.attn = LatentSelfAttention(dim, num_heads, attention, rank=rank, causal_time=causal_time, qk_norm=True,
                                        rope=True, backend=backend, **attention_kwargs)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)
        self.norm2 = AdaRMSNorm(dim, cond_dim)
        self.ff = GEGLU(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x [B, *grid, C]``, ``c [B, cond_dim]`` -> ``[B, *grid, C]``."""
        x = x + self.attn(self.norm1(x, c))
        return x + self.ff(self.norm2(x, c))


def _merge_factor(rank: int, factor) -> tuple[int, ...]:
    factor = _per_dim(factor, rank, "factor") if rank == 2 or isinstance(factor, (tuple, list)) else (1, factor,
                                                                                                         factor)
    return tuple(int(f) for f in factor)


class TokenMerge(nn.Module):
    """Merge each ``factor`` block of tokens into one (concatenate channels, then Linear): ``[B, *grid, C_in]`` ->
    ``[B, *grid / factor, C_out]``. For 3-D an int factor merges only spatially ``(1, f, f)``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int = 2, factor: int | Sequence[int] = 2):
        super().__init__()
        self.rank, self.factor = rank, _merge_factor(rank, factor)
        self.proj = nn.Linear(in_dim * math.prod(self.factor), out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        grid = x.shape[1:-1]
        if any(n % f for n, f in zip(grid, self.factor, strict=False)):
            raise ValueError(f"TokenMerge: grid {tuple(grid)} must be divisible by the factor {self.factor}")
        shape = [x.shape[0]]
        for n, f in zip(grid, self.factor, strict=False):
            shape += [n // f, f]
        x = x.reshape(*shape, x.shape[-1])
        outer = [1 + 2 * i for i in range(self.rank)]
        inner = [2 + 2 * i for i in range(self.rank)]
        x = x.permute(0, *outer, *inner, x.dim() - 1).flatten(self.rank + 1)
        return self.proj(x)


class TokenSplit(nn.Module):
    """Inverse of :class:`TokenMerge` with HDiT's learned skip blend: ``lerp(skip, split(x), fac)``."""

    def __init__(self, in_dim: int, out_dim: int, rank: int = 2, factor: int | Sequence[int] = 2):
        super().__init__()
        self.rank, self.factor = rank, _merge_factor(rank, factor)
        self.proj = nn.Linear(in_dim, out_dim * math.prod(self.factor), bias=False)
        self.fac = nn.Parameter(torch.ones(1) * 0.5)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        batch, grid = x.shape[0], x.shape[1:-1]
        x = self.proj(x).reshape(batch, *grid, *self.factor, -1)
        order = [0]
        for i in range(self.rank):
            order += [1 + i, 1 + self.rank + i]
        x = x.permute(*order, x.dim() - 1).reshape(batch, *(n * f for n, f in zip(grid, self.factor, strict=False)), -1)
        return torch.lerp(skip, x, self.fac.to(x.dtype))


__all__ = ["ATTENTIONS", "AdaRMSNorm", "AxialRoPE", "CrossAttention", "DiTBlock", "GEGLU", "HDiTBlock",
           "LatentSelfAttention", "TokenMerge", "TokenSplit"]
