"""BiFormer (Zhu et al., CVPR 2023, arXiv:2303.08810) as timm models over visattn's bi-level routing attention.

Architecture, read from rayleizhu/BiFormer (``models/biformer.py``, ``models/_common.py``, ``ops/bra_legacy.py``):
an overlapping conv stem (3×3 s2 conv, BN, GELU, 3×3 s2 conv, BN) to 1/4 resolution, then four stages, each
opened (from stage 2 on) by a 3×3 s2 conv + BN. A block adds a 3×3 depthwise-conv position embedding, then pre-norm
(LayerNorm eps 1e-6) attention and an MLP (ratio 3). Stages 1-3 use bi-level routing attention over a 7×7 region
grid with top-k 1 / 4 / 16 routed regions and a 5×5 depthwise LePE on v; the last stage uses full attention with
8 heads whose LePE (5×5 depthwise) is taken on the block input. A final BatchNorm, average pooling, linear head.

Scale quirk of the released weights: BRA scales logits by ``qk_dim ** -0.5`` (the whole q/k width, not per head);
the last-stage attention by ``(dim / 8) ** -0.5``. Both are kept so the official checkpoints give their numbers.

Feature maps are NCHW (the stages run NHWC inside; their outputs are channels-last NCHW views).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from visattn.models import _helpers
from visattn.nn import BiLevelRoutingAttention

__all__ = ["BiFormer", "AttentionLePE", "checkpoint_filter_fn"]


class AttentionLePE(nn.Module):
    """BiFormer's last-stage full attention (``models/_common.py``): bias-free qkv, SDPA over all tokens, plus a
    depthwise LePE of the *input* (as released), then ``proj``. ``side_dwconv=0`` gives plain ``Attention``."""

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None,
                 side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
                     if side_dwconv > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).view(batch, height * width, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """Conv position embedding, then pre-norm attention and MLP on ``[B, H, W, C]`` (optional layer scale).

    ``topk > 0``: :class:`visattn.nn.BiLevelRoutingAttention` configured as released (identity kv downsampling,
    ``qkvo``, LePE of ``side_dwconv`` on v, maps padded to the region grid before the projection and cropped after
    ``wo``) with a flat ``qkv`` Linear; ``topk`` -1 / -2: :class:`AttentionLePE` without / with LePE."""

    def __init__(self, dim: int, num_heads: int, topk: int, n_win: int = 7, qk_dim: int | None = None,
                 qk_scale: float | None = None, mlp_ratio: float = 3.0, side_dwconv: int = 5,
                 before_attn_dwconv: int = 3, drop_path: float = 0.0, layer_scale: float | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.pos_embed = (nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
                          if before_attn_dwconv > 0 else None)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:  # the released ops/bra_legacy.py configuration, with a flat qkv Linear (key attn.qkv)
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
                                                topk=topk, side_dwconv=side_dwconv, auto_pad=True, flat_qkv=True,
                                                backend=backend)
        elif topk in (-1, -2):  # -2: AttentionLePE, -1: plain Attention (official codes)
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv if topk == -2 else 0)
        else:
            raise ValueError(f"topk must be > 0 (routing), -1 (full attention) or -2 (full attention + LePE), "
                             f"got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma1, self.gamma2 = _helpers.layer_scales(dim, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)


class BiFormerStage(nn.Module):
    """Optional 3×3 s2 conv + BN downsampler (NCHW), then blocks (NHWC); returns NCHW."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_path: Sequence[float], downsample: bool,
                 **block_kwargs):
        super().__init__()
        self.downsample = (nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
                           if downsample else nn.Identity())
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[BiFormerBlock(dim, drop_path=drop_path[j], **block_kwargs)
                                      for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        x = _helpers.run_blocks(self.blocks, self.downsample(x).permute(0, 2, 3, 1), self.grad_checkpointing)
        return x.permute(0, 3, 1, 2)


class BiFormer(_helpers.StagedBackbone):
    """BiFormer: a 4-stage pyramid of bi-level routing attention blocks (last stage full attention).

    Args:
        num_classes: classifier outputs (0: pooled features); in_chans: image channels;
        global_pool: '', 'avg', 'max', 'avgmax', 'catavgmax'; depths / embed_dims / mlp_ratios / qk_dims / topks:
        per stage (topk -2: full attention with LePE); head_dim: BRA head width (heads = qk_dim // head_dim);
        n_win: regions per side; qk_scale: override of the BRA scale; side_dwconv: LePE kernel;
        before_attn_dwconv: position-embedding conv kernel; drop_rate (head), drop_path_rate; layer_scale:
        gamma init (None: off, as released); img_size: nominal input size (any size runs: maps are padded to the
        region grid); backend: attention backend for every BRA; device / dtype: timm's factory keywords.
    """

    _stem_name, _stages_name = "stem", "stages"  # the checkpoints' names

    @_helpers.factory_kwargs
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 depths: Sequence[int] = (2, 2, 8, 2), embed_dims: Sequence[int] = (64, 128, 256, 512),
                 mlp_ratios: Sequence[float] = (3, 3, 3, 3), qk_dims: Sequence[int] | None = None,
                 topks: Sequence[int] = (1, 4, 16, -2), head_dim: int = 32, n_win: int = 7,
                 qk_scale: float | None = None, side_dwconv: int = 5, before_attn_dwconv: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, layer_scale: float | None = None,
                 img_size=224, backend: str = "auto", **kwargs):
        super().__init__()
        _helpers.reject_unknown("BiFormer", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        qk_dims = tuple(embed_dims) if qk_dims is None else tuple(qk_dims)
        for name, value in (("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios), ("qk_dims", qk_dims),
                            ("topks", topks)):
            if len(value) != len(depths):
                raise ValueError(f"{name} {tuple(value)} must have one entry per stage of depths {tuple(depths)}")
        self.global_pool = _helpers.check_pool_type(global_pool)
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.output_fmt = "NCHW"
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0]),
        )
        rates = _helpers.drop_path_schedule(depths, drop_path_rate)
        stages, self.feature_info = [], []
        for i, depth in enumerate(depths):
            if qk_dims[i] % head_dim:
                raise ValueError(f"head_dim={head_dim} must divide qk_dims[{i}]={qk_dims[i]}")
            stages.append(BiFormerStage(
                embed_dims[i - 1] if i else embed_dims[0], embed_dims[i], depth, rates[i], downsample=i > 0,
                num_heads=qk_dims[i] // head_dim, topk=topks[i], n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv, before_attn_dwconv=before_attn_dwconv,
                layer_scale=layer_scale, backend=backend,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._init_head(nn.BatchNorm2d(self.num_features), drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # no position tables: the position embedding is a conv (weight-decayed, as released)


# ----------------------------------------------------------------------------------------------- checkpoints
_BLOCK_RENAMES = (  # official suffix inside a block -> ours
    (".attn.qkv.qkv.", ".attn.qkv."),  # QKVLinear wraps its Linear as .qkv
    (".mlp.0.", ".mlp.fc1."),  # nn.Sequential(Linear, Identity, GELU, Linear)
    (".mlp.3.", ".mlp.fc2."),
)


def checkpoint_filter_fn(state_dict, model: BiFormer | None = None) -> dict:
    """Map an official BiFormer checkpoint (``checkpoint["model"]`` of rayleizhu/BiFormer) to this module's names.

    ``downsample_layers.0`` -> ``stem``; ``downsample_layers.i`` -> ``stages.i.downsample``;
    ``stages.i.j`` -> ``stages.i.blocks.j``; ``attn.qkv.qkv`` -> ``attn.qkv``; ``mlp.0/3`` -> ``mlp.fc1/fc2``.
    A state dict already in visattn's layout is returned unchanged. Raises TypeError for ``None``, a bare tensor or
    non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "BiFormer")
    if not any(k.startswith("downsample_layers.") or re.match(r"^stages\.\d+\.\d+\.", k) for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        key = key.replace("._checkpoint_wrapped_module", "")  # fairscale checkpoint_wrapper (use_checkpoint_stages)
        key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        for old, new in _BLOCK_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- registry
def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return _helpers.create(BiFormer, variant, pretrained, checkpoint_filter_fn,
                           _helpers.feature_cfg(kwargs, (2, 2, 8, 2)), kwargs)


def _cfg(url: str = "", file_name: str = "", **kwargs) -> dict:
    return dict(
        url=(url, file_name) if url else "", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="stem.0", classifier="head", license="mit", paper_ids="arXiv:2303.08810",
        origin_url="https://github.com/rayleizhu/BiFormer", **kwargs,
    )


# Released weights (models/biformer.py model_urls: OneDrive share links, files biformer_*_in1k.pth holding
# {"model": state_dict}); no hash is published. The three URLs all end in /root/content, so each is given its own
# cache file name (timm's url=(url, file name) form, downloaded by _helpers.create); checkpoint_filter_fn maps
# the names.
_ONEDRIVE = "https://api.onedrive.com/v1.0/shares/s!{}/root/content"
default_cfgs = generate_default_cfgs({
    f"{name}.in1k": _cfg(_ONEDRIVE.format(share), _helpers.pretrained_file_name(name, "in1k"))
    for name, share in (("biformer_tiny", "AkBbczdRlZvChHEOoGkgwgQzEDlM"),
                        ("biformer_small", "AkBbczdRlZvChHDyM-x9KWRBZ832"),
                        ("biformer_base", "AkBbczdRlZvChHI_XPhoadjaNxtO"))
})

_RELEASED = dict(mlp_ratios=(3, 3, 3, 3), topks=(1, 4, 16, -2), head_dim=32, n_win=7, side_dwconv=5,
                 before_attn_dwconv=3)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T (13.1M, 2.2 GMACs): depths 2-2-8-2, widths 64-128-256-512, top-k 1/4/16/full."""
    args = dict(_RELEASED, depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S (25.5M, 4.5 GMACs): depths 4-4-18-4, widths 64-128-256-512, top-k 1/4/16/full."""
    args = dict(_RELEASED, depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B (56.8M, 9.8 GMACs): depths 4-4-18-4, widths 96-192-384-768, top-k 1/4/16/full."""
    args = dict(_RELEASED, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))
