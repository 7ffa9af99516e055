"""Run timm's MaxViT / MaxxViT partition attention on visattn's ops: no window or grid partition, no bias gather.

timm's ``PartitionAttentionCl`` (NHWC), ``PartitionAttention2d`` (NCHW, ``transformer_use_nchw_attn=True``) and
``ParallelPartitionAttention`` (``maxvit_tiny_pm``) partition the map, run ``AttentionCl`` / ``Attention2d`` on
every partition with a relative-position bias, and reverse the partition. The patched ``_partition_attn`` projects
qkv over the whole map and calls one op per attention:

- **block** attention (non-overlapping ``P x P`` windows) is ``visattn.window_attention`` with window ``P``;
- **grid** attention (a ``G x G`` grid strided across an ``H x W`` map: token ``(i, j)`` of a partition sits at
  ``(i * H/G + a, j * W/G + b)``) is ``visattn.na2d`` with ``kernel_size = G`` and ``dilation = (H/G, W/G)``: the
  dilation groups are exactly the partitions, a kernel of ``G`` covers a whole group (``G * H/G = H``, so no
  clamping ever moves a window), and NA's rpb is indexed by the key-minus-query offset in dilation-group
  coordinates, which are the partition coordinates timm's bias uses.

timm's bias modules fold into the ``[heads, 2P-1, 2P-1]`` table the ops take, from the module's own parameters on
every forward (so gradients reach them and state dicts stay timm's):

- ``RelPosBias``: a Swin-layout ``[(2P-1)^2, heads]`` query-minus-key table (heads first, offsets flipped);
- ``RelPosBiasTf``: already ``[heads, 2P-1, 2P-1]`` key-minus-query (its one-hot einsum reads
  ``table[h, key - query + P - 1]``);
- ``RelPosMlp`` (the ``rmlp`` models): its MLP evaluated once on its ``(2P-1)^2`` relative log-coordinates (what
  timm evaluates too, dropout included, before gathering), then its activation and gain.

CPU tensors under the default backend ("auto") run timm's own path (the faster formulation there, as for Swin);
a forced backend (``visattn.backends.use_backend("reference")``) runs visattn's ops on the CPU too. Attention
dropout in training needs the probability matrix: such modules warn and run timm's path.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from visattn import backends, functional
from visattn.models import _patching
from visattn.models._patching import Family
from visattn.nn.positional import swin_rpb_to_visattn

_MARK = "_visattn_maxvit"  # set on patched modules; the patch itself is the instance attribute _partition_attn


def partition_classes() -> tuple[type, ...]:
    """timm's MaxViT partition-attention module classes this patch handles."""
    from timm.models.maxxvit import ParallelPartitionAttention, PartitionAttention2d, PartitionAttentionCl

    return PartitionAttentionCl, PartitionAttention2d, ParallelPartitionAttention


def unsupported_classes() -> dict[type, str]:
    """timm attention modules of the MaxViT file that are found but not patched, with the reason."""
    from timm.models.maxxvit import TransformerBlock2d

    return {TransformerBlock2d: "global attention over the whole map (CoAtNet 'T' block): no window or grid "
                                "structure for visattn to exploit; runs timm's path"}


