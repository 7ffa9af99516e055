"""Pieces shared by the visattn timm families: the staged-backbone base class (timm's model API), state-dict checks,
pooling, drop-path schedules, checkpoint resizing (the attention modules themselves are visattn.nn's)."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from timm.models._hub import download_cached_file, has_hf_hub
from torch import Tensor, nn

from visattn.nn._args import factory_kwargs
from visattn.nn.agent import SEPARABLE_BIAS_AXIS

POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax")  # timm's Swin head options (SelectAdaptivePool2d)
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")


def unwrap_state_dict(state_dict, family: str) -> dict:
    """Validate a checkpoint handed to a ``checkpoint_filter_fn`` and take it out of a training wrapper.

    Accepts a mapping of string keys to tensors, or one wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``
    (the official BiFormer / Agent-Attention / SHI-Labs training scripts save ``{"model": ..., "optimizer": ...}``).
    Raises TypeError for ``None``, a bare tensor, a non-mapping or non-string keys, naming what was given.
    """
    if state_dict is None:
        raise TypeError(f"{family} checkpoint_filter_fn: state_dict is None; pass the loaded checkpoint "
                        f"(a dict of parameter name -> tensor)")
    if isinstance(state_dict, Tensor):
        raise TypeError(f"{family} checkpoint_filter_fn: got a bare tensor of shape {tuple(state_dict.shape)}, "
                        f"not a state dict (a dict of parameter name -> tensor)")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{family} checkpoint_filter_fn: state_dict must be a dict of parameter name -> tensor, "
                        f"got {type(state_dict).__name__}")
    for wrapper in _WRAPPERS:
        inner = state_dict.get(wrapper) if all(isinstance(k, str) for k in state_dict) else None
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{family} checkpoint_filter_fn: state-dict keys must be strings, got "
                        f"{', '.join(repr(k) for k in bad[:3])}")
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def reject_unknown(model: str, kwargs: dict) -> None:
    """A model constructor's leftover keyword arguments: TypeError naming them (timm's model contract)."""
    if kwargs:
        raise TypeError(f"{model} got unexpected keyword arguments: {sorted(kwargs)}")


def check_model_args(num_classes, in_chans, **rates) -> None:
    """The arguments every family takes, checked at creation: ``num_classes`` (an int >= 0; 0 = no classifier),
    ``in_chans`` (an int >= 1), and dropout rates in [0, 1] (``drop_path_rate`` in [0, 1): 1 drops every block)."""
    for name, value, low in (("num_classes", num_classes, 0), ("in_chans", in_chans, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}" + (" (0: no classifier)" if low == 0 else "")
                             + f", got {value}")
    for name, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        high_ok = value < 1 if name == "drop_path_rate" else value <= 1
        if not (value >= 0 and high_ok):
            interval = "[0, 1)" if name == "drop_path_rate" else "[0, 1]"
            raise ValueError(f"{name} must be in {interval}, got {value}")


def check_out_indices(out_indices, count: int, what: str = "stages") -> tuple[int, ...]:
    """``features_only`` levels: ints in ``[-count, count)`` (negative counts from the end), at least one."""
    items = tuple(out_indices) if isinstance(out_indices, (tuple, list)) else (out_indices,)
    if not items or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in items):
        raise TypeError(f"out_indices must be an int or a non-empty sequence of ints, got {out_indices!r}")
    bad = [i for i in items if not -count <= i < count]
    if bad:
        raise ValueError(f"out_indices {tuple(items)}: {bad} out of range for a model with {count} {what} "
                         f"(valid: {-count}..{count - 1})")
    return items


def pretrained_file_name(variant: str, tag: str, sha256: str = "") -> str:
    """The cache file name of a registered URL (timm's ``url=(url, file name)`` form): ``visattn_<variant>.<tag>``,
    ``-<sha256 prefix>`` where a hash is published (timm's download then verifies it), ``.pth``. The official hosts'
    URLs end in ``/`` (Tsinghua cloud) or share ``/root/content`` (OneDrive), so their own base names cannot be
    used."""
    return f"visattn_{variant}.{tag}" + (f"-{sha256}" if sha256 else "") + ".pth"


def _peek_checkpoint(path: str, source: str) -> None:
    """A pretrained file must hold a state dict (possibly wrapped): TypeError naming ``source`` otherwise, before
    timm's loader fails inside on it. Memory-mapped where the file format allows, so nothing large is read twice."""
    if str(path).endswith(".safetensors"):
        return  # always a name -> tensor mapping
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Tensor):
        raise TypeError(f"{source} holds a bare tensor of shape {tuple(obj.shape)}, not a state dict "
                        f"(a dict of parameter name -> tensor)")
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source} holds a {type(obj).__name__}, not a state dict (a dict of parameter name -> tensor)")


