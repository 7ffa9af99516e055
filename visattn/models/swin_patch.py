"""Run timm's Swin Transformer (v1 and v2) on visattn's window attention: no window partition and no mask tensor.

``patch_swin(model)`` (``patch_timm`` for Swin only) rebinds ``_attn`` of every ``SwinTransformerBlock`` /
``SwinTransformerV2Block`` of a timm model to a version that projects qkv over the whole map and calls
``visattn.window_attention`` with the block's window, effective shift and relative-position bias (converted on the
fly from timm's own parameters, so gradients reach them and checkpoints stay timm's). ``unpatch_swin`` restores
timm's path.

- Swin v1: the ``relative_position_bias_table`` ``[(2w-1)², heads]`` becomes visattn's ``[heads, 2w-1, 2w-1]`` rpb.
- Swin v2: cosine attention with a per-head learned logit scale and a continuous position bias. The bias is
  ``16·sigmoid(cpb_mlp(coords))`` evaluated on the ``(2w-1)²`` relative offsets — a function of the offset only, so
  it is an rpb table too; the logit scale is folded into the normalised q and the op runs with ``scale=1``.
- Maps that the window does not divide (e.g. swin_tiny at 256²: 64 is not a multiple of 7) are handled exactly as
  timm does (roll by -shift, zero-pad bottom/right before the qkv projection so padded tokens carry its bias,
  shifted-window regions of the padded map, crop, roll back): the padded map is rolled into visattn's shifted-window
  frame, so such blocks run on visattn too (with two rolls; divisible maps need none).
- Attention dropout in training needs the probability matrix: such blocks warn once and run timm's own path.
- CPU tensors under the default backend ("auto") run timm's own path: on the CPU it is the faster formulation.
"""

from __future__ import annotations

import math
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from visattn import backends, functional
from visattn.models import _patching
from visattn.models._patching import Family
from visattn.nn.positional import swin_rpb_to_visattn

_ORIGINAL = "_visattn_original_attn"


def _block_classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.swin_transformer_v2 import SwinTransformerV2Block

    return SwinTransformerBlock, SwinTransformerV2Block


def _is_v2(block: nn.Module) -> bool:
    return hasattr(block.attn, "logit_scale")


def _attend_v1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Swin v1 window attention on the packed qkv (one packed gradient for the projection on the fused kernels)."""
    attn = block.attn
    qkv = attn.qkv(x).view(*x.shape[:3], 3, attn.num_heads, -1)
    rpb = swin_rpb_to_visattn(attn.relative_position_bias_table, block.window_size).to(qkv.dtype)
    return functional._window_packed(qkv, tuple(block.window_size), tuple(block.shift_size), rpb, attn.scale, None)


def _qkv_v2(block: nn.Module, x: torch.Tensor):
    attn = block.attn
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:  # timm: cat(q_bias, k_bias = 0, v_bias); with a bias-free qkv Linear, adding it separately is the same
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias)
    q, k, v = qkv.view(*x.shape[:3], 3, attn.num_heads, -1).unbind(3)
    logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(attn.num_heads, 1)
    q = F.normalize(q, dim=-1) * logit_scale.to(q.dtype)  # cosine logits times the per-head scale
    k = F.normalize(k, dim=-1)
    table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
    return q, k, v, swin_rpb_to_visattn(table, block.window_size), 1.0


def _attend(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Window attention of a window-divisible [B, H, W, C] map with visattn shifted-window semantics."""
    batch, height, width, _ = x.shape
    if _is_v2(block):
        q, k, v, rpb, scale = _qkv_v2(block, x)
        out = functional.window_attention(q, k, v, tuple(block.window_size), shift=tuple(block.shift_size),
                                          rpb=rpb.to(q.dtype), scale=scale)
    else:
        out = _attend_v1(block, x)
    attn = block.attn
    return attn.proj_drop(attn.proj(out.reshape(batch, height, width, -1)))


