"""Run timm's Swin Transformer on visattn's window attention: no roll, no window partition, no mask tensor.

``patch_swin(model)`` rebinds every ``SwinTransformerBlock._attn`` of a timm ``SwinTransformer`` to a version that
projects qkv over the whole map and calls ``visattn.window_attention`` with the block's window, effective shift and
relative-position-bias table (converted on the fly, so gradients reach timm's own parameter and checkpoints stay
timm's). Weights, state-dict keys and outputs are unchanged; ``unpatch_swin`` restores timm's path.
"""

from __future__ import annotations

import types

import torch
from torch import nn

import visattn
from visattn.nn.positional import swin_rpb_to_visattn

_ORIGINAL = "_visattn_original_attn"


def _window_attn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``SwinTransformerBlock._attn`` on [B, H, W, C] input."""
    attn = block.attn
    batch, height, width, _ = x.shape
    window = tuple(block.window_size)
    dropout = block.training and attn.attn_drop.p > 0
    if height % window[0] or width % window[1] or dropout:
        # timm pads such maps and lets real queries attend the padding; attention dropout needs the matrix.
        return getattr(block, _ORIGINAL)(x)
    qkv = attn.qkv(x).view(batch, height, width, 3, attn.num_heads, -1)
    q, k, v = qkv.unbind(3)
    rpb = swin_rpb_to_visattn(attn.relative_position_bias_table, window)
    out = visattn.window_attention(q, k, v, window, shift=tuple(block.shift_size), rpb=rpb.to(q.dtype),
                                   scale=attn.scale)
    return attn.proj_drop(attn.proj(out.reshape(batch, height, width, -1)))


def _swin_blocks(model: nn.Module):
    from timm.models.swin_transformer import SwinTransformerBlock

    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def patch_swin(model: nn.Module) -> nn.Module:
    """Route every Swin block's window attention through ``visattn.window_attention``; returns ``model``."""
    blocks = _swin_blocks(model)
    if not blocks:
        raise ValueError(f"model has no timm SwinTransformerBlock to patch ({type(model).__name__})")
    for block in blocks:
        if not hasattr(block, _ORIGINAL):
            setattr(block, _ORIGINAL, block._attn)
            block._attn = types.MethodType(_window_attn, block)
    return model


def unpatch_swin(model: nn.Module) -> nn.Module:
    """Restore timm's own attention path on every patched block."""
    for block in _swin_blocks(model):
        if hasattr(block, _ORIGINAL):
            del block._attn  # the instance attribute; the class method shows through again
            delattr(block, _ORIGINAL)
    return model