def _attentions(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(attention module, is_block) pairs of a partition module, in the order timm runs them."""
    from timm.models.maxxvit import ParallelPartitionAttention

    if isinstance(module, ParallelPartitionAttention):
        return [(module.attn_block, True), (module.attn_grid, False)]
    return [(module.attn, bool(module.partition_block))]


def bias_table(rel_pos: nn.Module | None, window: tuple[int, int]) -> torch.Tensor | None:
    """timm's relative-position module (or None) as visattn's key-minus-query rpb ``[heads, 2w0-1, 2w1-1]``.

    Differentiable in the module's parameters. Raises ValueError for a module or a layout it does not know.
    """
    from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp

    if rel_pos is None:
        return None
    if isinstance(rel_pos, RelPosBiasTf):
        return rel_pos.relative_position_bias_table
    if isinstance(rel_pos, RelPosBias):
        return swin_rpb_to_visattn(rel_pos.relative_position_bias_table, window)
    if isinstance(rel_pos, RelPosMlp):
        table = rel_pos.mlp(rel_pos.rel_coords_log)  # [2w0-1, 2w1-1, heads], query-minus-key coordinates
        rpb = swin_rpb_to_visattn(table.reshape(-1, rel_pos.num_heads), window)
        rpb = rel_pos.bias_act(rpb)  # elementwise, so it commutes with timm's gather
        return rpb if rel_pos.bias_gain is None else rel_pos.bias_gain * rpb
    raise ValueError(f"relative position module {type(rel_pos).__name__} is not supported")


def _why_not_bias(rel_pos: nn.Module | None, window: tuple[int, int]) -> str | None:
    from timm.layers.pos_embed_rel import RelPosBias, RelPosBiasTf, RelPosMlp

    if rel_pos is None:
        return None
    name = type(rel_pos).__name__
    if not isinstance(rel_pos, (RelPosBias, RelPosBiasTf, RelPosMlp)):
        return f"relative position module {name} is not supported"
    if getattr(rel_pos, "prefix_tokens", 0):
        return f"{name} with prefix tokens (a class token has no place in a window)"
    if tuple(rel_pos.window_size) != tuple(window):
        return f"{name} window {tuple(rel_pos.window_size)} differs from the partition size {tuple(window)}"
    if isinstance(rel_pos, RelPosMlp):
        names = ("mlp", "rel_coords_log", "bias_act", "bias_gain", "num_heads")
        missing = [n for n in names if not hasattr(rel_pos, n)]
        if missing or getattr(rel_pos, "relative_position_index", None) is None:
            return f"RelPosMlp lacks {missing or ['relative_position_index']} (untested timm version?)"
    return None


def why_not(module: nn.Module) -> str | None:
    """Why this partition module cannot run on visattn (None: it can)."""
    if not hasattr(module, "_partition_attn") or not hasattr(module, "partition_size"):
        return f"{type(module).__name__} has no _partition_attn/partition_size (untested timm version?)"
    window = tuple(module.partition_size)
    for attn, _ in _attentions(module):
        missing = [n for n in ("qkv", "proj", "proj_drop", "attn_drop", "num_heads", "dim_head", "head_first",
                               "scale", "rel_pos") if not hasattr(attn, n)]
        if missing:
            return f"{type(attn).__name__} lacks {missing} (untested timm version?)"
        if (reason := _why_not_bias(attn.rel_pos, window)) is not None:
            return reason
    return None


def _qkv(attn: nn.Module, x: torch.Tensor, nchw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, W, heads, dim_head]`` (views) of timm's qkv projection of the whole map."""
    heads, dim = attn.num_heads, attn.dim_head
    qkv = attn.qkv(x)
    if nchw:  # Attention2d: channels [heads, 3, d] (head_first) or [3, heads, d], then H, W
        batch, _, height, width = qkv.shape
        shape = (batch, heads, 3, dim, height, width) if attn.head_first else (batch, 3, heads, dim, height, width)
        parts = qkv.view(shape).unbind(2 if attn.head_first else 1)
        return tuple(p.permute(0, 3, 4, 1, 2) for p in parts)
    batch, height, width, _ = qkv.shape
    if attn.head_first:
        return qkv.view(batch, height, width, heads, 3, dim).unbind(4)
    return qkv.view(batch, height, width, 3, heads, dim).unbind(3)


def _attend(attn: nn.Module, x: torch.Tensor, block: bool, window: tuple[int, int], nchw: bool) -> torch.Tensor:
    """One timm attention module over the whole map in ``x``'s layout: block (windows) or grid (dilated NA)."""
    q, k, v = _qkv(attn, x, nchw)
    batch, height, width = q.shape[:3]
    rpb = bias_table(attn.rel_pos, window)
    rpb = None if rpb is None else rpb.to(q.dtype)
    if block:
        out = functional.window_attention(q, k, v, window, rpb=rpb, scale=attn.scale)
    else:
        dilation = (height // window[0], width // window[1])
        out = functional.na2d(q, k, v, window, dilation=dilation, scale=attn.scale, rpb=rpb)
    out = out.reshape(batch, height, width, -1)
    if nchw:
        out = out.permute(0, 3, 1, 2)
    return attn.proj_drop(attn.proj(out))


def _patched_partition_attn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for timm's ``_partition_attn`` (NHWC, or NCHW for ``PartitionAttention2d``)."""
    from timm.models.maxxvit import ParallelPartitionAttention, PartitionAttention2d

    original = type(module)._partition_attn.__get__(module)
    if not x.is_cuda and backends.get_backend("attention") == "auto":
        # On the CPU timm's partition + SDPA path is the faster formulation (benchmarks/cpu_backbones.py); a forced
        # backend (visattn.backends.use_backend("reference")) runs visattn's ops on the CPU too.
        return original(x)
    attentions = _attentions(module)
    if module.training and any(a.attn_drop.p > 0 for a, _ in attentions):
        warnings.warn(f"visattn patch_timm: attn_drop in training needs the attention matrix; this "
                      f"{type(module).__name__} runs timm's own path", stacklevel=2)
        return original(x)
    nchw = isinstance(module, PartitionAttention2d)
    window = tuple(module.partition_size)
    height, width = x.shape[2:4] if nchw else x.shape[1:3]
    if height % window[0] or width % window[1]:
        return original(x)  # timm raises its own error for a map the partition does not divide
    outs = [_attend(attn, x, block, window, nchw) for attn, block in attentions]
    if isinstance(module, ParallelPartitionAttention):
        return torch.cat(outs, dim=-1)
    return outs[0]


is_patched, patch_module, unpatch_module = _patching.rebinding("_partition_attn", _MARK, _patched_partition_attn)


MAXVIT = Family(name="maxvit", classes=partition_classes, unsupported=unsupported_classes, why_not=why_not,
                patch=patch_module, unpatch=unpatch_module, is_patched=is_patched)