def _resolve_weights(variant: str, kwargs: dict) -> str:
    """Where ``pretrained=True`` weights come from, with what timm cannot do itself done first: a registered
    ``url=(url, file name)`` is downloaded through timm's ``download_cached_file`` to that stable file name (hash
    checked where the name carries one) and handed to timm's loader as ``pretrained_cfg_overlay['file']``; a local
    file is checked to hold a state dict. Returns a description of the source for error messages."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
    if getattr(cfg, "source", None) == "hf-hub" or getattr(cfg, "state_dict", None) is not None:
        return f"pretrained weights of {variant}"
    if cfg.file:
        source = f"pretrained_cfg_overlay['file'] ({cfg.file})"
        _peek_checkpoint(cfg.file, source)
        return source
    if cfg.hf_hub_id and has_hf_hub():
        return f"pretrained weights of {variant} (Hugging Face hub {cfg.hf_hub_id})"
    if isinstance(cfg.url, (tuple, list)):
        url, name = cfg.url
        path = download_cached_file((url, name), check_hash=True, progress=False, cache_dir=kwargs.get("cache_dir"))
        source = f"pretrained weights of {variant} ({url}, cached as {path})"
        _peek_checkpoint(path, source)
        overlay["file"] = path
        kwargs["pretrained_cfg_overlay"] = overlay
        return source
    return f"pretrained weights of {variant} ({cfg.url})"


def _named_filter(filter_fn: Callable, source: str, state_dict, model=None) -> dict:
    try:
        return filter_fn(state_dict, model)
    except TypeError as err:
        raise TypeError(f"{source}: {err}") from None


def create(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable, feature_cfg: dict,
           kwargs: dict) -> nn.Module:
    """``build_model_with_cfg`` for a visattn family: pretrained weights resolved by :func:`_resolve_weights`
    (stable cache names, a checked file) and every checkpoint mapped by ``filter_fn``, whose TypeErrors name the
    weights' source."""
    source = _resolve_weights(variant, kwargs) if pretrained else variant
    return build_model_with_cfg(model_cls, variant, pretrained,
                                pretrained_filter_fn=functools.partial(_named_filter, filter_fn, source),
                                feature_cfg=feature_cfg, **kwargs)


def checked_size(x: Tensor, want: tuple[int, ...], start: int, message: str) -> Tensor:
    """``x`` itself when ``x.shape[start:start + len(want)] == want``, else ValueError(``message`` formatted with
    ``got=`` the sizes found). A leaf of FX tracing (timm's ``register_notrace_function``; a calling module also
    declares ``torch.fx.wrap("checked_size")``, since FX patches only some modules' globals): a traced graph keeps
    the call, so the check still runs on real tensors."""
    got = tuple(x.shape[start:start + len(want)])
    if got != tuple(want):
        raise ValueError(message.format(got=got))
    return x


register_notrace_function(checked_size)


def _register_nn_leaves() -> None:
    """visattn.nn's attention modules as leaves of timm's FX tracing (visattn.nn itself does not import timm)."""
    from visattn import nn as visattn_nn

    for name in ("NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D", "WindowAttention",
                 "AgentAttention", "BiLevelRoutingAttention", "SlidingTileAttention", "RadialAttention",
                 "VMoBAAttention"):
        register_notrace_module(getattr(visattn_nn, name))


_register_nn_leaves()


def resize_to_model(state_dict: dict, model: nn.Module, resize_other=None) -> dict:
    """A checkpoint of another ``img_size`` resized to ``model``: every tensor whose shape differs from the model's
    (same rank) is resized — the separable agent biases linearly along their spatial axis, anything else by
    ``resize_other(key, value, wanted_shape)`` (None: left as is). Returns ``state_dict`` itself when every shape
    already matches."""
    target = model.state_dict()

    def differs(key, value) -> bool:
        want = target.get(key)
        return (want is not None and isinstance(value, Tensor) and value.shape != want.shape
                and value.dim() == want.dim())

    if not any(differs(k, v) for k, v in state_dict.items()):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if differs(key, value):
            want, name = target[key].shape, key.rsplit(".", 1)[-1]
            if name in SEPARABLE_BIAS_AXIS:
                axis = SEPARABLE_BIAS_AXIS[name]
                value = resize_axis(value, axis, want[axis])
            elif resize_other is not None:
                value = resize_other(key, value, want)
        out[key] = value
    return out


