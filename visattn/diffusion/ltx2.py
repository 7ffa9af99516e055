"""LTX-2.5's diffusion video decoder on visattn's ``na3d``.

diffusers (0.40+) ships the decoder as ``LTX2VideoDiffusionDecoderModel``: a 3-D neighborhood-attention transformer
(kernels 3x7x7, 3x5x5 and 11x11x11, head dim 64) whose attention modules, ``LTX2VideoVaeNeighborhoodAttention``,
produce heads-last q/k/v ``[B, T, H, W, heads, 64]`` (RMS-normed, query pre-scaled, 3-D RoPE) in ``project_qkv``.
Its two processors need either a FlexAttention block mask (larger than device memory at production grids) or
NATTEN fetched from the Hub (CUDA only). :class:`LTX2NeighborhoodAttnProcessor` hands the same q/k/v to
``visattn.na3d``: the Triton engine on CUDA, the exact reference on CPU, and no block mask ever — the decoder asks a
processor for a mask only when it is diffusers' flex processor, which this one is not.
"""

from __future__ import annotations

from torch import Tensor

from visattn import functional
from visattn.diffusion import _compat

_MODULE = "models.autoencoders.ltx2_diffusion_decoder"
_WHAT = "visattn.diffusion.LTX2NeighborhoodAttnProcessor"


def _check_ltx2_interface() -> type:
    """The attention class the processor was written for, after checking the installed diffusers matches it."""
    _compat.check_diffusers_version(_WHAT)
    attention_cls = _compat.load_class(_MODULE, "LTX2VideoVaeNeighborhoodAttention", _WHAT)
    flex_cls = _compat.load_class(_MODULE, "LTX2VideoVaeNeighborhoodAttnProcessor", _WHAT)
    _compat.require_parameters(attention_cls.project_qkv, ("hidden_states",), "LTX2VideoVaeNeighborhoodAttention"
                               ".project_qkv", _WHAT)
    _compat.require_parameters(flex_cls.__call__, ("attn", "hidden_states", "block_mask"),
                               "LTX2VideoVaeNeighborhoodAttnProcessor.__call__", _WHAT)
    _compat.require_parameters(attention_cls.forward, ("hidden_states", "block_mask"),
                               "LTX2VideoVaeNeighborhoodAttention.forward", _WHAT)
    return attention_cls


class LTX2NeighborhoodAttnProcessor:
    """Attention processor for ``LTX2VideoVaeNeighborhoodAttention`` running ``visattn.na3d``.

    Set it on the whole decoder with ``model.set_attn_processor(LTX2NeighborhoodAttnProcessor())`` (or on one
    attention module with ``module.set_processor(...)``). It computes exactly what diffusers' flex processor
    computes — NATTEN's clamped windows of ``attn.kernel_size`` over the ``(T, H, W)`` token grid, ``scale=1`` because
    ``project_qkv`` already scales the query — without a block mask.

    Args:
        backend: visattn backend for ``na3d`` (``None``/"auto": the Triton engine on CUDA, the reference
            elsewhere; "reference"; "triton").

    Raises:
        ValueError: at construction, when the installed diffusers is outside the tested range or its decoder
            classes no longer have the interface this processor reads.
    """

    def __init__(self, backend: str | None = None):
        self._attention_cls = _check_ltx2_interface()
        self.backend = backend

    def __call__(self, attn, hidden_states: Tensor, block_mask=None) -> Tensor:
        """``hidden_states [B, T, H, W, C]`` (channels last, any strides) -> ``[B, T, H, W, C]``.

        ``block_mask`` is accepted for the decoder's calling convention and ignored (the decoder passes None to
        every processor that is not its flex processor).
        """
        if not isinstance(attn, self._attention_cls):
            raise TypeError(f"{_WHAT} works on LTX2VideoVaeNeighborhoodAttention modules (diffusers "
                            f"{_compat.diffusers_version()}), got {type(attn).__name__}")
        if hidden_states.dim() != 5:
            raise ValueError(f"{_WHAT}: hidden_states must be [B, T, H, W, C], got {tuple(hidden_states.shape)}")
        batch, frames, height, width, channels = hidden_states.shape
        query, key, value = attn.project_qkv(hidden_states)  # each [B, T, H, W, heads, head_dim]
        out = self.attend(query, key, value, tuple(attn.kernel_size))
        return attn.to_out[0](out.reshape(batch, frames, height, width, channels))

    def attend(self, query: Tensor, key: Tensor, value: Tensor, kernel_size: tuple[int, int, int]) -> Tensor:
        """The attention alone: ``na3d`` on heads-last ``[B, T, H, W, heads, D]`` with ``scale=1`` (benchmarks time
        this method)."""
        extra = {} if self.backend is None else {"backend": self.backend}
        return functional.na3d(query, key, value, kernel_size, scale=1.0, **extra)


__all__ = ["LTX2NeighborhoodAttnProcessor"]
