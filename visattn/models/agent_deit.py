"""Agent-DeiT (Han et al., ECCV 2024, arXiv:2312.08874) as timm models over visattn's agent attention.

Architecture, read from LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_deit.py``,
``models/deit.py``, ``models/build.py`` and ``cfgs/agent_deit_{t,s,b,s_448}.yaml``): DeiT (16×16 patches, a class
token, a learned position embedding over class + patch tokens, pre-norm blocks with LayerNorm eps 1e-6, MLP ratio 4,
final norm, the class token into the head) whose first ``agent_layer`` blocks are agent blocks: all 12 in DeiT-T/S
(49 agents), the first 4 in DeiT-B (81 agents; the other 8 are DeiT's plain attention).

An agent block attends over all 1 + N tokens: agents are the adaptive average pool of the *patch* queries (the class
token is left out) to ``sqrt(agent_num)``² positions; agents attend every key, the class token's with ``ac_bias``
and the patch keys' with ``an_bias`` (7×7, bilinearly resized to the patch grid) + ``ah_bias + aw_bias``; every
query attends the agents, the class token with ``ca_bias`` and the patches with ``na_bias`` (transposed) +
``ha_bias + wa_bias``. A 3×3 depthwise conv of the patch values is added to the patch outputs only, before ``proj``.

Feature maps (``features_only`` through ``feature_cls='getter'``, as timm's ViT) are NCHW patch grids of chosen
blocks (default 2, 5, 8, 11), all at 1/16 resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from visattn import nn as visattn_nn
from visattn.models import _helpers
from visattn.models._helpers import checked_size
from visattn.models.agent import agent_cfg, tsinghua
from visattn.nn.agent import SEPARABLE_BIAS_AXIS

torch.fx.wrap("checked_size")  # a call node in any FX trace, whichever module is the traced root

__all__ = ["AgentDeiT", "DeitAgentAttention", "checkpoint_filter_fn"]

POOL_TYPES = ("", "token", "avg", "max", "avgmax")  # timm's ViT heads ('token': the class token, as released)


@register_notrace_module
class DeitAgentAttention(visattn_nn.AgentAttention):
    """Agent-DeiT's agent attention: :class:`visattn.nn.AgentAttention` in DeiT's form (``class_token=True``) on
    ``[B, 1 + H*W, C]`` tokens (class token first) of a fixed ``grid_size`` patch grid, configured with this
    family's argument order (no code of its own). Parameters: ``qkv``, ``proj``, ``dwc``, ``an_bias``,
    ``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``, ``ac_bias``, ``ca_bias``.

    Args:
        dim: channels C; num_heads: heads (divides C); grid_size: (H, W) patch grid the biases are sized for;
        agent_num: agents, a perfect square (a pooled grid); qkv_bias; proj_drop; backend: "auto" | "triton" |
        "sdpa" | "reference" (see :func:`visattn.agent_attention`); device / dtype: timm's factory keywords.
        A leaf of timm's FX tracing (the token-count check and the agent op).
    """

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int, grid_size: Sequence[int], agent_num: int = 49,
                 qkv_bias: bool = True, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__(dim, tuple(grid_size), num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         agent_num=agent_num, class_token=True, backend=backend)


class AgentBlock(_helpers.PreNormBlock):
    """Pre-norm agent-attention block, then the MLP (``fc1`` / ``fc2``, GELU), on ``[B, 1 + H*W, C]``."""

    def __init__(self, dim: int, num_heads: int, grid_size: Sequence[int], agent_num: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0, norm_layer=nn.LayerNorm,
                 backend: str = "auto"):
        attn = DeitAgentAttention(dim, num_heads, grid_size, agent_num, qkv_bias, proj_drop, backend=backend)
        super().__init__(dim, attn, mlp_ratio, proj_drop, drop_path, norm_layer)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv -> ``[B, H*W, C]`` tokens (no norm, as DeiT)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AgentDeiT(nn.Module):
    """DeiT with agent-attention blocks (Agent-DeiT).

    Args:
        img_size: input size the position embedding and biases are built for (int or (H, W); multiples of
            ``patch_size``); patch_size; in_chans; num_classes (0: pooled features); global_pool: 'token' (the class
            token, as released), 'avg' / 'max' / 'avgmax' (over the patch tokens) or '' (all tokens);
            embed_dim; depth; num_heads; mlp_ratio; qkv_bias; drop_rate (head); pos_drop_rate (after the position
            embedding); proj_drop_rate (attention and MLP outputs: the official ``drop_rate``); drop_path_rate;
            agent_num: agents of every agent block (int) or one entry per block; agent_layer: how many leading blocks
            are agent blocks (None or < 1: all, the official -1); backend: attention backend of every agent block;
            device / dtype: timm's factory keywords.
    """

    num_prefix_tokens = 1  # the class token

    @_helpers.factory_kwargs
    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0, agent_num: int | Sequence[int] = 49,
                 agent_layer: int | None = None, backend: str = "auto", **kwargs):
        super().__init__()
        _helpers.reject_unknown("AgentDeiT", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
                                  proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size={patch_size}")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        agents = [int(agent_num)] * depth if isinstance(agent_num, int) else [int(a) for a in agent_num]
        if len(agents) != depth:
            raise ValueError(f"agent_num must be an int or one entry per block (depth={depth}), got {agent_num!r}")
        agent_layer = depth if agent_layer is None or agent_layer < 1 else min(int(agent_layer), depth)
        self.global_pool = _check_pool(global_pool)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        rates = _helpers.drop_path_schedule([depth], drop_path_rate)[0]
        self.blocks = nn.Sequential(*[
            AgentBlock(embed_dim, num_heads, self.grid_size, agents[i], mlp_ratio, qkv_bias, proj_drop_rate,
                       rates[i], norm_layer, backend=backend)
            if i < agent_layer else
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, drop_path=rates[i],
                  norm_layer=norm_layer)  # DeiT's plain attention block (same names: norm1, attn.qkv/proj, ...)
            for i in range(depth)
        ])
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_helpers.StagedBackbone._init_weights)  # timm's truncated-normal Linear / unit LayerNorm init

    # ------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The official set (``pos_embed``, ``cls_token``)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None),
                                                                       (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = _helpers.classifier(self, self.embed_dim, num_classes)

    def _tokens(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> class + patch tokens with the position embedding ``[B, 1 + N, C]``."""
        x = checked_size(x, self.img_size, 2,
                         f"AgentDeiT: input {{got}} but the position embedding and biases are sized for "
                         f"img_size={self.img_size}; create the model with img_size= for this input "
                         f"(checkpoints are resized by checkpoint_filter_fn)")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs (timm's ViT signature).

        Args:
            x: images ``[B, C, H, W]``; indices: last n blocks (int), the given block indices (list), or all (None);
            return_prefix_tokens: also return each block's class token ``[B, 1, C]`` (as ``(map, prefix)``
            pairs); norm: apply the final norm to every taken output; stop_early: stop after the last wanted
            block; output_fmt: "NCHW" (patch grids ``[B, C, H/16, W/16]``) or "NLC" (patch tokens ``[B, N, C]``);
            intermediates_only: return only the list.
        Returns:
            ``[maps]`` or ``(final normalised tokens [B, 1 + N, C], [maps])``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks if (torch.jit.is_scripting() or not stop_early) else self.blocks[: max_index + 1]
        x = self._tokens(x)
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        maps = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            maps = [y.reshape(y.shape[0], *self.grid_size, -1).permute(0, 3, 1, 2).contiguous() for y in maps]
        if return_prefix_tokens:
            maps = list(zip(maps, prefix, strict=True))
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last wanted one (and the norm / head); returns the kept indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> normalised tokens ``[B, 1 + H/16 * W/16, embed_dim]`` (class token first)."""
        x = self._tokens(x)
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing and not torch.jit.is_scripting() else (
            self.blocks(x))
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens (``global_pool``), dropout, classifier (skipped when ``pre_logits``)."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:
            patches = x[:, self.num_prefix_tokens:]
            mean, peak = patches.mean(1), patches.amax(1)
            x = {"avg": mean, "max": peak, "avgmax": 0.5 * (mean + peak)}[self.global_pool]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    return global_pool


# ----------------------------------------------------------------------------------------------- checkpoints
_SEPARABLE = tuple(SEPARABLE_BIAS_AXIS)  # the separable agent biases (official: 5-D)


def _resize_pos_embed(value: Tensor, grid_size: Sequence[int]) -> Tensor:
    """``[1, 1 + n*n, C]`` (class token first, square grid) -> ``[1, 1 + H*W, C]``: the grid resized bilinearly,
    as the official ``resize_pos_embed``."""
    side = math.isqrt(value.shape[1] - 1)
    if side * side != value.shape[1] - 1:
        raise ValueError(f"cannot resize a position embedding of 1 + {value.shape[1] - 1} tokens (not a square "
                         f"grid) to {tuple(grid_size)}")
    grid = value[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], -1).to(value.dtype)
    return torch.cat([value[:, :1], grid], dim=1)


def checkpoint_filter_fn(state_dict, model: AgentDeiT | None = None) -> dict:
    """Map an official Agent-DeiT checkpoint (``checkpoint["model"]`` of LeapLabTHU/Agent-Attention) to this module.

    The names are the official ones; the separable agent biases lose their leading 1 (``[1, heads, ...]`` ->
    ``[heads, ...]``). When ``model`` was built for another ``img_size``, the position embedding (bilinearly, as
    the official ``resize_pos_embed``) and the separable biases (linearly along their spatial axis) are resized to
    it. A state dict already in visattn's layout and size is returned unchanged. Raises TypeError for ``None``, a
    bare tensor or non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "Agent-DeiT")
    if any(k.endswith(_SEPARABLE) and getattr(v, "dim", lambda: 0)() == 5 for k, v in state_dict.items()):
        state_dict = {k: (v.squeeze(0) if k.endswith(_SEPARABLE) and v.dim() == 5 else v)
                      for k, v in state_dict.items()}
    if model is None:
        return state_dict

    def resize_pos_embed(key: str, value: Tensor, want: torch.Size) -> Tensor:
        return _resize_pos_embed(value, model.grid_size) if key == "pos_embed" else value

    return _helpers.resize_to_model(state_dict, model, resize_pos_embed)


