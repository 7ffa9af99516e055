"""MedViTV2 (Nejati Manzari et al., 2025, arXiv 2502.13693) as timm models, its neighborhood attention on visattn.

Architecture, from the facts of the official ``MedViT.py`` / ``fasterkan.py`` (Omid-Nejati/MedViTV2):

- stem: four 3×3 conv + BatchNorm + ReLU (strides 2, 1, 1, 2; widths ``stem_chs``);
- four stages (strides 1, 2, 2, 2) of two block types, the first block of a stage downsampling with a 2×2 average
  pool + 1×1 conv + BN (``PatchEmbed``; a 1×1 conv + BN where only the width changes):
  stage 1 all LFP, stage 2 LFP… then one GFP, stage 3 ``[LFP, LFP, GFP] × depth/3``, stage 4 all GFP;
- **LFP** (local feature perception): BN → 2-D neighborhood attention (kernel 7, relative position bias, heads of
  width ``head_dim``) → residual; BN → a locality feed-forward (1×1 conv, BN, h-swish, k×k depthwise conv (k = 7 in
  stage 1, 3 after), BN, h-swish, squeeze-excite, 1×1 conv, BN, with its own residual) → residual;
- **GFP** (global feature perception): an efficient MHSA on ``mix_block_ratio`` of the width (keys/values
  average-pooled over ``sr²`` consecutive tokens + BatchNorm1d), a multi-head convolutional attention (grouped 3×3
  conv) on the rest, concatenated; then BN → a two-layer FasterKAN (LayerNorm, reflectional-switch basis
  ``1 - tanh((x - g) / 0.33)²`` on 8 grid points in [-2, 2], bias-free linear) → residual;
- final BatchNorm, average pool, linear head.

Two reshapes of the official code are kept exactly, since the released weights were trained with them: the LFP
attention reads its ``[B, C, H, W]`` input as ``x.reshape(B, H, W, C)`` (a reinterpretation of the memory order,
not a permute) and writes back with ``reshape(B, C, H, W)``; the GFP KAN runs on ``x.reshape(-1, C)`` rows of that
same flat order. The official GFP also builds a locality feed-forward it never calls: it is not built here and
``checkpoint_filter_fn`` drops its weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from visattn.models import _helpers
from visattn.nn import NeighborhoodAttention2D

__all__ = ["MedViTV2", "checkpoint_filter_fn"]

NORM_EPS = 1e-5


def _make_divisible(value: float, divisor: int) -> int:
    """Round to a multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``value``."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=NORM_EPS)


class ConvBNReLU(nn.Module):
    """3×3 conv (padding 1, no bias) + BN + ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.norm = _bn(out_chs)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """Stride 2: 2×2 average pool (ceil, padding not counted) + 1×1 conv + BN; a width change: 1×1 conv + BN;
    otherwise the identity."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.avgpool = (nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride == 2
                        else nn.Identity())
        changed = stride == 2 or in_chs != out_chs
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False) if changed else nn.Identity()
        self.norm = _bn(out_chs) if changed else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.avgpool(x)))


class HSigmoid(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3) / 6


class HSwish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * F.relu6(x + 3) / 6


