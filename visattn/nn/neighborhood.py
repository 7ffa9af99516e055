"""Neighborhood attention modules with NATTEN 0.21's module API on heads-last maps ``[B, *spatial, C]``.

``NeighborhoodAttention1D/2D/3D(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False,
qkv_bias=True, qk_scale=None, proj_drop=0.0)`` take NATTEN's arguments in NATTEN's order and hold NATTEN's
parameters (``qkv``, ``proj``), so a NATTEN state dict loads as is. visattn's options are keyword-only: a learned
relative positional bias (``rel_pos_bias=True`` adds the ``rpb`` parameter of NAT/DiNAT), zero-padding of maps
smaller than the window (``pad_to_window=True``, NAT/DiNAT's released behaviour), the backend, and extra key/value
tokens passed to ``forward``. visattn's NAT and DiNAT models are these modules configured with both options.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args


class _NeighborhoodAttention(nn.Module):
    """Shared body of NeighborhoodAttention1D/2D/3D; ``rank`` is set by each subclass."""

    rank: int = 0

    @_args.factory_kwargs
    def __init__(self, embed_dim: int, num_heads: int, kernel_size: _args.IntOrTuple, stride: _args.IntOrTuple = 1,
                 dilation: _args.IntOrTuple = 1, is_causal: bool | tuple[bool, ...] = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, proj_drop: float = 0.0, *, rel_pos_bias: bool = False,
                 pad_to_window: bool = False, backend: str | None = None):
        super().__init__()
        rank = self.rank
        name = type(self).__name__
        self.embed_dim = _args.positive_int(embed_dim, "embed_dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(embed_dim, num_heads)
        self.kernel_size = _args.int_tuple(kernel_size, rank, "kernel_size")
        self.stride = _args.int_tuple(stride, rank, "stride", default=1)
        self.dilation = _args.int_tuple(dilation, rank, "dilation", default=1)
        self.is_causal = _args.bool_tuple(is_causal, rank, "is_causal")
        if any(s > k for s, k in zip(self.stride, self.kernel_size, strict=True)):
            raise ValueError(f"{name}: stride {self.stride} must not exceed kernel_size {self.kernel_size}")
        _args.check_flag(qkv_bias, "qkv_bias")
        _args.check_flag(rel_pos_bias, "rel_pos_bias")
        self.pad_to_window = _args.check_flag(pad_to_window, "pad_to_window")
        if rel_pos_bias and any(s > 1 for s in self.stride):
            raise ValueError(f"{name}: rel_pos_bias=True cannot be combined with stride > 1 (stride={self.stride})")
        self.scale = _args.check_scale(qk_scale, self.head_dim, "qk_scale")
        self.backend = _args.check_backend(backend, name)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.rpb = _args.rel_pos_table(rel_pos_bias, num_heads, self.kernel_size)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))
        self._op = (functional.na1d, functional.na2d, functional.na3d)[rank - 1]

    def forward(self, x: Tensor, additional_keys: Tensor | None = None,
                additional_values: Tensor | None = None) -> Tensor:
        """Project ``x`` to q, k, v, attend each token's neighborhood (plus any extra tokens), project back.

        Args:
            x: ``[B, *spatial, embed_dim]`` with ``rank`` spatial dims; ``kernel_size * dilation`` must fit in it,
                unless the module pads (``pad_to_window=True``).
            additional_keys: ``[B, n, num_heads, head_dim]`` extra key tokens every query attends besides its
                neighborhood (one joint softmax), e.g. text tokens in joint attention; or None.
            additional_values: ``[B, n, num_heads, head_dim]`` their values; given together with the keys.

        Returns:
            ``[B, *spatial, embed_dim]``.
        """
        _args.check_input(x, self.rank, self.embed_dim, type(self).__name__)
        spatial = tuple(x.shape[1:-1])
        if self.pad_to_window:
            pads = [max(0, k * d - s) for k, d, s in zip(self.kernel_size, self.dilation, spatial, strict=True)]
            if any(pads):  # zeros at the end of each short dimension (F.pad lists the last dimension first)
                padded = F.pad(x, [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
                out = self._attend(padded, additional_keys, additional_values)
                return out[(slice(None), *(slice(0, s) for s in spatial))]
        return self._attend(x, additional_keys, additional_values)

    def _attend(self, x: Tensor, additional_keys: Tensor | None, additional_values: Tensor | None) -> Tensor:
        spatial = x.shape[1:-1]
        qkv = self.qkv(x).view(x.shape[0], *spatial, 3, self.num_heads, self.head_dim)
        if additional_keys is None and additional_values is None:
            # one packed tensor: under autograd its gradient comes back packed, not stacked from dq, dk, dv
            out = functional._na_packed(self.rank, qkv, self.kernel_size, self.stride, self.dilation,
                                        self.is_causal, self.scale, self.rpb, self.backend)
        else:
            q, k, v = qkv.unbind(-3)  # strided views of the fused projection, no copies
            out = self._op(q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale,
                           additional_keys, additional_values, backend=self.backend, rpb=self.rpb)
        return self.proj_drop(self.proj(out.reshape(*x.shape[:-1], self.embed_dim)))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}, pad_to_window={self.pad_to_window}")


_MODULE_DOC = """{rank}-D neighborhood attention module on ``[B, {spatial}, embed_dim]`` (NATTEN 0.21's
    ``natten.NeighborhoodAttention{rank}D``: same arguments, order, defaults and state-dict keys).

    ``qkv`` Linear -> :func:`visattn.na{rank}d` on strided views of its output -> ``proj`` Linear -> dropout. A
    call that trains through the fused kernels (eager or compiled) hands them the packed projection instead, so its
    gradient is written packed (no stack of three; ``VISATTN_PACKED_QKV=0`` turns this off).

    Args:
        embed_dim: channels ``C`` (``num_heads * head_dim``).
        num_heads: attention heads; must divide ``embed_dim``.
        kernel_size: int or {rank}-tuple, the neighborhood size.
        stride: int or {rank}-tuple (default 1), ``1 <= stride <= kernel_size``; ``stride == kernel_size`` is
            blocked attention.
        dilation: int or {rank}-tuple (default 1).
        is_causal: bool or {rank}-tuple of bools (default False), causal masking per dimension.
        qkv_bias: bias on the fused qkv Linear (default True).
        qk_scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        proj_drop: dropout rate after the output projection, in [0, 1).
        rel_pos_bias: visattn only, keyword-only. Adds a learned relative positional bias ``rpb``
            ``[num_heads, {rpb_shape}]`` (NAT/DiNAT; trunc-normal init, std 0.02); not allowed with stride > 1.
        pad_to_window: visattn only, keyword-only (default False). Zero-pad an input smaller than
            ``kernel_size * dilation`` in any dimension at the end of that dimension up to that size before the qkv
            projection (padded tokens carry the projection bias), attend over the padded map and crop the output
            back to the input's size: NATTEN's early modules, NAT/DiNAT's released code and transformers'
            ``DinatLayer`` do this. When False such an input raises ``ValueError``.
        backend: visattn only, keyword-only. None/"auto", "reference" or "triton" (see :func:`visattn.na{rank}d`).

    Every argument is checked at construction (``ValueError``/``TypeError`` naming it).
    """


class NeighborhoodAttention1D(_NeighborhoodAttention):
    rank = 1
    __doc__ = _MODULE_DOC.format(rank=1, spatial="L", rpb_shape="2k-1")


class NeighborhoodAttention2D(_NeighborhoodAttention):
    rank = 2
    __doc__ = _MODULE_DOC.format(rank=2, spatial="H, W", rpb_shape="2k0-1, 2k1-1")


class NeighborhoodAttention3D(_NeighborhoodAttention):
    rank = 3
    __doc__ = _MODULE_DOC.format(rank=3, spatial="T, H, W", rpb_shape="2k0-1, 2k1-1, 2k2-1")


# The earlier names, now the same classes (NATTEN's argument order: stride before dilation, embed_dim first).
NeighborhoodAttention1d = NeighborhoodAttention1D
NeighborhoodAttention2d = NeighborhoodAttention2D
NeighborhoodAttention3d = NeighborhoodAttention3D
