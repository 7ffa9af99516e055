"""Agent-PVT (Han et al., ECCV 2024, arXiv:2312.08874) as timm models over visattn's agent attention.

Architecture, read from LeapLabTHU/Agent-Attention (``agent_transformer/models/agent_pvt.py``, ``models/build.py``,
``config.py`` and ``cfgs/agent_pvt_{t,s,m,b}.yaml``; ``agent_pvt_b.yaml`` builds ``agent_pvt_large``): PVT-v1
(Wang et al., 2021) whose four stages each open with their own patch embedding (a conv with kernel = stride = 4,
then 2, and a LayerNorm) plus a learned absolute position embedding, followed by pre-norm blocks (LayerNorm eps
1e-6, MLP ratios 8-8-4-4, widths 64-128-320-512, heads 1-2-5-8). Every block of the released models is an agent
block (``ATTN_TYPE: AAAA``) with 9 / 16 / 49 / 49 agents per stage and no spatial reduction (the config default
``PVT_LA_SR_RATIOS = 1111``). There is no final norm: the head is a Linear on the mean of the last stage's tokens.

An agent block (``A``): q, k, v from separate ``q`` / ``kv`` Linears; agents are the adaptive average pool of q to
``sqrt(agent_num)``² positions; with ``sr_ratio > 1`` k and v come from the map reduced by a ``sr`` conv
(kernel = stride = sr) + LayerNorm. Agents attend the keys with ``an_bias`` (7×7, bilinearly resized to the key
map) + ``ah_bias + aw_bias``; queries attend the agents with ``na_bias`` (resized to the query map, transposed) +
``ha_bias + wa_bias``; a 3×3 depthwise conv of v (bilinearly upsampled to the query map when reduced) is added
before ``proj``. A ``B`` block is PVT's spatial-reduction attention (``sr_ratios`` 8-4-2-1).

Feature maps are NHWC (like Agent-Swin); ``forward_intermediates`` and the ``getter`` features give NCHW.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from visattn import nn as visattn_nn
from visattn.models import _helpers
from visattn.models._helpers import checked_size
from visattn.models.agent import agent_cfg, tsinghua
from visattn.nn.agent import SEPARABLE_BIAS_AXIS, SpatialReduction

torch.fx.wrap("checked_size")  # a call node in any FX trace, whichever module is the traced root

__all__ = ["AgentPyramidVisionTransformer", "PvtAgentAttention", "SpatialReductionAttention", "checkpoint_filter_fn"]



@register_notrace_module
class PvtAgentAttention(visattn_nn.AgentAttention):
    """Agent-PVT's agent attention: :class:`visattn.nn.AgentAttention` in PVT's form (``fused_qkv=False``,
    ``sr_ratio``) on a ``[B, H, W, C]`` map of fixed size ``map_size``, configured with this family's argument
    order (no code of its own). Parameters: ``q``, ``kv``, ``proj``, ``sr``/``norm`` when ``sr_ratio > 1``,
    ``dwc``, ``an_bias``, ``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``.

    Args:
        dim: channels C; num_heads: heads (divides C); map_size: (H, W) the separable biases are sized for;
        agent_num: agents, a perfect square (a pooled grid); sr_ratio: key/value spatial reduction (1: none, as
        released; > 1 needs H and W divisible by it); qkv_bias; proj_drop; backend: "auto" | "triton" | "sdpa" |
        "reference" (see :func:`visattn.agent_attention`); device / dtype: timm's factory keywords. A leaf of timm's
        FX tracing (the map-size check and the agent op).
    """

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int, map_size: Sequence[int], agent_num: int = 49, sr_ratio: int = 1,
                 qkv_bias: bool = True, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__(dim, tuple(map_size), num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop,
                         agent_num=agent_num, fused_qkv=False, sr_ratio=sr_ratio, backend=backend)


class SpatialReductionAttention(SpatialReduction):
    """PVT's attention (the official ``Attention``: ``q``, ``kv``, ``proj``, ``sr``/``norm``): every query attends
    the keys of the map reduced by ``sr_ratio``; one fused SDPA call on ``[B, H, W, C]``. Takes timm's ``device`` /
    ``dtype``."""

    @_helpers.factory_kwargs
    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self._init_reduction(dim, sr_ratio)
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        q = self.q(x).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(self._reduce(x)).view(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, height, width, channels)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sr_ratio={self.sr_ratio}"


class AgentPvtBlock(_helpers.PreNormBlock):
    """Pre-norm block on ``[B, H, W, C]``: ``A`` (agent attention) or ``B`` (spatial-reduction attention), then
    the MLP (``fc1`` / ``fc2``, GELU)."""

    def __init__(self, dim: int, num_heads: int, map_size: Sequence[int], attn_type: str, agent_num: int,
                 sr_ratio: int, mlp_ratio: float, qkv_bias: bool = True, proj_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer=nn.LayerNorm, backend: str = "auto"):
        if attn_type == "A":
            attn = PvtAgentAttention(dim, num_heads, map_size, agent_num, sr_ratio, qkv_bias, proj_drop,
                                     backend=backend)
        elif attn_type == "B":
            attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, proj_drop)
        else:
            raise ValueError(f"attn_type must be 'A' (agent) or 'B' (spatial reduction), got {attn_type!r}")
        super().__init__(dim, attn, mlp_ratio, proj_drop, drop_path, norm_layer)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = ``patch_size``, then LayerNorm (eps 1e-5, as released); NCHW images
    (``nchw_input``, the first stage) or NHWC maps in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, nchw_input: bool = False):
        super().__init__()
        self.nchw_input = nchw_input
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x if self.nchw_input else x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class AgentPvtStage(nn.Module):
    """One PVT stage: patch embedding, + absolute position embedding ``[1, H*W, C]`` (the official shape), dropout,
    blocks; NCHW images (the first stage) or NHWC maps in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, map_size: Sequence[int], depth: int,
                 attn_types: Sequence[str], drop_path: Sequence[float], pos_drop: float = 0.0,
                 nchw_input: bool = False, **block_kwargs):
        super().__init__()
        self.map_size = tuple(map_size)
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, nchw_input)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.map_size[0] * self.map_size[1], dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(pos_drop)
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            AgentPvtBlock(dim, map_size=self.map_size, attn_type=attn_types[j], drop_path=drop_path[j],
                          **block_kwargs)
            for j in range(depth)
        ])

    def forward(self, x: Tensor) -> Tensor:
        x = checked_size(self.patch_embed(x), self.map_size, 1,
                         f"AgentPvtStage: the map is {{got}} but the position embedding is sized for {self.map_size}; "
                         f"create the model with img_size= for this input")
        x = self.pos_drop(x + self.pos_embed.view(1, *self.map_size, -1))
        return _helpers.run_blocks(self.blocks, x, self.grad_checkpointing)


