"""NAT and DiNAT (Hassani et al., CVPR 2023 / arXiv 2209.15001) as timm models over visattn's neighborhood attention.

Architecture (from the SHI-Labs ``classification/nat.py``/``dinat.py``): a convolutional tokenizer (two 3×3
stride-2 convs + LayerNorm) to 1/4 resolution, four stages of NAT layers (LayerNorm → 2-D neighborhood attention
with relative position bias → residual, LayerNorm → MLP → residual, optional layer scale), 3×3 stride-2 conv
downsamplers between stages, a final LayerNorm, average pooling and a linear head. DiNAT is NAT with a per-layer
dilation schedule. Feature maps are NHWC, like timm's Swin.

Weights: the ``shi-labs/*`` Hugging Face repos hold transformers-format checkpoints; ``checkpoint_filter_fn`` maps
those, and the original SHI-Labs ``.pth`` layout, to this module's names (docs/MODELS.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from visattn.models import _helpers
from visattn.nn import NeighborhoodAttention2D

__all__ = ["NAT", "checkpoint_filter_fn"]


class ConvTokenizer(nn.Module):
    """Image to 1/4-resolution NHWC tokens: two 3×3 stride-2 convs, then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """NHWC 2× downsampling that doubles channels: 3×3 stride-2 conv (no bias), then LayerNorm."""

    def __init__(self, dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLayer(nn.Module):
    """Pre-norm transformer layer with 2-D neighborhood attention (+rpb) and an MLP. The attention is
    :class:`visattn.nn.NeighborhoodAttention2D` with ``rel_pos_bias=True`` (``rpb`` ``[heads, 2k-1, 2k-1]``) and
    ``pad_to_window=True`` (maps smaller than ``kernel_size * dilation`` are zero-padded at the bottom/right before
    the projection and cropped after it, as NATTEN's early module and transformers' ``DinatLayer`` do)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, proj_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None, norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU, backend: str = "auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        # NATTEN's module with NAT's rpb, padding maps smaller than the window as the released code does
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias,
                                            qk_scale=qk_scale, proj_drop=proj_drop, rel_pos_bias=True,
                                            pad_to_window=True, backend=backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.gamma1, self.gamma2 = _helpers.layer_scales(dim, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        attn = self.attn(self.norm1(x))
        x = x + self.drop_path(attn if self.gamma1 is None else self.gamma1 * attn)
        mlp = self.mlp(self.norm2(x))
        return x + self.drop_path(mlp if self.gamma2 is None else self.gamma2 * mlp)


class NATStage(nn.Module):
    """Optional downsampler (entering the stage) followed by NAT layers."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, kernel_size: int,
                 dilations: Sequence[int], drop_path: Sequence[float], norm_layer=nn.LayerNorm, **layer_kwargs):
        super().__init__()
        self.downsample = ConvDownsampler(in_dim, norm_layer) if in_dim != dim else nn.Identity()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            NATLayer(dim, num_heads, kernel_size, dilations[i], drop_path=drop_path[i], norm_layer=norm_layer,
                     **layer_kwargs)
            for i in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return _helpers.run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class NAT(_helpers.StagedBackbone):
    """Neighborhood Attention Transformer; with ``dilations`` it is DiNAT.

    Args:
        num_classes: classifier outputs (0: no head, pooled features); in_chans: image channels;
        global_pool: '', 'avg', 'max', 'avgmax' or 'catavgmax' (timm's Swin options);
        embed_dim: stage-1 channels (doubling per stage); depths / num_heads: per stage;
        kernel_size: neighborhood size; dilations: one list per stage with one dilation per layer (DiNAT);
        mlp_ratio, qkv_bias, qk_scale, drop_rate (head), pos_drop_rate, proj_drop_rate, drop_path_rate,
        layer_scale (init of gamma1/gamma2, None: off), norm_layer;
        img_size: nominal input size (NAT runs at any size >= 32; recorded for timm's pretrained cfg);
        backend: attention backend for every layer ("auto" | "reference" | "triton");
        device / dtype: timm's factory keywords (where parameters are created, their floating dtype).
    """

    _stem_name, _stages_name = "patch_embed", "levels"  # the checkpoints' names

    @_helpers.factory_kwargs
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", embed_dim: int = 64,
                 depths: Sequence[int] = (3, 4, 6, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 kernel_size: int = 7, dilations: Sequence[Sequence[int]] | None = None, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 layer_scale: float | None = None, norm_layer=nn.LayerNorm, img_size=224, backend: str = "auto",
                 **kwargs):
        super().__init__()
        _helpers.reject_unknown("NAT", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
                                  proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        self.global_pool = _helpers.check_pool_type(global_pool)
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {tuple(num_heads)} must have one entry per stage of depths {tuple(depths)}")
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != len(depths) or any(len(dl) != d for dl, d in zip(dilations, depths, strict=True)):
            raise ValueError(f"dilations must give one value per layer of depths {tuple(depths)}, got {dilations!r}")
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = _helpers.drop_path_schedule(depths, drop_path_rate)  # no tensor ops: builds on the meta device
        stages, self.feature_info, in_dim = [], [], embed_dim
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2**i)
            stages.append(NATStage(
                in_dim, dim, depth, num_heads[i], kernel_size, dilations[i], rates[i], norm_layer,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop_rate,
                layer_scale=layer_scale, backend=backend,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"levels.{i}"))
            in_dim = dim
        self.levels = nn.Sequential(*stages)
        self._init_head(norm_layer(self.num_features), drop_rate)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    def _embed(self, x: Tensor) -> Tensor:
        return self.pos_drop(self.patch_embed(x))


