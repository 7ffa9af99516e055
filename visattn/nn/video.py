"""Video sparse-attention modules on heads-last video ``[B, T, H, W, C]``: sliding-tile attention (STA), Radial
Attention and VMoBA, each a fused ``qkv`` Linear -> the functional op on strided views of its output -> ``proj``
Linear -> dropout (the parameter names of :class:`visattn.nn.NeighborhoodAttention3D`, so one checkpoint serves all
of them).
Text tokens for joint attention are passed to ``forward`` as ``additional_keys`` / ``additional_values``.
"""

from __future__ import annotations

from torch import Tensor, nn

from visattn import functional
from visattn.nn import _args

_ARGS_HEAD = """embed_dim: channels ``C`` (``num_heads * head_dim``).
        num_heads: attention heads; must divide ``embed_dim``."""
_ARGS_TAIL = """qkv_bias: bias on the fused qkv Linear (default True).
        qk_scale: softmax scale, a finite number > 0; None means ``head_dim ** -0.5``.
        proj_drop: dropout rate after the output projection, in [0, 1).
        backend: keyword-only; None/"auto", "reference" or "triton"."""


def _module_doc(cls: type) -> type:
    """Fill the arguments every video module shares into ``cls``'s docstring."""
    cls.__doc__ = cls.__doc__.replace("{head}", "        " + _ARGS_HEAD + "\n").replace(
        "{tail}", "        " + _ARGS_TAIL + "\n")
    return cls


class _VideoAttention(nn.Module):
    """Shared body: projections, checks and the forward; subclasses set ``_attend``."""

    def _init_projections(self, embed_dim: int, num_heads: int, qkv_bias: bool, qk_scale, proj_drop: float,
                          backend) -> None:
        self.embed_dim = _args.positive_int(embed_dim, "embed_dim")
        self.num_heads = _args.positive_int(num_heads, "num_heads")
        self.head_dim = _args.heads_divide(embed_dim, num_heads)
        _args.check_flag(qkv_bias, "qkv_bias")
        self.scale = _args.check_scale(qk_scale, self.head_dim, "qk_scale")
        self.backend = _args.check_backend(backend, type(self).__name__)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(_args.dropout_rate(proj_drop, "proj_drop"))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, additional_keys: Tensor | None,
                additional_values: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, additional_keys: Tensor | None = None,
                additional_values: Tensor | None = None) -> Tensor:
        """Project ``x`` to q, k, v, attend, project back.

        Args:
            x: ``[B, T, H, W, embed_dim]``.
            additional_keys: ``[B, n, num_heads, head_dim]`` tokens every query attends too (text), one softmax;
                or None.
            additional_values: ``[B, n, num_heads, head_dim]`` their values; given together with the keys.

        Returns:
            ``[B, T, H, W, embed_dim]``.
        """
        _args.check_input(x, 3, self.embed_dim, type(self).__name__)
        qkv = self.qkv(x).view(*x.shape[:-1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # strided views of the fused projection, no copies
        out = self._attend(q, k, v, additional_keys, additional_values)
        return self.proj_drop(self.proj(out.reshape(x.shape)))


@_module_doc
class SlidingTileAttention(_VideoAttention):
    """Sliding-tile attention (STA) module: :func:`visattn.sliding_tile_attention` between ``qkv`` and ``proj``.

    Args:
{head}        tile_size: tokens per tile, int or ``(t, h, w)`` (STA's release: ``(6, 8, 8)``); must divide the input.
        kernel_tiles: the window in tiles, int or ``(t, h, w)`` (the release's example ``(3, 3, 3)``).
{tail}
    Every argument is checked at construction (``ValueError``/``TypeError`` naming it).
    """

    @_args.factory_kwargs
    def __init__(self, embed_dim: int, num_heads: int, tile_size: _args.IntOrTuple = (6, 8, 8),
                 kernel_tiles: _args.IntOrTuple = (3, 3, 3), qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, *, backend: str | None = None):
        super().__init__()
        self.tile_size = _args.int_tuple(tile_size, 3, "tile_size")
        self.kernel_tiles = _args.int_tuple(kernel_tiles, 3, "kernel_tiles")
        self._init_projections(embed_dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def _attend(self, q, k, v, additional_keys, additional_values):
        return functional.sliding_tile_attention(q, k, v, self.tile_size, self.kernel_tiles, self.scale,
                                                 additional_keys, additional_values, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, tile_size={self.tile_size}, "
                f"kernel_tiles={self.kernel_tiles}")


@_module_doc
class RadialAttention(_VideoAttention):
    """Radial Attention module: :func:`visattn.radial_attention` between ``qkv`` and ``proj``.

    Args:
{head}        block_size: the mask's block (the release: 128).
        decay_factor: the band's decay (the release's default 1; its Wan 2.1 script 0.2, HunyuanVideo 0.95).
        attention_sink: every frame attends frame 0 (the release's Wan masks; False for HunyuanVideo).
{tail}
    Every argument is checked at construction (``ValueError``/``TypeError`` naming it).
    """

    @_args.factory_kwargs
    def __init__(self, embed_dim: int, num_heads: int, block_size: int = 128, decay_factor: float = 1.0,
                 attention_sink: bool = True, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, *, backend: str | None = None):
        super().__init__()
        self.block_size = _args.positive_int(block_size, "block_size")
        self.decay_factor = _args.check_decay(decay_factor)
        self.attention_sink = _args.check_flag(attention_sink, "attention_sink")
        self._init_projections(embed_dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def _attend(self, q, k, v, additional_keys, additional_values):
        return functional.radial_attention(q, k, v, self.block_size, self.decay_factor, self.attention_sink,
                                           self.scale, additional_keys, additional_values, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, block_size={self.block_size}, "
                f"decay_factor={self.decay_factor}, attention_sink={self.attention_sink}")


@_module_doc
class VMoBAAttention(_VideoAttention):
    """VMoBA module: :func:`visattn.vmoba_attention` between ``qkv`` and ``proj``.

    Args:
{head}        chunk_size: key chunks, an int (frames), ``(h, w)`` or ``(t, h, w)`` (the paper cycles 1-D, 2-D, 3-D over
            the layers: give each layer its own).
        select_mode: "threshold" (default) or "topk".
        topk: chunks per query with ``select_mode="topk"``.
        threshold: the share of the normalised affinity to keep (default 0.25).
        threshold_type: "query_head" (default), "head_global" or "overall".
{tail}
    The checks that need the input (a 2-D/3-D chunk dividing it) run on the first call; the others at
    construction (``ValueError``/``TypeError`` naming the argument).
    """

    @_args.factory_kwargs
    def __init__(self, embed_dim: int, num_heads: int, chunk_size: int | tuple[int, ...] = 1,
                 select_mode: str = "threshold", topk: int = 3, threshold: float = 0.25,
                 threshold_type: str = "query_head", qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, *, backend: str | None = None):
        super().__init__()
        self.options = functional.vmoba_options(chunk_size, select_mode, topk, threshold, threshold_type)
        self._init_projections(embed_dim, num_heads, qkv_bias, qk_scale, proj_drop, backend)

    def _attend(self, q, k, v, additional_keys, additional_values):
        return functional.vmoba_attention(q, k, v, **self.options, scale=self.scale, additional_keys=additional_keys,
                                          additional_values=additional_values, backend=self.backend)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, " + ", ".join(
            f"{name}={value!r}" for name, value in self.options.items())