def _per_stage(value, stages: int, name: str, cast=int) -> list:
    """A per-stage config given as a sequence or as the official digit string (``'1111'``, ``'AAAA'``)."""
    items = list(value)
    if len(items) != stages:
        raise ValueError(f"{name} {value!r} must have one entry per stage ({stages})")
    try:
        return [cast(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r}: each entry must be a {cast.__name__}") from None


class AgentPyramidVisionTransformer(_helpers.StagedBackbone):
    """PVT with agent-attention blocks (Agent-PVT).

    Args:
        img_size: input size the position embeddings and biases are built for (int or (H, W); multiples of
            ``patch_size * 2**(stages-1)``, and of every ``sr_ratio`` at the stage's scale); patch_size: first
            patch embedding (later stages embed 2×2); in_chans; num_classes (0: pooled features); global_pool:
            '', 'avg' (the official head), 'max', 'avgmax', 'catavgmax'; embed_dims, num_heads, mlp_ratios, depths:
            per stage; qkv_bias; drop_rate (head); pos_drop_rate (after the position embeddings); proj_drop_rate
            (attention and MLP outputs: the official ``drop_rate``); drop_path_rate; sr_ratios: spatial reduction of
            the ``B`` blocks; agent_sr_ratios: of the ``A`` blocks (official ``PVT_LA_SR_RATIOS``, e.g. '1111');
            agent_num: per stage; attn_type: one 'A'/'B' letter per stage (e.g. 'AAAA'); backend: attention backend
            of every agent block; device / dtype: timm's factory keywords.
    """

    _stem_name, _stages_name = "stages", "stages"  # no stem: each stage opens with its own patch embedding

    @_helpers.factory_kwargs
    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 depths: Sequence[int] = (2, 2, 2, 2), qkv_bias: bool = True, drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), agent_sr_ratios="1111",
                 agent_num: Sequence[int] = (9, 16, 49, 49), attn_type: str = "AAAA", backend: str = "auto",
                 **kwargs):
        super().__init__()
        _helpers.reject_unknown("AgentPyramidVisionTransformer", kwargs)
        _helpers.check_model_args(num_classes, in_chans, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
                                  proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate)
        stages = len(depths)
        embed_dims = _per_stage(embed_dims, stages, "embed_dims")
        num_heads = _per_stage(num_heads, stages, "num_heads")
        mlp_ratios = _per_stage(mlp_ratios, stages, "mlp_ratios", float)
        sr_ratios = _per_stage(sr_ratios, stages, "sr_ratios")
        if isinstance(agent_sr_ratios, int) and not isinstance(agent_sr_ratios, bool):
            agent_sr_ratios = str(agent_sr_ratios)  # the official config's PVT_LA_SR_RATIOS = 1111
        agent_sr_ratios = _per_stage(agent_sr_ratios, stages, "agent_sr_ratios")
        agent_num = _per_stage(agent_num, stages, "agent_num")
        attn_types = _per_stage(attn_type, stages, "attn_type", str)
        self.img_size = _helpers.to_2tuple_int(img_size, "img_size")
        stride = patch_size * 2 ** (stages - 1)
        if any(s % stride for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of {stride} (patch_size * 2**(stages-1))")
        self.global_pool = _helpers.check_pool_type(global_pool)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dims[-1]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        rates = _helpers.drop_path_schedule(depths, drop_path_rate)
        stage_list, self.feature_info = [], []
        for i, depth in enumerate(depths):
            reduction = patch_size * 2**i
            map_size = (self.img_size[0] // reduction, self.img_size[1] // reduction)
            sr = agent_sr_ratios[i] if attn_types[i] == "A" else sr_ratios[i]  # official rule
            stage_list.append(AgentPvtStage(
                embed_dims[i - 1] if i else in_chans, embed_dims[i], 2 if i else patch_size, map_size, depth,
                [attn_types[i]] * depth, rates[i], pos_drop=pos_drop_rate, nchw_input=i == 0, num_heads=num_heads[i],
                agent_num=agent_num[i], sr_ratio=sr, mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, norm_layer=norm_layer, backend=backend,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stage_list)
        self._init_head(nn.Identity(), drop_rate)  # the official model has no final norm

    def _embed(self, x: Tensor) -> Tensor:
        # the first stage's patch embedding takes the NCHW images (timm's hooked features call it so)
        return checked_size(x, self.img_size, 2,
                            f"AgentPyramidVisionTransformer: input {{got}} but the position embeddings and biases are "
                            f"sized for img_size={self.img_size}; create the model with img_size= for this input "
                            f"(checkpoints are resized by checkpoint_filter_fn)")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.(?:patch_embed|pos_embed)",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(?:patch_embed|pos_embed)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Empty, as released: the official ``no_weight_decay`` names only a ``cls_token`` the model lacks, so its
        training decayed the position embeddings and agent biases too."""
        return set()


# ----------------------------------------------------------------------------------------------- checkpoints
_OFFICIAL_KEY = re.compile(r"^(patch_embed|pos_embed|block)(\d+)(.*)$")


def _resize_pos_embed(value: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of a square ``[1, n*n, C]`` position embedding to ``[1, H*W, C]`` (the official model
    resizes it so, on the fly, for other input sizes)."""
    side = math.isqrt(value.shape[1])
    if side * side != value.shape[1]:
        raise ValueError(f"cannot resize a position embedding of {value.shape[1]} tokens (not a square grid) to "
                         f"{tuple(size)}")
    grid = value.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, size=tuple(size), mode="bilinear")
    return out.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1).to(value.dtype)


def checkpoint_filter_fn(state_dict, model: AgentPyramidVisionTransformer | None = None) -> dict:
    """Map an official Agent-PVT checkpoint (``checkpoint["model"]`` of LeapLabTHU/Agent-Attention) to this module.

    ``patch_embed{i+1}`` -> ``stages.i.patch_embed``, ``pos_embed{i+1}`` -> ``stages.i.pos_embed``,
    ``block{i+1}.j`` -> ``stages.i.blocks.j``; the separable agent biases lose their leading 1
    (``[1, heads, ...]`` -> ``[heads, ...]``). When ``model`` was built for another ``img_size``, the position
    embeddings and biases are resized to it. A state dict already in visattn's layout and size is returned
    unchanged. Raises TypeError for ``None``, a bare tensor or non-string keys.
    """
    state_dict = _helpers.unwrap_state_dict(state_dict, "Agent-PVT")
    if any(_OFFICIAL_KEY.match(k) for k in state_dict):
        converted = {}
        for key, value in state_dict.items():
            match = _OFFICIAL_KEY.match(key)
            if match:
                kind, stage, rest = match[1], int(match[2]) - 1, match[3]
                key = (f"stages.{stage}.blocks{rest}" if kind == "block" else f"stages.{stage}.{kind}{rest}")
            if key.endswith(tuple(f".{n}" for n in SEPARABLE_BIAS_AXIS)) and value.dim() == 5:
                value = value.squeeze(0)  # official [1, heads, ...] -> ours [heads, ...]
            converted[key] = value
        state_dict = converted
    if model is None:
        return state_dict

    def resize_pos_embed(key: str, value: Tensor, want: torch.Size) -> Tensor:
        match = re.match(r"^stages\.(\d+)\.pos_embed$", key)
        return _resize_pos_embed(value, model.stages[int(match[1])].map_size) if match else value

    return _helpers.resize_to_model(state_dict, model, resize_pos_embed)


# ----------------------------------------------------------------------------------------------- registry
def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    return _helpers.create(AgentPyramidVisionTransformer, variant, pretrained, checkpoint_filter_fn,
                           _helpers.feature_cfg(kwargs, (2, 2, 2, 2)), kwargs)


def _cfg(url: tuple[str, str] | str = "", **kwargs) -> dict:
    return agent_cfg(url, **dict(dict(first_conv="stages.0.patch_embed.proj"), **kwargs))


default_cfgs = generate_default_cfgs({
    "agent_pvt_t.in1k": _cfg(tsinghua("13fdf0e0a7c5498c934f", "agent_pvt_t.in1k")),
    "agent_pvt_s.in1k": _cfg(tsinghua("36b8be9a8863456685a3", "agent_pvt_s.in1k")),
    "agent_pvt_m.in1k": _cfg(tsinghua("4d00ecacf18b45f9b88c", "agent_pvt_m.in1k")),
    "agent_pvt_m.in1k_256": _cfg(tsinghua("654df734121643b19c52", "agent_pvt_m.in1k_256"), input_size=(3, 256, 256),
                                 pool_size=(8, 8)),
    "agent_pvt_l.in1k": _cfg(tsinghua("040cfe0cfbbe4762ad09", "agent_pvt_l.in1k")),
})

_RELEASED = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 qkv_bias=True, sr_ratios=(8, 4, 2, 1), agent_sr_ratios="1111", agent_num=(9, 16, 49, 49),
                 attn_type="AAAA")


@register_model
def agent_pvt_t(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-T (11.6M, 2.0 GMACs): PVT-T (depths 2-2-2-2) with agent attention in every block."""
    args = dict(_RELEASED, depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_t", pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_s(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-S (20.6M, 4.0 GMACs): PVT-S (depths 3-4-6-3) with agent attention in every block."""
    args = dict(_RELEASED, depths=(3, 4, 6, 3), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_s", pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_m(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-M (35.9M, 7.0 GMACs): PVT-M (depths 3-4-18-3) with agent attention in every block."""
    args = dict(_RELEASED, depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_m", pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_l(pretrained: bool = False, **kwargs) -> AgentPyramidVisionTransformer:
    """Agent-PVT-L (48.7M, 10.4 GMACs): PVT-L (depths 3-8-27-3) with agent attention in every block."""
    args = dict(_RELEASED, depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_l", pretrained, **dict(args, **kwargs))