# ----------------------------------------------------------------------------------------------- registry
def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    # features_only as timm's ViT: a getter over forward_intermediates; default the 4 evenly spaced blocks
    depth = kwargs.get("depth", 12)
    out_indices = kwargs.pop("out_indices", tuple(depth * (i + 1) // 4 - 1 for i in range(4)))
    out_indices = _helpers.check_out_indices(out_indices, depth, "blocks")
    return _helpers.create(AgentDeiT, variant, pretrained, checkpoint_filter_fn,
                           dict(out_indices=out_indices, feature_cls="getter"), kwargs)


def _cfg(url: tuple[str, str] | str = "", **kwargs) -> dict:
    return agent_cfg(url, **dict(dict(pool_size=None), **kwargs))


default_cfgs = generate_default_cfgs({
    "agent_deit_t.in1k": _cfg(tsinghua("57e0904221824ee7b7af", "agent_deit_t.in1k")),
    "agent_deit_s.in1k": _cfg(tsinghua("fdd43304372541db8ea7", "agent_deit_s.in1k")),
    "agent_deit_s.in1k_448": _cfg(tsinghua("a228f86241c445f1969b", "agent_deit_s.in1k_448"),
                                  input_size=(3, 448, 448)),
    "agent_deit_b.in1k": _cfg(tsinghua("5115f15fdd7e4ab58fbc", "agent_deit_b.in1k")),
})


@register_model
def agent_deit_t(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-T (6.0M, 1.2 GMACs): DeiT-T (192 wide, 3 heads) with agent attention (49 agents) in all 12
    blocks."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, agent_num=49, drop_path_rate=0.0)
    return _create_agent_deit("agent_deit_t", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_s(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-S (22.7M, 4.4 GMACs): DeiT-S (384 wide, 6 heads) with agent attention (49 agents) in all 12
    blocks."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, agent_num=49, drop_path_rate=0.1)
    return _create_agent_deit("agent_deit_s", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_b(pretrained: bool = False, **kwargs) -> AgentDeiT:
    """Agent-DeiT-B (87.2M, 17.6 GMACs): DeiT-B (768 wide, 12 heads) with agent attention (81 agents) in the
    first 4 of 12 blocks."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layer=4,
                drop_path_rate=0.3)
    return _create_agent_deit("agent_deit_b", pretrained, **dict(args, **kwargs))
