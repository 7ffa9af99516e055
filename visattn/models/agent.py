"""Agent-Swin (Han et al., ECCV 2024, arXiv:2312.08874) as timm models over visattn's agent and window attention.

Architecture, read from LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_swin.py`` and
``cfgs/agent_swin_{t,s,b}.yaml``): Swin-T/S/B (4×4 patch embedding + LayerNorm, patch merging between stages,
pre-norm blocks, MLP ratio 4) whose blocks are of two kinds per the ``attn_type`` string:

- ``A`` — agent attention over the whole stage map (the configs set ``WINDOW_SIZE = img_size / 4``, so the
  window covers every stage): agents are the adaptive average pool of q to ``sqrt(agent_num)``² positions
  (9 / 16 / 49 / 49 per stage); agents attend the keys with the position bias ``an_bias`` (7×7 grid, bilinearly
  resized to the map) + ``ah_bias + aw_bias``; queries attend the agents with ``na_bias`` (transposed) +
  ``ha_bias + wa_bias``; a 3×3 depthwise conv of v is added before the output projection.
- ``B`` — Swin window attention with a relative-position-bias table, window ``max(7, window_size // 8)`` and
  shifted windows in odd blocks (no shift when the window covers the map).

``M<n>`` makes the first n blocks of a stage ``A`` and the rest ``B`` (Agent-Swin-B uses ``AAMB2``).
Feature maps are NHWC, like timm's Swin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from visattn import nn as visattn_nn
from visattn.models import _helpers
from visattn.models._helpers import checked_size

torch.fx.wrap("checked_size")  # a call node in any FX trace, whichever module is the traced root

__all__ = ["AgentSwinTransformer", "AgentAttention", "WindowAttention", "checkpoint_filter_fn", "parse_attn_types"]



@register_notrace_module
class AgentAttention(visattn_nn.AgentAttention):
    """Agent-Swin's agent attention: :class:`visattn.nn.AgentAttention` over a whole ``[B, H, W, C]`` map of fixed
    size ``map_size``, configured with this family's argument order (no code of its own). Parameters: ``qkv``,
    ``proj``, ``dwc``, ``an_bias``, ``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``.

    Args:
        dim: channels C; num_heads: heads; map_size: (H, W) the separable biases are sized for;
        agent_num: agents (a perfect square: a pooled grid); qkv_bias; proj_drop; backend: "auto" | "reference" |
        "triton" | "sdpa" ("auto" takes the fused Triton kernels on CUDA); device / dtype: timm's factory keywords.
        A leaf of timm's FX tracing (the map-size check and the agent op).
    """

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int, map_size: Sequence[int], agent_num: int = 49, qkv_bias: bool = True,
                 proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__(dim, tuple(map_size), num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         agent_num=agent_num, backend=backend)


@register_notrace_module
class WindowAttention(visattn_nn.WindowAttention):
    """Agent-Swin's window blocks: :class:`visattn.nn.WindowAttention` with Swin's ``relative_position_bias_table``
    ``[(2w-1)², heads]`` (``rpb_layout="swin"``, converted to visattn's rpb on the fly), configured with this
    family's argument order; ``shift`` is Swin's ``shift_size``. Takes timm's ``device`` / ``dtype``; a leaf of
    timm's FX tracing."""

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift: Sequence[int] = (0, 0),
                 qkv_bias: bool = True, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__(dim, tuple(window_size), num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         shift_size=tuple(shift), rpb_layout="swin", backend=backend)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv + LayerNorm -> NHWC tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@register_notrace_module
class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging on NHWC: concat (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]),
    LayerNorm(4C), Linear(4C -> 2C, no bias). A leaf of timm's FX tracing (the even-sides check)."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"PatchMerging: the map {(height, width)} must have even sides")
        # (B, H/2, 2[h], W/2, 2[w], C) -> order (w, h) so the 4C vector is [x00, x10, x01, x11] as in Swin
        x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class AgentSwinBlock(_helpers.PreNormBlock):
    """Pre-norm block: ``A`` (agent attention over the map) or ``B`` (shifted window attention), then MLP."""

    def __init__(self, dim: int, num_heads: int, map_size: Sequence[int], attn_type: str, agent_num: int,
                 window_size: int, shift: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, backend: str = "auto"):
        if attn_type == "A":
            attn = AgentAttention(dim, num_heads, map_size, agent_num, qkv_bias, proj_drop, backend=backend)
        elif attn_type == "B":
            # official rule: a window as large as the map covers it, unshifted
            window = (min(window_size, map_size[0]), min(window_size, map_size[1]))
            shifts = tuple(0 if min(map_size) <= window_size else shift for _ in range(2))
            attn = WindowAttention(dim, num_heads, window, shifts, qkv_bias, proj_drop, backend=backend)
        else:
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (window), got {attn_type!r}")
        super().__init__(dim, attn, mlp_ratio, proj_drop, drop_path, norm_layer)


