"""Swin / Video-Swin (shifted) window attention module on ``[B, H, W, C]`` or ``[B, T, H, W, C]``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from visattn import functional
from visattn.nn import _args
from visattn.nn.positional import swin_rpb_to_visattn, visattn_rpb_to_swin

RPB_LAYOUTS = ("visattn", "swin")  # how WindowAttention stores its relative-position-bias table


class WindowAttention(nn.Module):
    """Window attention with optional shift and relative position bias, over a whole feature map.

    The arguments follow the official Swin ``WindowAttention(dim, window_size, num_heads, qkv_bias=True,
    qk_scale=None, attn_drop=0.0, proj_drop=0.0)``; the shift (Swin's block-level ``shift_size``) and visattn's
    options are keyword-only. Unlike Swin's module, ``forward`` takes the whole map, not partitioned windows: the
    shifted windows are a mask pattern inside the kernel (no roll, partition or mask tensors). Inputs whose spatial
    size is not a multiple of the window are zero-padded at the end before the qkv projection (as timm's Swin does)
    and the output is cropped back; shifted windows are taken on the padded map.

    Parameters: ``qkv``, ``proj`` and ``rpb`` ``[heads, 2w0-1, 2w1-1(, 2w2-1)]`` (key-minus-query offsets). A Swin
    state dict loads directly: its ``relative_position_bias_table`` is converted to ``rpb`` on load (see
    :func:`visattn.nn.swin_rpb_to_visattn`) and its ``relative_position_index`` buffer is dropped. With
    ``rpb_layout="swin"`` the module keeps Swin's ``relative_position_bias_table`` itself instead (Agent-Swin's
    window blocks: checkpoints and weight-decay rules keep Swin's name and layout).

    Args:
        dim: channels ``C``.
        window_size: int (a square 2-D window) or a 2-/3-tuple (3-D for Video Swin).
        num_heads: attention heads; must divide ``dim``.
        qkv_bias: bias on the fused qkv Linear (default True).
        qk_scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        attn_drop: must be 0: the fused kernels never materialise attention probabilities.
        proj_drop: dropout rate after the output projection, in [0, 1).
        shift_size: keyword-only, int or per-dimension tuple, ``0 <= shift_size < window_size`` (SW-MSA).
        rel_pos_bias: keyword-only, learn a relative-position-bias table (default True, as Swin).
        rpb_layout: keyword-only, how that table is stored: "visattn" (default) as ``rpb`` ``[heads, 2w0-1, ...]``
            (key-minus-query offsets); "swin" as Swin's ``relative_position_bias_table`` ``[(2w0-1)(2w1-1)(...),
            heads]`` (query-minus-key offsets, row-major), trunc-normal std 0.02 as Swin initialises it, converted by
            :func:`visattn.nn.swin_rpb_to_visattn` in every forward (differentiable), so it trains in Swin's layout;
            ``rpb`` is then None. A loaded state dict's ``relative_position_index`` buffer is dropped either way, and
            a table in the other layout is converted on load.
        backend: keyword-only, None/"auto", "reference" or "triton" (see :func:`visattn.window_attention`).
    """

    @_args.factory_kwargs
    def __init__(self, dim: int, window_size: _args.IntOrTuple, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, *,
                 shift_size: _args.IntOrTuple = 0, rel_pos_bias: bool = True, rpb_layout: str = "visattn",
                 backend: str | None = None):
        super().__init__()
        rank = len(window_size) if isinstance(window_size, (tuple, list)) else 2
        if rank not in (2, 3):
            raise ValueError(f"window_size must be an int or a 2-/3-tuple, got {window_size!r}")
        self.rank = rank
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(dim, num_heads, "dim")
        self.window_size = _args.int_tuple(window_size, rank, "window_size")
        self.shift_size = _args.int_tuple(shift_size, rank, "shift_size", minimum=0)
        if any(t >= w for t, w in zip(self.shift_size, self.window_size, strict=True)):
            raise ValueError(f"shift_size {self.shift_size} must be smaller than window_size {self.window_size}")
        _args.check_flag(qkv_bias, "qkv_bias")
        _args.check_flag(rel_pos_bias, "rel_pos_bias")
        if rpb_layout not in RPB_LAYOUTS:
            raise ValueError(f"rpb_layout must be one of {RPB_LAYOUTS}, got {rpb_layout!r}")
        self.rpb_layout = rpb_layout
        _args.no_attn_drop(attn_drop)
        self.backend = _args.check_backend(backend, "WindowAttention")
        self.scale = _args.check_scale(qk_scale, self.head_dim, "qk_scale")
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        swin = rel_pos_bias and rpb_layout == "swin"
        self.rpb = None if swin else _args.rel_pos_table(rel_pos_bias, num_heads, self.window_size)
        if swin:
            table = torch.zeros(math.prod(2 * w - 1 for w in self.window_size), num_heads)
            self.relative_position_bias_table = nn.Parameter(trunc_normal_(table, std=0.02))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))

    def _has_table(self) -> bool:
        return "relative_position_bias_table" in self._parameters

    def position_bias(self) -> Tensor | None:
        """The relative position bias in visattn's ``[heads, 2w0-1, 2w1-1(, 2w2-1)]`` layout (None without one)."""
        if self._has_table():
            return swin_rpb_to_visattn(self.relative_position_bias_table, self.window_size)
        return self.rpb

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, H, W, dim]`` (or ``[B, T, H, W, dim]``) -> the same shape."""
        _args.check_input(x, self.rank, self.dim, "WindowAttention")
        spatial = tuple(x.shape[1:-1])
        padded = tuple(-(-n // w) * w for n, w in zip(spatial, self.window_size, strict=True))
        if padded != spatial:
            pads = []
            for n, p in reversed(list(zip(spatial, padded, strict=True))):
                pads += [0, p - n]
            x = F.pad(x, [0, 0] + pads)
        qkv = self.qkv(x).view(x.shape[0], *padded, 3, self.num_heads, self.head_dim)
        # the packed qkv: on the fused kernels the backward writes one gradient for the projection (no stack)
        out = functional._window_packed(qkv, self.window_size, self.shift_size, self.position_bias(), self.scale,
                                        self.backend)
        out = self.proj_drop(self.proj(out.reshape(*x.shape[:-1], self.dim)))
        if padded != spatial:
            out = out[(slice(None), *(slice(0, n) for n in spatial))]
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A Swin checkpoint: its query-minus-key table becomes this module's key-minus-query rpb.
        table = prefix + "relative_position_bias_table"
        if table in state_dict and prefix + "rpb" not in state_dict and self.rpb is not None:
            state_dict[prefix + "rpb"] = swin_rpb_to_visattn(state_dict.pop(table), self.window_size)
            state_dict.pop(prefix + "relative_position_index", None)
        elif self.rpb_layout == "swin":  # a visattn-layout rpb becomes this module's Swin table
            if prefix + "rpb" in state_dict and table not in state_dict and self._has_table():
                state_dict[table] = visattn_rpb_to_swin(state_dict.pop(prefix + "rpb"), self.window_size)
            state_dict.pop(prefix + "relative_position_index", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"shift_size={self.shift_size}, rel_pos_bias={self.rpb is not None or self._has_table()}"
                + (f", rpb_layout={self.rpb_layout!r}" if self.rpb_layout != "visattn" else ""))
