"""Swin / Video-Swin (shifted) window attention module on ``[B, H, W, C]`` or ``[B, T, H, W, C]``."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args


class WindowAttention(nn.Module):
    """Window attention with optional shift and relative position bias.

    ``window_size``/``shift`` are an int (2-D) or a 2-/3-tuple (3-D for Video Swin). Inputs whose spatial size is
    not a multiple of the window are zero-padded at the end before the qkv projection (as timm's Swin does) and
    the output is cropped back. Shifted windows are taken on the padded map. ``rpb`` is visattn's
    ``[heads, 2w0-1, 2w1-1(, 2w2-1)]`` key-minus-query table; load a Swin table with
    :func:`visattn.nn.swin_rpb_to_visattn`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: _args.IntOrTuple, shift: _args.IntOrTuple = 0,
                 rel_pos_bias: bool = True, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        rank = len(window_size) if isinstance(window_size, (tuple, list)) else 2
        if rank not in (2, 3):
            raise ValueError(f"window_size must be an int or a 2-/3-tuple, got {window_size!r}")
        self.rank = rank
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(dim, num_heads)
        self.window_size = _args.int_tuple(window_size, rank, "window_size")
        self.shift = _args.int_tuple(shift, rank, "shift", minimum=0)
        if any(t >= w for t, w in zip(self.shift, self.window_size)):
            raise ValueError(f"shift {self.shift} must be smaller than window_size {self.window_size}")
        _args.no_attn_drop(attn_drop)
        self.backend = _args.backend_name(backend)
        self.scale = _args.scale_or_default(qk_scale, self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = _args.rel_pos_table(rel_pos_bias, num_heads, self.window_size)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))

    def forward(self, x: Tensor) -> Tensor:
        _args.check_input(x, self.rank, self.dim, "WindowAttention")
        spatial = tuple(x.shape[1:-1])
        padded = tuple(-(-n // w) * w for n, w in zip(spatial, self.window_size))
        if padded != spatial:
            pads = []
            for n, p in reversed(list(zip(spatial, padded))):
                pads += [0, p - n]
            x = F.pad(x, [0, 0] + pads)
        qkv = self.qkv(x).view(x.shape[0], *padded, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)
        out = functional.window_attention(q, k, v, self.window_size, self.shift, rpb=self.rpb, scale=self.scale,
                                          backend=self.backend)
        out = self.proj_drop(self.proj(out.reshape(*x.shape[:-1], self.dim)))
        if padded != spatial:
            out = out[(slice(None), *(slice(0, n) for n in spatial))]
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, shift={self.shift}, "
                f"rel_pos_bias={self.rpb is not None}")