# ----------------------------------------------------------------------------------------------- checkpoints
_HF_LAYER_RENAMES = (  # transformers NatLayer/DinatLayer suffix -> ours (attention.output before output)
    ("layernorm_before.", "norm1."),
    ("attention.self.rpb", "attn.rpb"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_HF_QKV = re.compile(r"^(levels\.\d+\.blocks\.\d+\.)attention\.self\.(query|key|value)\.(weight|bias)$")


def _shift_downsample(key: str) -> str:
    """Downsamplers sit at the end of stage i in the sources and at the start of stage i+1 here."""
    match = re.match(r"^levels\.(\d+)\.downsample\.(.*)$", key)
    return f"levels.{int(match.group(1)) + 1}.downsample.{match.group(2)}" if match else key


def _from_transformers(state_dict: dict) -> dict:
    out, qkv = {}, {}
    for key, value in state_dict.items():
        key = re.sub(r"^(nat|dinat)\.", "", key)
        if key.startswith("hidden_states_norms."):  # NatBackbone/DinatBackbone extras
            continue
        key = key.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
        key = key.replace("embeddings.norm.", "patch_embed.norm.")
        key = re.sub(r"^layernorm\.", "norm.", key)
        key = re.sub(r"^classifier\.", "head.", key)
        key = re.sub(r"^encoder\.levels\.(\d+)\.layers\.(\d+)\.", r"levels.\1.blocks.\2.", key)
        key = re.sub(r"^encoder\.levels\.", "levels.", key)
        match = _HF_QKV.match(key)
        if match:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
            continue
        if key.endswith(".layer_scale_parameters"):
            prefix = key[: -len("layer_scale_parameters")]
            out[prefix + "gamma1"], out[prefix + "gamma2"] = value[0].clone(), value[1].clone()
            continue
        for old, new in _HF_LAYER_RENAMES:
            if re.match(r"^levels\.\d+\.blocks\.\d+\." + re.escape(old), key):
                key = key.replace(old, new, 1)
                break
        out[_shift_downsample(key)] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"checkpoint has an incomplete query/key/value set at {prefix}attention.self: "
                             f"{sorted(parts)}")
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def checkpoint_filter_fn(state_dict, model: NAT | None = None) -> dict:
    """Map a NAT/DiNAT checkpoint to this module's names.

    Accepts transformers (``NatForImageClassification``/``DinatForImageClassification``, ``*Model``,
    ``*Backbone``) and original SHI-Labs state dicts, optionally wrapped (``{"model": ...}``); a state dict already
    in visattn's layout (downsamplers under ``levels.{1..3}``) is returned unchanged, so checkpoints saved from
    these models reload through ``pretrained_cfg_overlay=dict(file=...)``. Raises TypeError for ``None``, a bare
    tensor or non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "NAT/DiNAT")
    if any(k.startswith(("nat.", "dinat.", "embeddings.", "encoder.")) for k in state_dict):
        return _from_transformers(state_dict)
    # The SHI-Labs layout ends stage i with its downsampler (levels.0.downsample exists); ours opens stage i+1
    # with it (levels.0 never has one). Shift only the former: shifting our own layout again broke reloading.
    if any(k.startswith("levels.0.downsample.") for k in state_dict):
        return {_shift_downsample(k): v for k, v in state_dict.items()}
    return state_dict


# ----------------------------------------------------------------------------------------------- registry
def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    feature_cfg = _helpers.feature_cfg(kwargs, (3, 4, 6, 5))
    output_fmt = kwargs.pop("output_fmt", None)
    if output_fmt is not None:
        if not kwargs.get("features_only", False):
            raise ValueError("output_fmt= applies to features_only=True models (NAT's own maps are NHWC)")
        feature_cfg["output_fmt"] = _helpers.check_output_fmt(output_fmt)
        # hooked stage outputs are NHWC; NCHW maps come from forward_intermediates (the 'getter' wrapper)
        if feature_cfg["output_fmt"] == "NCHW":
            kwargs.setdefault("feature_cls", "getter")
    return _helpers.create(NAT, variant, pretrained, checkpoint_filter_fn, feature_cfg, kwargs)


def _cfg(hf_hub_id: str = "", paper: str = "nat", **kwargs) -> dict:
    papers = {"nat": ("arXiv:2204.07143", "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"),
              "dinat": ("arXiv:2209.15001", "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer")}
    paper_id, origin = papers[paper]
    cfg = dict(
        hf_hub_id=hf_hub_id, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj.0", classifier="head", license="mit", paper_ids=paper_id, origin_url=origin,
    )
    return dict(cfg, **kwargs)


_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/"
default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg("shi-labs/nat-mini-in1k-224"),
    "nat_tiny.in1k": _cfg("shi-labs/nat-tiny-in1k-224"),
    "nat_small.in1k": _cfg("shi-labs/nat-small-in1k-224"),
    "nat_base.in1k": _cfg("shi-labs/nat-base-in1k-224"),
    "dinat_mini.in1k": _cfg("shi-labs/dinat-mini-in1k-224", "dinat"),
    "dinat_tiny.in1k": _cfg("shi-labs/dinat-tiny-in1k-224", "dinat"),
    "dinat_small.in1k": _cfg("shi-labs/dinat-small-in1k-224", "dinat"),
    "dinat_base.in1k": _cfg("shi-labs/dinat-base-in1k-224", "dinat"),
    "dinat_large.in22k_ft_in1k": _cfg("shi-labs/dinat-large-in22k-in1k-224", "dinat"),
    "dinat_large_384.in22k_ft_in1k": _cfg("shi-labs/dinat-large-in22k-in1k-384", "dinat", input_size=(3, 384, 384),
                                          pool_size=(12, 12), crop_pct=1.0),
    # SHI-Labs' dinat_large_384_11x11 (classification/dinat.py): kernel 11, dilations 8/4/2/1 at 384
    "dinat_large_11x11.in22k_ft_in1k_384": _cfg("shi-labs/dinat-large-11x11-in22k-in1k-384", "dinat",
                                                url=_DINAT_URL + "dinat_large_in22k_in1k_384_11x11.pth",
                                                input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})

_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(_MINI, depths=(3, 4, 18, 5))
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5,
             layer_scale=1e-5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)


def _dinat_dilations(depths: Sequence[int], first: tuple = (8, 4, 2, 1)) -> list:
    """DiNAT's schedule: layers alternate dilation 1 and the stage's dilation (1-based even layers dilated)."""
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, first, strict=False)]


def _build(variant: str, pretrained: bool, cfg: dict, dilated: bool, kwargs: dict, first=(8, 4, 2, 1),
           kernel_size: int = 7) -> NAT:
    args = {**cfg, "kernel_size": kernel_size, **kwargs}
    if dilated:
        args.setdefault("dilations", _dinat_dilations(args["depths"], first))
    return _create_nat(variant, pretrained, **args)


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Mini (20M): depths 3-4-6-5, 64 channels, kernel 7."""
    return _build("nat_mini", pretrained, _MINI, False, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Tiny (28M): depths 3-4-18-5, 64 channels, kernel 7."""
    return _build("nat_tiny", pretrained, _TINY, False, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Small (51M): depths 3-4-18-5, 96 channels, layer scale 1e-5."""
    return _build("nat_small", pretrained, dict(_SMALL, layer_scale=1e-5), False, kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    """NAT-Base (90M): depths 3-4-18-5, 128 channels, layer scale 1e-5."""
    return _build("nat_base", pretrained, _BASE, False, kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Mini (20M): NAT-Mini with dilations 8/4/2/1 on every other layer."""
    return _build("dinat_mini", pretrained, _MINI, True, kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Tiny (28M): NAT-Tiny with dilations 8/4/2/1 on every other layer."""
    return _build("dinat_tiny", pretrained, _TINY, True, kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Small (51M): 96 channels, dilations 8/4/2/1, no layer scale (unlike NAT-Small)."""
    return _build("dinat_small", pretrained, _SMALL, True, kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Base (90M): 128 channels, dilations 8/4/2/1, layer scale 1e-5."""
    return _build("dinat_base", pretrained, _BASE, True, kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large (200M): 192 channels, dilations 8/4/2/1, ImageNet-22K pretrained."""
    return _build("dinat_large", pretrained, _LARGE, True, kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large at 384²: dilations 13/6/3/1 so stage windows still span the larger maps."""
    return _build("dinat_large_384", pretrained, _LARGE, True, kwargs, first=(13, 6, 3, 1))


@register_model
def dinat_large_11x11(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-Large with 11×11 neighborhoods (dilations 8/4/2/1), released fine-tuned at 384²."""
    return _build("dinat_large_11x11", pretrained, _LARGE, True, kwargs, kernel_size=11)
