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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from visattn.nn import NeighborhoodAttention2d

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
    """Pre-norm transformer layer with 2-D neighborhood attention (+rpb) and an MLP.

    Maps smaller than ``kernel_size * dilation`` are zero-padded at the bottom/right after ``norm1`` and cropped
    after attention, as NATTEN's early module and transformers' ``DinatLayer`` do.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, proj_drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale: Optional[float] = None, norm_layer=nn.LayerNorm,
                 act_layer=nn.GELU):
        super().__init__()
        self.window = kernel_size * dilation
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2d(dim, num_heads, kernel_size, dilation=dilation, rel_pos_bias=True,
                                            qkv_bias=qkv_bias, qk_scale=qk_scale, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        if layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma1 = self.gamma2 = None

    def _attention(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        pad_h, pad_w = max(0, self.window - height), max(0, self.window - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = self.attn(x)
        return x[:, :height, :width] if (pad_h or pad_w) else x

    def forward(self, x: Tensor) -> Tensor:
        attn = self._attention(self.norm1(x))
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
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NAT(nn.Module):
    """Neighborhood Attention Transformer; with ``dilations`` it is DiNAT."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg", embed_dim: int = 64,
                 depths: Sequence[int] = (3, 4, 6, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 kernel_size: int = 7, dilations: Optional[Sequence[Sequence[int]]] = None, mlp_ratio: float = 3.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 layer_scale: Optional[float] = None, norm_layer=nn.LayerNorm, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"NAT got unexpected arguments: {sorted(kwargs)}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if len(num_heads) != len(depths):
            raise ValueError(f"num_heads {tuple(num_heads)} must have one entry per stage of depths {tuple(depths)}")
        if dilations is None:
            dilations = [[1] * d for d in depths]
        if len(dilations) != len(depths) or any(len(dl) != d for dl, d in zip(dilations, depths)):
            raise ValueError(f"dilations must give one value per layer of depths {tuple(depths)}, got {dilations!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info, in_dim = [], [], embed_dim
        for i, depth in enumerate(depths):
            dim = int(embed_dim * 2**i)
            stages.append(NATStage(
                in_dim, dim, depth, num_heads[i], kernel_size, dilations[i],
                rates[sum(depths[:i]):sum(depths[:i + 1])], norm_layer, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, proj_drop=proj_drop_rate, layer_scale=layer_scale,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"levels.{i}"))
            in_dim = dim
        self.levels = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                (r"^levels\.(\d+)\.downsample", (0,)),
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.levels:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> normalised final NHWC map ``[B, H/32, W/32, num_features]``."""
        x = self.pos_drop(self.patch_embed(x))
        return self.norm(self.levels(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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


def checkpoint_filter_fn(state_dict: dict, model: NAT) -> dict:
    """Map a transformers (``NatForImageClassification``/``DinatForImageClassification``, ``*Model``,
    ``*Backbone``) or original SHI-Labs NAT/DiNAT state dict to this module's names."""
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    hf_style = any(k.startswith(("nat.", "dinat.", "embeddings.", "encoder.")) for k in state_dict)
    if hf_style:
        return _from_transformers(state_dict)
    return {_shift_downsample(k): v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------- registry
def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    default_out = tuple(range(len(kwargs.get("depths", (3, 4, 6, 5)))))
    out_indices = kwargs.pop("out_indices", default_out)
    return build_model_with_cfg(
        NAT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs,
    )


def _cfg(hf_hub_id: str = "", **kwargs) -> dict:
    cfg = dict(
        hf_hub_id=hf_hub_id, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj.0", classifier="head", license="mit",
    )
    return dict(cfg, **kwargs)


default_cfgs = generate_default_cfgs({
    "nat_mini.in1k": _cfg("shi-labs/nat-mini-in1k-224"),
    "nat_tiny.in1k": _cfg("shi-labs/nat-tiny-in1k-224"),
    "nat_small.in1k": _cfg("shi-labs/nat-small-in1k-224"),
    "nat_base.in1k": _cfg("shi-labs/nat-base-in1k-224"),
    "dinat_mini.in1k": _cfg("shi-labs/dinat-mini-in1k-224"),
    "dinat_tiny.in1k": _cfg("shi-labs/dinat-tiny-in1k-224"),
    "dinat_small.in1k": _cfg("shi-labs/dinat-small-in1k-224"),
    "dinat_base.in1k": _cfg("shi-labs/dinat-base-in1k-224"),
    "dinat_large.in22k_ft_in1k": _cfg("shi-labs/dinat-large-in22k-in1k-224"),
    "dinat_large_384.in22k_ft_in1k": _cfg("shi-labs/dinat-large-in22k-in1k-384", input_size=(3, 384, 384),
                                          pool_size=(12, 12), crop_pct=1.0),
})

_MINI = dict(depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), embed_dim=64, mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(_MINI, depths=(3, 4, 18, 5))
_SMALL = dict(depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), embed_dim=96, mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), embed_dim=128, mlp_ratio=2.0, drop_path_rate=0.5,
             layer_scale=1e-5)
_LARGE = dict(depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2.0, drop_path_rate=0.35)


def _dinat_dilations(depths: Sequence[int], first: tuple = (8, 4, 2, 1)) -> list:
    """DiNAT's schedule: layers alternate dilation 1 and the stage's dilation (1-based even layers dilated)."""
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, first)]


def _build(variant: str, pretrained: bool, cfg: dict, dilated: bool, kwargs: dict, first=(8, 4, 2, 1)) -> NAT:
    args = {**cfg, "kernel_size": 7, **kwargs}
    if dilated:
        args.setdefault("dilations", _dinat_dilations(args["depths"], first))
    return _create_nat(variant, pretrained, **args)


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _build("nat_mini", pretrained, _MINI, False, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _build("nat_tiny", pretrained, _TINY, False, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _build("nat_small", pretrained, dict(_SMALL, layer_scale=1e-5), False, kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _build("nat_base", pretrained, _BASE, False, kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _build("dinat_mini", pretrained, _MINI, True, kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _build("dinat_tiny", pretrained, _TINY, True, kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _build("dinat_small", pretrained, _SMALL, True, kwargs)  # no layer scale, unlike nat_small


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _build("dinat_base", pretrained, _BASE, True, kwargs)


@register_model
def dinat_large(pretrained: bool = False, **kwargs) -> NAT:
    return _build("dinat_large", pretrained, _LARGE, True, kwargs)


@register_model
def dinat_large_384(pretrained: bool = False, **kwargs) -> NAT:
    """DiNAT-L at 384²: dilations (13, 6, 3, 1) so stage windows still span the larger maps."""
    return _build("dinat_large_384", pretrained, _LARGE, True, kwargs, first=(13, 6, 3, 1))