class PreNormBlock(nn.Module):
    """``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))`` with timm's ``Mlp`` (``fc1`` / GELU /
    ``fc2``): the block the Agent-Attention families share; each family builds its ``attn`` and passes it in."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, proj_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_schedule(depths: Sequence[int], rate: float) -> list[list[float]]:
    """Linear stochastic-depth rates over all blocks, split per stage (pure Python: works on the meta device)."""
    total = sum(depths)
    rates = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for depth in depths:
        out.append(rates[start:start + depth])
        start += depth
    return out


def check_pool_type(global_pool) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
    return global_pool


def pool_multiplier(global_pool: str) -> int:
    """Feature multiplier of a pool type ('catavgmax' concatenates two poolings)."""
    return 2 if global_pool == "catavgmax" else 1


def pool(x: Tensor, global_pool: str, channels_last: bool) -> Tensor:
    """Global pooling of an NHWC (``channels_last``) or NCHW map, as timm's SelectAdaptivePool2d does."""
    if not global_pool:
        return x
    dims = (1, 2) if channels_last else (2, 3)
    if global_pool == "avg":
        return x.mean(dims)
    peak = x.amax(dims)
    if global_pool == "max":
        return peak
    mean = x.mean(dims)
    return 0.5 * (mean + peak) if global_pool == "avgmax" else torch.cat([mean, peak], dim=1)


def check_output_fmt(output_fmt, allowed=("NCHW", "NHWC")) -> str:
    if output_fmt not in allowed:
        raise ValueError(f"output_fmt must be one of {allowed}, got {output_fmt!r}")
    return "NCHW" if output_fmt == "NCHW" else "NHWC"


def resize_swin_table(table: Tensor, old_window: Sequence[int], new_window: Sequence[int]) -> Tensor:
    """Bicubic resize of a Swin ``[(2w0-1)(2w1-1), heads]`` table to another window (Swin's fine-tune recipe)."""
    old = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if old == new:
        return table
    grid = table.T.reshape(1, -1, *old).float()
    out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return out.reshape(-1, new[0] * new[1]).T.contiguous().to(table.dtype)