def _window_attn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``SwinTransformer(V2)Block._attn`` on [B, H, W, C] input."""
    if not x.is_cuda and backends.get_backend("attention") == "auto":
        # On the CPU timm's own path is the faster formulation (it rolls and partitions x once, before the qkv
        # projection; a q/k/v API must move 3x the channels): benchmarks/cpu_backbones.py. A forced backend
        # (visattn.backends.use_backend("reference")) runs visattn's ops on the CPU too.
        return getattr(block, _ORIGINAL)(x)
    if block.training and block.attn.attn_drop.p > 0:
        warnings.warn(f"visattn patch_swin: attn_drop={block.attn.attn_drop.p} in training needs the attention "
                      f"matrix; this block runs timm's own path", stacklevel=2)
        return getattr(block, _ORIGINAL)(x)
    height, width = x.shape[1:3]
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    pad_h, pad_w = -height % window[0], -width % window[1]
    if not (pad_h or pad_w):
        return _attend(block, x)
    # timm: roll(-shift), zero-pad, masked windows, crop, roll(+shift). visattn's shift-t windows on z equal
    # roll(masked windows of roll(z, -t), +t), so z = roll(pad(roll(x, -t)), +t) reproduces timm exactly.
    dims = (1, 2)
    has_shift = any(shift)
    neg = (-shift[0], -shift[1])
    z = torch.roll(x, neg, dims) if has_shift else x
    z = F.pad(z, (0, 0, 0, pad_w, 0, pad_h))
    z = torch.roll(z, shift, dims) if has_shift else z
    out = _attend(block, z)
    out = torch.roll(out, neg, dims) if has_shift else out
    out = out[:, :height, :width]
    return torch.roll(out, shift, dims) if has_shift else out.contiguous()


def _block_classes_unsupported() -> dict[type, str]:
    try:
        from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock
    except ImportError:  # pragma: no cover - every supported timm has it
        return {}
    return {SwinTransformerV2CrBlock: "swinv2_cr_* block (timm's own post-norm SwinV2 variant) is not supported; "
                                      "runs timm's path"}


def _why_not(block: nn.Module) -> str | None:
    """Why this block cannot run on visattn (None: it can)."""
    attn = block.attn
    if not hasattr(block, "_attn") or not hasattr(block, "window_size") or not hasattr(block, "shift_size"):
        return f"{type(block).__name__} has no _attn/window_size/shift_size (untested timm version?)"
    if _is_v2(block):
        missing = [n for n in ("cpb_mlp", "relative_coords_table", "q_bias", "v_bias") if not hasattr(attn, n)]
    else:
        missing = [n for n in ("relative_position_bias_table", "scale") if not hasattr(attn, n)]
    if missing:
        return f"{type(attn).__name__} lacks {missing} (untested timm version?)"
    return None


def _patch_block(block: nn.Module) -> None:
    if not hasattr(block, _ORIGINAL):
        setattr(block, _ORIGINAL, block._attn)
        block._attn = types.MethodType(_window_attn, block)


def _unpatch_block(block: nn.Module) -> None:
    if hasattr(block, _ORIGINAL):
        del block._attn  # the instance attribute; the class method shows through again
        delattr(block, _ORIGINAL)


SWIN = Family(name="swin", classes=_block_classes, unsupported=_block_classes_unsupported, why_not=_why_not,
              patch=_patch_block, unpatch=_unpatch_block, is_patched=lambda block: hasattr(block, _ORIGINAL))


def patch_swin(model: nn.Module) -> nn.Module:
    """Route every Swin / SwinV2 block's window attention through ``visattn.window_attention``; returns ``model``.

    ``patch_timm`` with ``families=("swin",)`` and ``strict=True``, returning the model. Raises ValueError when the
    model has no timm Swin block or a block's layout is not the one this was written against (naming the block and
    what is missing), before anything is changed.
    """
    _patching.apply(model, (SWIN,), strict=True, caller="patch_swin")
    return model


def patched_block_count(model: nn.Module) -> tuple[int, int]:
    """(blocks running on visattn, Swin blocks in the model)."""
    return _patching.count(model, SWIN)


def unpatch_swin(model: nn.Module) -> nn.Module:
    """Restore timm's own attention path on every patched Swin block (``unpatch_timm`` for Swin only)."""
    return _patching.remove(model, (SWIN,))
