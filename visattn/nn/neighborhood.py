"""Neighborhood attention modules with NATTEN's module API (``qkv``, ``rpb``, ``proj``) on ``[B, *spatial, C]``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args


class _NeighborhoodAttention(nn.Module):
    """Shared body of NeighborhoodAttention1d/2d/3d; ``rank`` is set by each subclass."""

    rank: int = 0

    def __init__(self, dim: int, num_heads: int, kernel_size: _args.IntOrTuple, dilation: _args.IntOrTuple = 1,
                 stride: _args.IntOrTuple = 1, is_causal=False, rel_pos_bias: bool = False, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        rank = self.rank
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(dim, num_heads)
        self.kernel_size = _args.int_tuple(kernel_size, rank, "kernel_size")
        self.dilation = _args.int_tuple(dilation, rank, "dilation")
        self.stride = _args.int_tuple(stride, rank, "stride")
        self.is_causal = _args.bool_tuple(is_causal, rank, "is_causal")
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(f"stride {self.stride} must not exceed kernel_size {self.kernel_size}")
        if rel_pos_bias and any(s > 1 for s in self.stride):
            raise ValueError(f"rel_pos_bias=True cannot be combined with stride > 1 (stride={self.stride})")
        _args.no_attn_drop(attn_drop)
        self.backend = _args.backend_name(backend)
        self.scale = _args.scale_or_default(qk_scale, self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = _args.rel_pos_table(rel_pos_bias, num_heads, self.kernel_size)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))
        self._op = (functional.na1d, functional.na2d, functional.na3d)[rank - 1]

    def forward(self, x: Tensor) -> Tensor:
        _args.check_input(x, self.rank, self.dim, type(self).__name__)
        spatial = x.shape[1:-1]
        qkv = self.qkv(x).view(x.shape[0], *spatial, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # strided views of the fused projection, no copies
        out = self._op(q, k, v, self.kernel_size, self.dilation, self.stride, self.is_causal, rpb=self.rpb,
                       scale=self.scale, backend=self.backend)
        return self.proj_drop(self.proj(out.reshape(*x.shape[:-1], self.dim)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}")


class NeighborhoodAttention1d(_NeighborhoodAttention):
    """1-D neighborhood attention on ``[B, L, C]``."""

    rank = 1


class NeighborhoodAttention2d(_NeighborhoodAttention):
    """2-D neighborhood attention on ``[B, H, W, C]``."""

    rank = 2


class NeighborhoodAttention3d(_NeighborhoodAttention):
    """3-D neighborhood attention on ``[B, T, H, W, C]``."""

    rank = 3