def resize_axis(t: Tensor, dim: int, size: int) -> Tensor:
    """Linear resize of one axis of a bias tensor (agent position biases at another input size)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1]).float()
    out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, dim).to(t.dtype)


def to_2tuple_int(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints (an image size), checked."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return items


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def feature_cfg(kwargs: dict, default_depths: Sequence[int]) -> dict:
    """timm's ``feature_cfg`` for ``build_model_with_cfg`` (hooks on the flattened stages); takes ``out_indices``
    out of the model ``kwargs`` (default: every stage of ``kwargs["depths"]`` or ``default_depths``)."""
    stages = len(kwargs.get("depths", default_depths))
    out_indices = check_out_indices(kwargs.pop("out_indices", tuple(range(stages))), stages)
    return dict(flatten_sequential=True, out_indices=out_indices)


def layer_scales(dim: int, layer_scale: float | None) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """A block's ``(gamma1, gamma2)``: per-channel scales of its attention and MLP branches initialised to
    ``layer_scale``, or ``(None, None)`` when layer scale is off (None or 0)."""
    if not layer_scale:
        return None, None
    return nn.Parameter(layer_scale * torch.ones(dim)), nn.Parameter(layer_scale * torch.ones(dim))


def run_blocks(blocks: nn.Sequential, x: Tensor, grad_checkpointing: bool) -> Tensor:
    """A stage's blocks in order, through timm's ``checkpoint_seq`` when gradient checkpointing is on."""
    if grad_checkpointing and not torch.jit.is_scripting():
        return checkpoint_seq(blocks, x)
    return blocks(x)


def classifier(model: nn.Module, width: int, num_classes: int) -> nn.Module:
    """A ``width -> num_classes`` Linear head (Identity for 0) on the device and dtype of ``model``'s parameters and
    in its train/eval mode, so ``reset_classifier`` keeps a model built with ``device=`` / ``dtype=`` (or moved)
    in one place."""
    if num_classes <= 0:
        return nn.Identity()
    ref = next(model.parameters(), None)
    head = nn.Linear(width, num_classes, **({} if ref is None else dict(device=ref.device, dtype=ref.dtype)))
    return head.train(model.training)


class StagedBackbone(nn.Module):
    """timm's model API for a stem -> stages -> final norm -> pooled linear head pyramid (NAT/DiNAT, BiFormer,
    Agent-Swin): ``forward_features`` / ``forward_head`` / ``forward_intermediates`` /
    ``prune_intermediate_layers``, classifier reset, grad checkpointing, layer-decay groups, weight init.

    A subclass names its stem and stage ``nn.Sequential`` in ``_stem_name`` / ``_stages_name`` (the attribute names
    its checkpoints use), sets ``output_fmt`` ("NHWC" or "NCHW": the layout its stages return), ``global_pool``,
    ``num_classes``, ``num_features``, ``head_hidden_size`` and ``feature_info`` (one dict per stage), builds its stem
    and stages, then calls ``_init_head(norm, drop_rate)``; it overrides ``_embed`` when the stem is more than one
    module call. Each stage module has a ``grad_checkpointing`` flag.
    """

    _stem_name: str
    _stages_name: str
    output_fmt: str

    def _stages(self) -> nn.Sequential:
        return getattr(self, self._stages_name)

    def _embed(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> the first stage's input."""
        return getattr(self, self._stem_name)(x)

    def _make_head(self, num_classes: int) -> nn.Module:
        return classifier(self, self.num_features * pool_multiplier(self.global_pool), num_classes)

    def _init_head(self, norm: nn.Module, drop_rate: float) -> None:
        """Register the final ``norm``, head dropout and classifier (after the stages), then initialise every Linear
        and LayerNorm of the model (timm's truncated-normal scheme)."""
        self.norm = norm
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(self.num_classes)
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
    def group_matcher(self, coarse: bool = False) -> dict:
        stages = self._stages_name
        return dict(
            stem=rf"^{self._stem_name}",
            blocks=rf"^{stages}\.(\d+)" if coarse else [
                (rf"^{stages}\.(\d+)\.downsample", (0,)),
                (rf"^{stages}\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self._stages():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = check_pool_type(global_pool)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Stage outputs (timm's signature).

        Args:
            x: images ``[B, C, H, W]``; indices: last n stages (int), the given stage indices (list), or all (None);
            norm: apply the final norm to the last stage's map; stop_early: stop after the last wanted stage;
            output_fmt: "NCHW" (timm's default), or "NHWC" on models whose ``output_fmt`` is "NHWC";
            intermediates_only: return only the list.
        Returns:
            ``[maps]`` or ``(final normalised map in the model's output_fmt, [maps])``; stage i's map is
            ``[B, C_i, H/2^(i+2), W/2^(i+2)]`` in NCHW.
        """
        # NHWC models offer both layouts; NCHW models (BiFormer: channels-last NCHW views) offer only NCHW
        fmt = check_output_fmt(output_fmt, ("NCHW", "NHWC") if self.output_fmt == "NHWC" else ("NCHW",))
        stage_list = self._stages()
        take, max_index = feature_take_indices(len(stage_list), indices)
        last = len(stage_list) - 1
        stages = stage_list if (torch.jit.is_scripting() or not stop_early) else stage_list[: max_index + 1]
        x = self._embed(x)
        intermediates, i = [], 0
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if (norm and i == last) else x
                intermediates.append(y if fmt == self.output_fmt else y.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last wanted one (and the norm / head); returns the kept indices."""
        stage_list = self._stages()
        take, max_index = feature_take_indices(len(stage_list), indices)
        prune_end = max_index < len(stage_list) - 1
        setattr(self, self._stages_name, stage_list[: max_index + 1])
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> normalised final map in ``output_fmt``: ``[B, H/32, W/32, num_features]``
        (NHWC) or ``[B, num_features, H/32, W/32]`` (NCHW)."""
        return self.norm(self._stages()(self._embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the final map (``global_pool``), dropout, classifier (skipped when ``pre_logits``)."""
        x = self.head_drop(pool(x, self.global_pool, channels_last=self.output_fmt == "NHWC"))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


__all__ = [
    "POOL_TYPES",
    "checked_size",
    "check_model_args",
    "classifier",
    "check_out_indices",
    "create",
    "factory_kwargs",
    "pretrained_file_name",
    "reject_unknown",
    "StagedBackbone",
    "ceil_div",
    "check_output_fmt",
    "check_pool_type",
    "drop_path_schedule",
    "feature_cfg",
    "layer_scales",
    "pool",
    "pool_multiplier",
    "resize_axis",
    "resize_swin_table",
    "run_blocks",
    "to_2tuple_int",
    "unwrap_state_dict",
]