class AgentSwinStage(nn.Module):
    """Optional patch merging (entering the stage, timm's layout) followed by blocks on an NHWC map."""

    def __init__(self, in_dim: int, dim: int, map_size: Sequence[int], depth: int, num_heads: int,
                 attn_types: Sequence[str], agent_num: int, window_size: int, drop_path: Sequence[float],
                 downsample: bool, norm_layer=nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.downsample = PatchMerging(in_dim, norm_layer) if downsample else nn.Identity()
        self.grad_checkpointing = False
        b_window = max(7, window_size // 8)  # official: window of the 'B' blocks
        self.blocks = nn.Sequential(*[
            AgentSwinBlock(dim, num_heads, map_size, attn_types[j], agent_num,
                           window_size if attn_types[j] == "A" else b_window,
                           0 if j % 2 == 0 else (window_size if attn_types[j] == "A" else b_window) // 2,
                           drop_path=drop_path[j], norm_layer=norm_layer, **block_kwargs)
            for j in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return _helpers.run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


def parse_attn_types(attn_type: str, depths: Sequence[int]) -> list[list[str]]:
    """The official ``attn_type`` string -> per-block 'A'/'B' lists: one letter per stage; an 'M' stage takes the
    trailing number n (``AAMB2``): its first n blocks are 'A', the rest 'B'."""
    stages = len(depths)
    letters, tail = attn_type[:stages], attn_type[stages:]
    if len(letters) != stages or any(c not in "ABM" for c in letters) or ("M" in letters) != bool(tail) or (
            tail and not tail.isdigit()):
        raise ValueError(f"attn_type must be one of A/B/M per stage plus a block count after an M "
                         f"(e.g. 'AAAB', 'AAMB2'), got {attn_type!r}")
    out = []
    for letter, depth in zip(letters, depths, strict=True):
        if letter == "M":
            out.append(["A" if j < int(tail) else "B" for j in range(depth)])
        else:
            out.append([letter] * depth)
    return out


class AgentSwinTransformer(_helpers.StagedBackbone):
    """Swin Transformer with agent-attention blocks (Agent-Swin).

    Args:
        img_size: input size the position biases are built for (int or (H, W); multiples of 32);
        patch_size; in_chans; num_classes (0: pooled features); global_pool: '', 'avg', 'max', 'avgmax',
        'catavgmax'; embed_dim; depths; num_heads; window_size: the config's window (default img_size/patch_size,
        which makes the agent blocks global; the 'B' window is max(7, window_size // 8)); mlp_ratio; qkv_bias;
        drop_rate (head); proj_drop_rate; drop_path_rate; agent_num: per stage; attn_type: see
        :func:`parse_attn_types`; norm_layer; backend: attention backend of every block; device / dtype: timm's
        factory keywords.
    """

    _stem_name, _stages_name = "patch_embed", "layers"  # the checkpoints' names

    @_helpers.factory_kwargs
    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, agent_num: Sequence[int] = (9, 16, 49, 49), attn_type: str = "AAAB",
                 norm_layer=nn.LayerNorm, backend: str = "auto", **kwargs):
        super().__init__()
        _helpers.reject_unknown("AgentSwinTransformer", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
                                  drop_path_rate=drop_path_rate)
        for name, value in (("num_heads", num_heads), ("agent_num", agent_num)):
            if len(value) != len(depths):
                raise ValueError(f"{name} {tuple(value)} must have one entry per stage of depths {tuple(depths)}")
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        stride = patch_size * 2 ** (len(depths) - 1)
        if any(s % stride for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of {stride} (patch_size * 2**(stages-1))")
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        window_size = max(grid) if window_size is None else int(window_size)
        block_types = parse_attn_types(attn_type, depths)
        self.global_pool = _helpers.check_pool_type(global_pool)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm_layer)
        rates = _helpers.drop_path_schedule(depths, drop_path_rate)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2**i)
            map_size = (grid[0] // 2**i, grid[1] // 2**i)
            if "A" in block_types[i] and max(map_size) > window_size:
                raise ValueError(f"agent blocks attend the whole stage map: window_size={window_size} must cover "
                                 f"stage {i}'s map {map_size} (leave window_size=None for img_size/patch_size)")
            stages.append(AgentSwinStage(
                dim // 2 if i else embed_dim, dim, map_size, depth, num_heads[i], block_types[i], int(agent_num[i]),
                window_size, rates[i], downsample=i > 0, norm_layer=norm_layer, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, backend=backend,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.layers = nn.Sequential(*stages)
        self._agent_blocks = any("A" in types for types in block_types)
        self._init_head(norm_layer(self.num_features), drop_rate)

    def _embed(self, x: Tensor) -> Tensor:
        if self._agent_blocks:  # their position biases are tied to the stage maps of img_size
            x = checked_size(x, self.img_size, 2,
                             f"AgentSwinTransformer: input {{got}} but the agent position biases are sized for "
                             f"img_size={self.img_size}; create the model with img_size= for this input "
                             f"(checkpoints are resized by checkpoint_filter_fn)")
        return self.patch_embed(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Swin's relative-position tables (the official ``no_weight_decay_keywords``)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


# ----------------------------------------------------------------------------------------------- checkpoints
def _is_official(state_dict: dict) -> bool:
    """agent_swin.py ends stage i with its PatchMerging (``layers.0.downsample`` exists; ours never has one) and
    saves the ``relative_position_index`` / ``attn_mask`` buffers, which this module does not keep."""
    return any(k.startswith("layers.0.downsample.") or k.endswith((".relative_position_index", ".attn_mask"))
               for k in state_dict)


def _resize_swin_table(key: str, value: Tensor, want: torch.Size) -> Tensor:
    """Swin tables of another window bicubically (Swin's recipe); the agent biases are resized by the caller."""
    if key.endswith("relative_position_bias_table"):
        old, new = math.isqrt(value.shape[0]), math.isqrt(want[0])
        return _helpers.resize_swin_table(value, ((old + 1) // 2,) * 2, ((new + 1) // 2,) * 2)
    return value


def checkpoint_filter_fn(state_dict, model: AgentSwinTransformer | None = None) -> dict:
    """Map an official Agent-Swin checkpoint (``checkpoint["model"]`` of LeapLabTHU/Agent-Attention) to this module.

    ``layers.i.downsample`` -> ``layers.{i+1}.downsample``; the ``relative_position_index`` and ``attn_mask``
    buffers are dropped (the window op needs neither); the separable agent biases lose their leading 1
    (``[1, heads, ...]`` -> ``[heads, ...]``). When ``model`` was built for another ``img_size``, the
    position biases are resized to it. A state dict already in visattn's layout and size is returned unchanged.
    Raises TypeError for ``None``, a bare tensor or non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "Agent-Swin")
    if _is_official(state_dict):
        converted = {}
        for key, value in state_dict.items():
            if key.endswith((".relative_position_index", ".attn_mask")):
                continue
            match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
            if key.endswith((".ah_bias", ".aw_bias", ".ha_bias", ".wa_bias")) and value.dim() == 5:
                value = value.squeeze(0)  # official [1, heads, ...] -> ours [heads, ...]
            converted[f"layers.{int(match[1]) + 1}.downsample.{match[2]}" if match else key] = value
        state_dict = converted
    return state_dict if model is None else _helpers.resize_to_model(state_dict, model, _resize_swin_table)


# ----------------------------------------------------------------------------------------------- registry
def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return _helpers.create(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn,
                           _helpers.feature_cfg(kwargs, (2, 2, 6, 2)), kwargs)


def agent_cfg(url: str | tuple[str, str] = "", **kwargs) -> dict:
    """The pretrained config shared by the Agent-Attention families (Swin / PVT / DeiT) with ``kwargs`` on top;
    ``url`` is ``(url, cache file name)`` (see :func:`tsinghua`).

    fixed_input_size: timm then builds at the tag's input size (img_size), which sizes the agent biases (and the
    PVT / DeiT position embeddings). Evaluation as in agent_transformer/data/build.py: resize to 256/224 of the size,
    center crop, bicubic."""
    cfg = dict(
        url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj",
        classifier="head", license="mit", paper_ids="arXiv:2312.08874", fixed_input_size=True,
        origin_url="https://github.com/LeapLabTHU/Agent-Attention",
    )
    return dict(cfg, **kwargs)


# Released weights (agent_transformer/README.md, TsinghuaCloud links; files hold {"model": state_dict, ...}; no
# hash is published).
TSINGHUA_URL = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"


def tsinghua(share: str, name: str) -> tuple[str, str]:
    """timm's ``url=(url, file name)`` for a TsinghuaCloud share of the registered ``name`` ("variant.tag"): the
    share URLs end in ``/``, so the download needs a file name of its own (``_helpers.pretrained_file_name``)."""
    return TSINGHUA_URL.format(share), _helpers.pretrained_file_name(*name.split("."))


default_cfgs = generate_default_cfgs({
    "agent_swin_t.in1k": agent_cfg(tsinghua("a2ddc1190c224f768a41", "agent_swin_t.in1k")),
    "agent_swin_s.in1k": agent_cfg(tsinghua("f607172c9fea4d6e99bb", "agent_swin_s.in1k")),
    "agent_swin_s.in1k_288": agent_cfg(tsinghua("09760394e93b4046a25e", "agent_swin_s.in1k_288"),
                                       input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0),
    "agent_swin_b.in1k": agent_cfg(tsinghua("4fcd2d0114bb490483c3", "agent_swin_b.in1k")),
    "agent_swin_b.in1k_384": agent_cfg(tsinghua("bb84ee9058954706a557", "agent_swin_b.in1k_384"),
                                       input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


@register_model
def agent_swin_t(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-T (29M, 4.5 GMACs): Swin-T with agent attention in stages 1-3 (9/16/49 agents)."""
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB",
                agent_num=(9, 16, 49, 49), drop_path_rate=0.2)
    return _create_agent_swin("agent_swin_t", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_s(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-S (50M, 8.7 GMACs): Swin-S with agent attention in stages 1-2."""
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB",
                agent_num=(9, 16, 49, 49), drop_path_rate=0.3)
    return _create_agent_swin("agent_swin_s", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_b(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    """Agent-Swin-B (88M, 15.4 GMACs): Swin-B with agent attention in stages 1-2 and the first 2 blocks of 3."""
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2",
                agent_num=(9, 16, 49, 49), drop_path_rate=0.5)
    return _create_agent_swin("agent_swin_b", pretrained, **dict(args, **kwargs))