class SELayer(nn.Module):
    """Squeeze-excite: global average, Linear, ReLU, Linear, h-sigmoid gate."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, channels), HSigmoid())

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc(self.avg_pool(x).flatten(1))
        return x * gate[:, :, None, None]


class LocalityFeedForward(nn.Module):
    """``x + conv(x)``: 1×1 conv, BN, h-swish, k×k depthwise conv, BN, h-swish, squeeze-excite, 1×1 conv, BN."""

    def __init__(self, dim: int, kernel_size: int, expand_ratio: float, reduction: int):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), HSwish(),
            nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), HSwish(),
            SELayer(hidden, reduction),
            nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class LFP(nn.Module):
    """Local feature perception block: neighborhood attention + locality feed-forward (NCHW in and out)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, kernel_size: int, drop_path: float, head_dim: int,
                 mlp_ratio: float = 3.0, attn_kernel: int = 7, attn_dilation: int = 1, backend: str = "auto"):
        super().__init__()
        if out_chs % head_dim:
            raise ValueError(f"LFP width {out_chs} must be a multiple of head_dim {head_dim}")
        self.patch_embed = PatchEmbed(in_chs, out_chs, stride)
        self.norm1 = _bn(out_chs)
        self.attn = NeighborhoodAttention2D(out_chs, out_chs // head_dim, attn_kernel, dilation=attn_dilation,
                                            rel_pos_bias=True, backend=backend)
        self.attention_path_dropout = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.conv = LocalityFeedForward(out_chs, kernel_size, mlp_ratio, reduction=out_chs)
        self.norm2 = _bn(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        # the official block reads the NCHW map as reshape(b, h, w, c) (memory reinterpretation, kept for its weights)
        attn = self.attn(self.norm1(x).reshape(b, h, w, c)).reshape(b, c, h, w)
        x = x + self.attention_path_dropout(attn)
        return x + self.conv(self.norm2(x))


class EfficientMHSA(nn.Module):
    """E-MHSA: queries from every token; keys / values from tokens average-pooled over ``sr_ratio²`` consecutive
    tokens of the flattened map, then BatchNorm1d (``sr_ratio`` > 1); softmax attention; output projection."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.AvgPool1d(sr_ratio**2, stride=sr_ratio**2)
            self.norm = nn.BatchNorm1d(dim, eps=NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        heads = self.num_heads
        kv = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2) if self.sr_ratio > 1 else x
        q = self.q(x).view(b, n, heads, c // heads).transpose(1, 2)
        k = self.k(kv).view(b, -1, heads, c // heads).transpose(1, 2)
        v = self.v(kv).view(b, -1, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3×3 conv (one group per head), BN, ReLU, 1×1 conv."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim // head_dim, bias=False)
        self.norm = _bn(dim)
        self.act = nn.ReLU()
        self.projection = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))


class ReflectionalSwitch(nn.Module):
    """FasterKAN's basis: ``1 - tanh((x - g) / denominator)²`` for every grid point ``g``."""

    def __init__(self, grid_min: float = -2.0, grid_max: float = 2.0, num_grids: int = 8, denominator: float = 0.33):
        super().__init__()
        # a buffer (the official module makes it a frozen Parameter; the state-dict key `rbf.grid` is the same)
        self.register_buffer("grid", torch.linspace(grid_min, grid_max, num_grids))
        self.inv_denominator = 1 / denominator

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tanh((x[..., None] - self.grid) * self.inv_denominator)
        return 1 - t * t


class FasterKANLayer(nn.Module):
    """LayerNorm, reflectional-switch basis on each feature, one bias-free Linear over all (feature, grid) pairs."""

    def __init__(self, in_dim: int, out_dim: int, num_grids: int = 8):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.rbf = ReflectionalSwitch(num_grids=num_grids)
        self.spline_linear = nn.Linear(in_dim * num_grids, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.spline_linear(self.rbf(self.layernorm(x)).flatten(1))


class FasterKAN(nn.Module):
    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(FasterKANLayer(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GFP(nn.Module):
    """Global feature perception block: E-MHSA on part of the width, MHCA on the rest, concatenated, then a KAN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path: float, head_dim: int, sr_ratio: int,
                 mix_block_ratio: float = 0.75, mlp_ratio: float = 2.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.mhsa_out_channels = _make_divisible(int(out_chs * mix_block_ratio), 32)
        self.mhca_out_channels = out_chs - self.mhsa_out_channels
        if self.mhca_out_channels <= 0 or self.mhca_out_channels % head_dim:
            raise ValueError(f"a GFP block of width {out_chs} with mix_block_ratio {mix_block_ratio} leaves "
                             f"{self.mhca_out_channels} channels to its MHCA (E-MHSA width rounds to multiples of 32); "
                             f"it needs a positive multiple of head_dim {head_dim}: choose other dims")
        self.patch_embed = PatchEmbed(in_chs, self.mhsa_out_channels, stride)
        self.norm1 = _bn(self.mhsa_out_channels)
        self.e_mhsa = EfficientMHSA(self.mhsa_out_channels, head_dim, sr_ratio, attn_drop, proj_drop)
        self.mhsa_path_dropout = DropPath(drop_path * mix_block_ratio) if drop_path > 0 else nn.Identity()
        self.projection = PatchEmbed(self.mhsa_out_channels, self.mhca_out_channels)
        self.mhca = MHCA(self.mhca_out_channels, head_dim)
        self.mhca_path_dropout = DropPath(drop_path * (1 - mix_block_ratio)) if drop_path > 0 else nn.Identity()
        self.norm2 = _bn(out_chs)
        self.kan = FasterKAN([out_chs, int(out_chs * mlp_ratio), out_chs])
        self.mlp_path_dropout = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        b, c, h, w = x.shape
        tokens = self.norm1(x).flatten(2).transpose(1, 2)
        x = x + self.mhsa_path_dropout(self.e_mhsa(tokens)).transpose(1, 2).reshape(b, c, h, w)
        out = self.projection(x)
        x = torch.cat([x, out + self.mhca_path_dropout(self.mhca(out))], dim=1)
        out = self.norm2(x)
        # the official block runs its KAN on out.reshape(-1, C) rows of the NCHW memory order (kept for its weights)
        kan = self.kan(out.reshape(-1, out.shape[1])).reshape(out.shape)
        return x + self.mlp_path_dropout(kan)


class MedViTStage(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return _helpers.run_blocks(self.blocks, x, self.grad_checkpointing)


def block_types(depths: Sequence[int]) -> list[list[str]]:
    """The official hybrid schedule: per stage, "L" (LFP) or "G" (GFP) for each block."""
    if len(depths) != 4 or depths[2] % 3:
        raise ValueError(f"depths must have 4 stages with stage 3 a multiple of 3 ([LFP, LFP, GFP] units), "
                         f"got {tuple(depths)}")
    return [["L"] * depths[0], ["L"] * (depths[1] - 1) + ["G"], ["L", "L", "G"] * (depths[2] // 3),
            ["G"] * depths[3]]


class MedViTV2(_helpers.StagedBackbone):
    """MedViTV2: a conv stem and four stages of LFP (neighborhood attention) / GFP (E-MHSA + MHCA + KAN) blocks.

    Args:
        num_classes: classifier outputs (0: pooled features); in_chans: image channels;
        global_pool: '', 'avg', 'max', 'avgmax', 'catavgmax'; stem_chs: the stem's three widths;
        depths / dims: per stage (stage 3 a multiple of 3); head_dim: attention head width;
        sr_ratios: E-MHSA key/value pooling per stage; mix_block_ratio: E-MHSA share of a GFP's width;
        attn_kernel / attn_dilation: the LFP neighborhood (official: 7, 1); drop_rate (head), attn_drop_rate,
        proj_drop_rate, drop_path_rate; img_size: nominal input size (every LFP map must be at least
        ``attn_kernel * attn_dilation``, so 224 for the official kernel); backend: attention backend of every LFP;
        device / dtype: timm's factory keywords.
    """

    _stem_name, _stages_name = "stem", "stages"

    @_helpers.factory_kwargs
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 stem_chs: Sequence[int] = (64, 32, 64), depths: Sequence[int] = (2, 2, 6, 2),
                 dims: Sequence[int] = (64, 128, 256, 512), head_dim: int = 32, sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 mix_block_ratio: float = 0.75, attn_kernel: int = 7, attn_dilation: int = 1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 img_size=224, backend: str = "auto", **kwargs):
        super().__init__()
        _helpers.reject_unknown("MedViTV2", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                  proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        self.global_pool = _helpers.check_pool_type(global_pool)
        if len(dims) != 4 or len(sr_ratios) != 4 or len(stem_chs) != 3:
            raise ValueError(f"dims and sr_ratios need 4 entries and stem_chs 3, got dims={tuple(dims)}, "
                             f"sr_ratios={tuple(sr_ratios)}, stem_chs={tuple(stem_chs)}")
        types = block_types(depths)
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.output_fmt = "NCHW"
        self.num_features = self.head_hidden_size = int(dims[-1])
        self.stem = nn.Sequential(ConvBNReLU(in_chans, stem_chs[0], 2), ConvBNReLU(stem_chs[0], stem_chs[1], 1),
                                  ConvBNReLU(stem_chs[1], stem_chs[2], 1), ConvBNReLU(stem_chs[2], stem_chs[2], 2))
        rates = _helpers.drop_path_schedule(depths, drop_path_rate)
        stages, self.feature_info, in_chs = [], [], stem_chs[-1]
        for i, kinds in enumerate(types):
            blocks = []
            for j, kind in enumerate(kinds):
                stride = 2 if i > 0 and j == 0 else 1
                if kind == "L":
                    blocks.append(LFP(in_chs, dims[i], stride, 7 if i == 0 else 3, rates[i][j], head_dim,
                                      attn_kernel=attn_kernel, attn_dilation=attn_dilation, backend=backend))
                else:
                    blocks.append(GFP(in_chs, dims[i], stride, rates[i][j], head_dim, sr_ratios[i], mix_block_ratio,
                                      attn_drop=attn_drop_rate, proj_drop=proj_drop_rate))
                in_chs = dims[i]
            stages.append(MedViTStage(blocks))
            self.feature_info.append(dict(num_chs=int(dims[i]), reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(_bn(self.num_features), drop_rate)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official scheme: truncated-normal (std .02) Linear and Conv2d weights, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}


# ----------------------------------------------------------------------------------------------- checkpoints
_FEATURE = re.compile(r"^features\.(\d+)\.(.*)$")


def checkpoint_filter_fn(state_dict, model: MedViTV2 | None = None) -> dict:
    """Map an official MedViTV2 checkpoint (``MedViT.py``: flat ``features.N``, ``proj_head.0``) to this layout.

    ``features.N`` becomes ``stages.s.blocks.j`` (the stage lengths of ``model``; without one, a stage starts where
    a block's width, its ``norm2``, changes, as in every official variant),
    ``proj_head.0`` becomes ``head``, and the weights of the locality feed-forward the official GFP builds but never
    runs (``features.N.conv.*`` of blocks with ``e_mhsa``) are dropped. A state dict already in this layout is
    returned unchanged; ``{"model": ...}`` wrappers and ``module.`` prefixes are removed. Raises TypeError for
    ``None``, a bare tensor or non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "MedViTV2")
    if not any(k.startswith("features.") for k in state_dict):
        return state_dict
    blocks: dict[int, dict[str, Tensor]] = {}
    out = {}
    for key, value in state_dict.items():
        match = _FEATURE.match(key)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif key.startswith("proj_head.0."):
            out["head." + key[len("proj_head.0."):]] = value
        else:
            out[key] = value
    depths = [len(s.blocks) for s in model.stages] if isinstance(model, MedViTV2) else None
    if depths is not None and sum(depths) != len(blocks):
        raise ValueError(f"MedViTV2 checkpoint has {len(blocks)} blocks (features.N), the model {sum(depths)}")
    stage, j, width = -1, 0, None
    for index in sorted(blocks):
        params = blocks[index]
        if "norm2.weight" not in params:
            raise ValueError(f"MedViTV2 checkpoint: features.{index} has no norm2.weight (not an official layout)")
        if depths is not None:  # the model's stages; without a model, a new stage where the block width changes
            if stage < 0 or j == depths[stage]:
                stage, j = stage + 1, 0
        elif params["norm2.weight"].shape[0] != width:
            stage, j, width = stage + 1, 0, params["norm2.weight"].shape[0]
        gfp = any(k.startswith("e_mhsa.") for k in params)
        for name, value in params.items():
            if gfp and name.startswith("conv."):
                continue  # the unused locality feed-forward of the official GFP
            out[f"stages.{stage}.blocks.{j}.{name}"] = value
        j += 1
    return out


# ----------------------------------------------------------------------------------------------- registry
def _create(variant: str, pretrained: bool = False, **kwargs) -> MedViTV2:
    feature_cfg = _helpers.feature_cfg(kwargs, (2, 2, 6, 2))
    return _helpers.create(MedViTV2, variant, pretrained, checkpoint_filter_fn, feature_cfg, kwargs)


def _cfg(**kwargs) -> dict:
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="stem.0.conv",
                classifier="head", license="mit", paper_ids="arXiv:2502.13693",
                origin_url="https://github.com/Omid-Nejati/MedViTV2", **kwargs)


default_cfgs = generate_default_cfgs({
    "medvitv2_tiny.untrained": _cfg(),
    "medvitv2_small.untrained": _cfg(),
    "medvitv2_base.untrained": _cfg(),
    "medvitv2_large.untrained": _cfg(),
})

_CFGS = {
    "medvitv2_tiny": dict(depths=(2, 2, 6, 1), dims=(64, 128, 192, 384), drop_path_rate=0.1),
    "medvitv2_small": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), drop_path_rate=0.1),
    "medvitv2_base": dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), drop_path_rate=0.2),
    "medvitv2_large": dict(depths=(2, 2, 6, 2), dims=(96, 256, 512, 1024), drop_path_rate=0.2),
}


def _build(variant: str, pretrained: bool, kwargs: dict) -> MedViTV2:
    return _create(variant, pretrained, **{"stem_chs": (64, 32, 64), **_CFGS[variant], **kwargs})


@register_model
def medvitv2_tiny(pretrained: bool = False, **kwargs) -> MedViTV2:
    """MedViTV2-Tiny: depths 2-2-6-1, widths 64-128-192-384."""
    return _build("medvitv2_tiny", pretrained, kwargs)


@register_model
def medvitv2_small(pretrained: bool = False, **kwargs) -> MedViTV2:
    """MedViTV2-Small: depths 2-2-6-2, widths 64-128-256-512."""
    return _build("medvitv2_small", pretrained, kwargs)


@register_model
def medvitv2_base(pretrained: bool = False, **kwargs) -> MedViTV2:
    """MedViTV2-Base: depths 2-2-6-2, widths 96-192-384-768."""
    return _build("medvitv2_base", pretrained, kwargs)


@register_model
def medvitv2_large(pretrained: bool = False, **kwargs) -> MedViTV2:
    """MedViTV2-Large: depths 2-2-6-2, widths 96-256-512-1024."""
    return _build("medvitv2_large", pretrained, kwargs)

