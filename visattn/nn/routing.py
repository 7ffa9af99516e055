"""BiFormer's bi-level routing attention module (``ops/bra_legacy.py`` of rayleizhu/BiFormer) on ``[B, H, W, C]``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args


class _QKVLinear(nn.Module):
    """BiFormer's ``QKVLinear``: one Linear ``dim -> 2*qk_dim + dim`` named ``qkv`` (state-dict key ``qkv.qkv``)."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """The fused projection ``[..., 2*qk_dim + dim]`` (rows q, k, v; the attention module splits it)."""
        return self.qkv(x)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with BiFormer's LEPE (depthwise conv on v) and output projection ``wo``.

    Same arguments, order, defaults and parameter names (``qkv.qkv``, ``lepe``, ``wo``) as BiFormer's
    ``BiLevelRoutingAttention``, so its checkpoints load as is; ``qkv_bias``, ``flat_qkv`` and ``backend`` are
    keyword-only additions. visattn's BiFormer models configure this module (``flat_qkv=True``, ``auto_pad=True``,
    ``side_dwconv=5``). The scale is ``qk_scale`` or ``qk_dim ** -0.5`` (not per head, as in BiFormer); routing is
    non-differentiable top-k over region means with identity kv downsampling (BiFormer's configuration); the
    options BiFormer leaves experimental (kv downsampling, learned or differentiable routing) raise ``ValueError``.

    Args:
        dim: channels ``C``.
        num_heads: attention heads; must divide ``dim`` and ``qk_dim``.
        n_win: regions per side (``n_win ** 2`` regions).
        qk_dim: channels of q and k (default ``dim``).
        qk_scale: softmax scale, a finite number > 0; None means ``qk_dim ** -0.5``.
        kv_per_win, kv_downsample_ratio, kv_downsample_kernel: kv-downsampling sizes; ignored with
            ``kv_downsample_mode="identity"``, as in BiFormer.
        kv_downsample_mode: only "identity" (no kv downsampling; BiFormer's models use it).
        topk: routed regions per query region, ``1 <= topk <= n_win ** 2``.
        param_attention: "qkvo" (output projection ``wo``) or "qkv" (no output projection).
        param_routing, diff_routing, soft_routing: must be False (learned / differentiable / soft routing are not
            supported by the fused kernel).
        side_dwconv: LEPE depthwise-conv kernel size, odd, or 0 for none (default 3).
        auto_pad: zero-pad the input at the bottom/right to a multiple of ``n_win`` *before* the projection (padded
            tokens carry the projection bias, as in BiFormer) and crop the output; without it the map must divide.
        qkv_bias: keyword-only, bias on the qkv Linear (BiFormer: always True).
        flat_qkv: keyword-only (default False). True makes ``qkv`` the fused Linear itself (state-dict keys
            ``qkv.weight`` / ``qkv.bias``, the layout of visattn's BiFormer models, whose checkpoint filter maps
            BiFormer's names to it) instead of BiFormer's ``QKVLinear`` wrapper (``qkv.qkv.weight`` /
            ``qkv.qkv.bias``). Same numbers either way.
        backend: keyword-only, None/"auto", "reference" or "triton" (see :func:`visattn.bilevel_routing_attention`).
    """

    @_args.factory_kwargs
    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None,
                 qk_scale: float | None = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_kernel: int | None = None, kv_downsample_mode: str = "identity", topk: int = 4,
                 param_attention: str = "qkvo", param_routing: bool = False, diff_routing: bool = False,
                 soft_routing: bool = False, side_dwconv: int = 3, auto_pad: bool = False, *, qkv_bias: bool = True,
                 flat_qkv: bool = False, backend: str | None = None):
        super().__init__()
        self.dim = _args.positive_int(dim, "dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.qk_dim = self.dim if qk_dim is None else _args.positive_int(qk_dim, "qk_dim")
        _args.heads_divide(self.qk_dim, num_heads, "qk_dim")
        _args.heads_divide(dim, num_heads, "dim")
        self.n_win = _args.positive_int(n_win, "n_win")
        self.topk = _args.positive_int(topk, "topk")
        if self.topk > self.n_win**2:
            raise ValueError(f"topk must be <= n_win**2 = {self.n_win ** 2}, got {topk}")
        self.scale = _args.check_scale(qk_scale, self.qk_dim, "qk_scale")
        if kv_downsample_mode != "identity":
            raise ValueError(f"kv_downsample_mode must be 'identity' (the fused kernel reads routed regions in "
                             f"place, without kv downsampling), got {kv_downsample_mode!r}")
        _args.positive_int(kv_per_win, "kv_per_win")
        _args.positive_int(kv_downsample_ratio, "kv_downsample_ratio")
        if kv_downsample_kernel is not None:
            _args.positive_int(kv_downsample_kernel, "kv_downsample_kernel")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        for name, flag in (("param_routing", param_routing), ("diff_routing", diff_routing),
                           ("soft_routing", soft_routing)):
            if _args.check_flag(flag, name):
                raise ValueError(f"{name}=True is not supported: routing is non-differentiable top-k over region "
                                 f"means, as in BiFormer's models")
        side_dwconv = _args.non_negative_int(side_dwconv, "side_dwconv")
        if side_dwconv % 2 == 0 and side_dwconv != 0:
            raise ValueError(f"side_dwconv must be 0 (off) or an odd kernel size, got {side_dwconv!r}")
        self.auto_pad = _args.check_flag(auto_pad, "auto_pad")
        _args.check_flag(qkv_bias, "qkv_bias")
        self.flat_qkv = _args.check_flag(flat_qkv, "flat_qkv")
        self.backend = _args.check_backend(backend, "BiLevelRoutingAttention")
        self.param_attention = param_attention
        self.qkv = (nn.Linear(self.dim, 2 * self.qk_dim + self.dim, bias=qkv_bias) if flat_qkv
                    else _QKVLinear(self.dim, self.qk_dim, bias=qkv_bias))
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)

    def forward(self, x: Tensor, ret_attn_mask: bool = False) -> Tensor:
        """``x``: ``[B, H, W, dim]`` -> ``[B, H, W, dim]``.

        ``ret_attn_mask`` exists for BiFormer's signature and must be False: the fused kernel never forms the
        attention weights BiFormer would return.
        """
        if ret_attn_mask:
            raise ValueError("ret_attn_mask=True is not supported: the attention weights are never materialised")
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
                f"topk={self.topk}, auto_pad={self.auto_pad}, flat_qkv={self.flat_qkv}")
