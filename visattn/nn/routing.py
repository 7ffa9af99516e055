"""BiFormer's bi-level routing attention module (``ops/bra_legacy.py`` defaults) on ``[B, H, W, C]``."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with BiFormer's LEPE (depthwise conv on v) and output projection ``wo``.

    ``qkv`` is one Linear ``dim -> 2*qk_dim + dim`` (q, k, v in that order; BiFormer's ``qkv.qkv``), the scale is
    ``qk_dim ** -0.5`` (not per head, as in BiFormer), routing is non-differentiable top-k over region means with
    identity kv downsampling. With ``auto_pad`` the input is zero-padded at the bottom/right to a multiple of
    ``n_win`` *before* the projection (padded tokens carry the projection bias, as in BiFormer) and the output is
    cropped back; without it the map must divide.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: Optional[int] = None,
                 qk_scale: Optional[float] = None, topk: int = 4, side_dwconv: int = 5, auto_pad: bool = True,
                 qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.qk_dim = dim if qk_dim is None else _args.positive_int(qk_dim, "qk_dim")
        _args.heads_divide(self.qk_dim, num_heads, "qk_dim")
        _args.heads_divide(dim, num_heads)
        self.n_win = _args.positive_int(n_win, "n_win")
        self.topk = _args.positive_int(topk, "topk")
        if self.topk > self.n_win**2:
            raise ValueError(f"topk must be <= n_win**2 = {self.n_win ** 2}, got {topk}")
        if side_dwconv < 0 or side_dwconv % 2 == 0 and side_dwconv != 0:
            raise ValueError(f"side_dwconv must be 0 (off) or an odd kernel size, got {side_dwconv!r}")
        self.backend = _args.backend_name(backend)
        self.auto_pad = bool(auto_pad)
        self.scale = _args.scale_or_default(qk_scale, self.qk_dim)
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        _args.check_input(x, 2, self.dim, "BiLevelRoutingAttention")
        batch, height, width, _ = x.shape
        pad_h, pad_w = -height % self.n_win, -width % self.n_win
        if pad_h or pad_w:
            if not self.auto_pad:
                raise ValueError(f"BiLevelRoutingAttention: x's spatial size {(height, width)} must be a multiple of "
                                 f"n_win={self.n_win} when auto_pad=False")
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        ph, pw = height + pad_h, width + pad_w
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        heads = self.num_heads
        out = functional.bilevel_routing_attention(
            q.unflatten(-1, (heads, -1)), k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1)),
            self.n_win, self.topk, scale=self.scale, backend=self.backend,
        ).reshape(batch, ph, pw, self.dim)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        return out[:, :height, :width] if (pad_h or pad_w) else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, n_win={self.n_win}, "
                f"topk={self.topk}, auto_pad={self.auto_pad}")
