"""Run timm's HaloNet attention (``timm.layers.HaloAttn``) on ``visattn.halo_attention``: no unfolded key/value
windows, no relative-logit tensors in memory on the fused path.

Used by ``halonet_h1``, ``halonet26t``, ``sehalonet33ts``, ``halonet50ts``, ``eca_halonext26ts``, ``haloregnetz_b``,
``lamhalobotnet50ts_256`` and ``halo2botnet50ts_256`` (timm's ``byoanet`` models with ``self_attn_layer='halo'``).
The patched forward keeps timm's projections and layouts:

- ``q`` (a 1x1 conv, strided by ``block_stride`` when the module downsamples with strided query blocks) has its
  channels ordered ``[heads, dim_head_qk]``; ``kv`` has them ``[heads, dim_head_qk + dim_head_v]`` (each head's keys
  then its values), both read as heads-last views;
- the op runs with timm's ``block_size`` on the key map, so strided queries give ``block_size_ds`` queries per
  block, and ``halo_size``; timm's relative tables ``pos_embed.height_rel`` / ``width_rel`` index by window position
  minus position in the query block, which is the op's rule; ``scale_pos_embed=True`` (logits and relative logits
  both scaled) passes the tables times ``scale``;
- the output ``[heads, dim_head_v]`` channels go back to NCHW, then timm's ``pool`` (the average-pool downsample).

CPU tensors under the default backend ("auto") run timm's own path (the faster formulation there); a forced backend
(``visattn.backends.use_backend("reference")``) runs visattn's op on the CPU too.
"""

from __future__ import annotations

import torch
from torch import nn

from visattn import backends, functional
from visattn.models import _patching
from visattn.models._patching import Family

_MARK = "_visattn_halo"  # set on patched modules; the patch itself is the instance attribute forward
_ATTRS = ("q", "kv", "pos_embed", "pool", "num_heads", "dim_head_qk", "dim_head_v", "scale", "scale_pos_embed",
          "block_size", "block_size_ds", "block_stride", "halo_size", "win_size")


def halo_classes() -> tuple[type, ...]:
    """timm's HaloNet attention module class."""
    from timm.layers.halo_attn import HaloAttn

    return (HaloAttn,)


def unsupported_classes() -> dict[type, str]:
    """No HaloNet-family attention module is found but left unpatched (lambda / bottleneck attention are other
    families that keep timm's path without being reported)."""
    return {}


def why_not(module: nn.Module) -> str | None:
    """Why this ``HaloAttn`` cannot run on visattn (None: it can)."""
    missing = [n for n in _ATTRS if not hasattr(module, n)]
    if missing:
        return f"{type(module).__name__} lacks {missing} (untested timm version?)"
    pos = module.pos_embed
    if not hasattr(pos, "height_rel") or not hasattr(pos, "width_rel"):
        return f"pos_embed {type(pos).__name__} has no height_rel/width_rel (untested timm version?)"
    rows = 2 * module.win_size - 1
    if tuple(pos.height_rel.shape) != (rows, module.dim_head_qk) or tuple(pos.width_rel.shape) != (
            rows, module.dim_head_qk):
        return f"relative tables {tuple(pos.height_rel.shape)} are not [2*win_size-1, dim_head_qk]"
    if module.win_size != module.block_size + 2 * module.halo_size:
        return "win_size is not block_size + 2 * halo_size"
    if module.block_size_ds * module.block_stride != module.block_size:
        return "block_size_ds * block_stride != block_size"
    return None


def _patched_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``HaloAttn.forward`` (NCHW in, NCHW out)."""
    original = type(module).forward.__get__(module)
    if not x.is_cuda and backends.get_backend("attention") == "auto":
        # On the CPU timm's unfold + matmul path is the faster formulation; a forced backend
        # (visattn.backends.use_backend("reference")) runs visattn's op on the CPU too.
        return original(x)
    batch, _, height, width = x.shape
    block = module.block_size
    if height % block or width % block:
        return original(x)  # timm raises its own error for a map the blocks do not divide
    heads, dqk, dv = module.num_heads, module.dim_head_qk, module.dim_head_v
    q = module.q(x)  # [B, heads * dqk, H / stride, W / stride]
    q = q.view(batch, heads, dqk, q.shape[2], q.shape[3]).permute(0, 3, 4, 1, 2)
    kv = module.kv(x).view(batch, heads, dqk + dv, height, width).permute(0, 3, 4, 1, 2)
    k, v = kv[..., :dqk], kv[..., dqk:]
    rel_h, rel_w = module.pos_embed.height_rel, module.pos_embed.width_rel
    if module.scale_pos_embed:
        rel_h, rel_w = rel_h * module.scale, rel_w * module.scale
    out = functional.halo_attention(q, k, v, block, module.halo_size, rel_h, rel_w, scale=module.scale)
    out = out.permute(0, 3, 4, 1, 2).reshape(batch, heads * dv, out.shape[1], out.shape[2])
    return module.pool(out)


is_patched, patch_module, unpatch_module = _patching.rebinding("forward", _MARK, _patched_forward)


HALONET = Family(name="halonet", classes=halo_classes, unsupported=unsupported_classes, why_not=why_not,
                 patch=patch_module, unpatch=unpatch_module, is_patched=is_patched)
