"""``patch(model, ...)`` / ``unpatch(model)``: swap a diffusers model's attention processors, and put them back.

One table, keyed by the model's class name (the Liger idiom), says for each supported model which attention modules
to swap, which processor to build, and how a pre-forward hook reads the latent grid from the model's call. The
original processor objects and the hook handles are kept on the model, so ``unpatch`` restores it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from visattn.diffusion import _compat
from visattn.diffusion.ltx2 import LTX2NeighborhoodAttnProcessor
from visattn.diffusion.processors import (
    AgentSDAttnProcessor,
    FluxNeighborhoodAttnProcessor,
    HunyuanVideoNeighborhoodAttnProcessor,
    LatentGrid,
    WanNeighborhoodAttnProcessor,
)
from visattn.functional import non_negative_int

_STATE = "_visattn_patch"


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _flux_grid(model, args, kwargs, context: LatentGrid) -> None:
    """FLUX: the grid from ``img_ids`` (row-major ``(0, row, col)`` ids) and the text length."""
    img_ids = _argument(args, kwargs, "img_ids", 4)
    text = _argument(args, kwargs, "encoder_hidden_states", 1)
    if img_ids is None or text is None:
        raise ValueError("visattn's FLUX processors need img_ids and encoder_hidden_states in the forward call")
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    height, width = int(rows.max()) + 1, int(cols.max()) + 1
    index = torch.arange(ids.shape[0], device=ids.device)
    if (height * width != ids.shape[0] or not torch.equal(rows, index // width)
            or not torch.equal(cols, index % width) or not bool((ids[:, 0] == ids[0, 0]).all())):
        raise ValueError("img_ids are not one row-major (0, row, col) grid (e.g. several images or reference "
                         "latents); the neighborhood processors need a single image grid")
    context.grid, context.text_tokens = (height, width), text.shape[1]


def _video_grid(patch_sizes: Callable[[object], tuple[int, int, int]]):
    def hook(model, args, kwargs, context: LatentGrid) -> None:
        latent = _argument(args, kwargs, "hidden_states", 0)
        if latent is None or latent.dim() != 5:
            raise ValueError("the video transformer's hidden_states must be [B, C, F, H, W]")
        sizes = patch_sizes(model.config)
        context.grid = tuple(n // p for n, p in zip(latent.shape[2:], sizes, strict=False))
        text = _argument(args, kwargs, "encoder_hidden_states", 2)
        context.text_tokens = None if text is None else text.shape[1]
    return hook


@dataclass(frozen=True)
class _Family:
    """How to patch one diffusers model class."""

    targets: Callable[[nn.Module], list[tuple[str, nn.Module]]]  # the attention modules to swap
    make: Callable[..., object]  # processor factory: make(context=..., **kwargs)
    grid_hook: Callable | None  # (model, args, kwargs, context) -> None, run before every forward
    methods: tuple[str, ...]


def _blocks(*names: str, attribute: str = "attn"):
    def targets(model):
        found = []
        for name in names:
            for index, block in enumerate(getattr(model, name)):
                found.append((f"{name}.{index}.{attribute}", getattr(block, attribute)))
        return found
    return targets


def _ltx2_targets(model):
    cls = _compat.load_class("models.autoencoders.ltx2_diffusion_decoder", "LTX2VideoVaeNeighborhoodAttention",
                             "visattn.diffusion.patch")
    return [(name, module) for name, module in model.named_modules() if isinstance(module, cls)]


def _make_ltx2(context=None, backend=None, **kwargs):
    if kwargs:
        raise ValueError(f"the LTX-2.5 decoder's kernels come from its config; unexpected arguments {sorted(kwargs)}")
    return LTX2NeighborhoodAttnProcessor(backend=backend)


_VIDEO_METHODS = ("neighborhood", "sta", "radial", "vmoba")
_FAMILIES: dict[str, _Family] = {
    "LTX2VideoDiffusionDecoderModel": _Family(_ltx2_targets, _make_ltx2, None, ("neighborhood",)),
    "FluxTransformer2DModel": _Family(_blocks("transformer_blocks", "single_transformer_blocks"),
                                      FluxNeighborhoodAttnProcessor, _flux_grid, ("neighborhood",)),
    "HunyuanVideoTransformer3DModel": _Family(
        _blocks("transformer_blocks", "single_transformer_blocks"), HunyuanVideoNeighborhoodAttnProcessor,
        _video_grid(lambda c: (c.patch_size_t, c.patch_size, c.patch_size)), _VIDEO_METHODS),
    "WanTransformer3DModel": _Family(_blocks("blocks", attribute="attn1"), WanNeighborhoodAttnProcessor,
                                     _video_grid(lambda c: tuple(c.patch_size)), _VIDEO_METHODS),
    "UNet2DConditionModel": _Family(None, AgentSDAttnProcessor, None, ("agent",)),  # per-block hooks, below
}


def supported_models() -> tuple[str, ...]:
    """The diffusers model class names :func:`patch` knows."""
    return tuple(_FAMILIES)


def _patch_unet(model: nn.Module, kwargs: dict) -> tuple[dict, list]:
    """AgentSD on every BasicTransformerBlock self-attention; each Transformer2DModel records its token map."""
    transformer_cls = _compat.load_class("models.transformers.transformer_2d", "Transformer2DModel",
                                         "visattn.diffusion.patch")
    input_size: dict[str, tuple[int, int]] = {}

    def record_input(module, args, call_kwargs):
        sample = _argument(args, call_kwargs, "sample", 0)
        input_size["hw"] = tuple(sample.shape[-2:])

    hooks = [model.register_forward_pre_hook(record_input, with_kwargs=True)]
    originals = {}
    for name, module in model.named_modules():
        if not isinstance(module, transformer_cls):
            continue
        context = LatentGrid()

        def record_grid(block, args, call_kwargs, context=context):
            hidden = _argument(args, call_kwargs, "hidden_states", 0)
            if hidden.dim() != 4:
                raise ValueError("AgentSD needs the Transformer2DModel's [B, C, H, W] input to know its token map")
            context.grid = tuple(hidden.shape[-2:])
            if "hw" in input_size:
                context.downsample = max(1, round(input_size["hw"][0] / context.grid[0]))

        hooks.append(module.register_forward_pre_hook(record_grid, with_kwargs=True))
        for sub_name, block in module.named_modules():
            attn1 = getattr(block, "attn1", None)
            if attn1 is None or type(block).__name__ != "BasicTransformerBlock" or attn1.is_cross_attention:
                continue
            path = f"{name}.{sub_name}.attn1" if sub_name else f"{name}.attn1"
            originals[path] = attn1.processor
            attn1.set_processor(AgentSDAttnProcessor(context=context, **kwargs))
    return originals, hooks


def _for_block(kwargs: dict, index: int) -> dict:
    """The processor arguments of the ``index``-th block: a list ``chunk_size`` (VMoBA) cycles over the blocks."""
    cycle = kwargs.get("chunk_size")
    if not isinstance(cycle, list):
        return kwargs
    if not cycle:
        raise ValueError("chunk_size must not be an empty list")
    return {**kwargs, "chunk_size": cycle[index % len(cycle)]}


def patch(model: nn.Module, method: str | None = None, *, attention: str | None = None, dense_blocks: int = 0,
          **kwargs) -> nn.Module:
    """Swap a diffusers model's attention for visattn's, training-free.

    Supported (``supported_models()``): ``LTX2VideoDiffusionDecoderModel`` (its own NA kernels, on visattn),
    ``FluxTransformer2DModel`` (neighborhood / GNA: keyword arguments ``kernel_size`` (required), ``dilation``,
    ``stride``, ``is_causal``, ``grid``, ``backend``), ``HunyuanVideoTransformer3DModel`` and
    ``WanTransformer3DModel`` (the same, or ``attention="sta"`` with ``tile_size`` / ``kernel_tiles``, or
    ``attention="radial"`` with ``block_size`` / ``decay_factor`` / ``attention_sink``, or ``attention="vmoba"``
    with ``chunk_size`` / ``select_mode`` / ``topk`` / ``threshold`` / ``threshold_type``, where a *list* of chunk
    sizes cycles over the blocks, VMoBA's layer-wise 1-D/2-D/3-D recurrence: ``chunk_size=[2, (4, 4), (2, 4, 4)]``;
    text tokens stay dense and are extra keys of the video queries' softmax) and ``UNet2DConditionModel`` (AgentSD
    agent attention; ``agent_grid``, ``k_scale2``, ``k_shortcut``, ``max_downsample``, ``backend``).

    Args:
        model: the diffusers model (not the pipeline: pass ``pipe.transformer`` / ``pipe.unet``).
        method: "neighborhood", "sta", "radial", "vmoba" or "agent"; default: the model's first method.
        attention: the same as ``method``, by keyword (``patch(model, attention="radial")``).
        dense_blocks: the first ``dense_blocks`` patched blocks keep the stock processor (Radial Attention's
            release keeps its first layers dense: ``dense_layers``).
        **kwargs: the processor's arguments (above).

    Returns:
        ``model``, changed in place. ``unpatch(model)`` restores the original processors and removes the hooks.

    Raises:
        ValueError: unknown model class, a method the model does not support, an already patched model, or a
            diffusers release outside the tested range / with a changed interface.
    """
    name = type(model).__name__
    family = _FAMILIES.get(name)
    if family is None:
        raise ValueError(f"visattn.diffusion.patch does not know {name} (diffusers {_compat.diffusers_version()}); "
                         f"supported: {supported_models()}")
    if method is not None and attention is not None and method != attention:
        raise ValueError(f"method={method!r} and attention={attention!r} disagree; pass one of them")
    method = method or attention or family.methods[0]
    if method not in family.methods:
        raise ValueError(f"{name} supports attention {family.methods}, got {method!r}")
    dense_blocks = non_negative_int(dense_blocks, "dense_blocks")
    if hasattr(model, _STATE):
        raise ValueError(f"{name} is already patched by visattn; call visattn.diffusion.unpatch(model) first")
    _compat.check_diffusers_version(f"visattn.diffusion.patch({name})")
    if name == "UNet2DConditionModel":
        originals, hooks = _patch_unet(model, kwargs)
    else:
        if method == "neighborhood" and family.grid_hook is not None and "kernel_size" not in kwargs:
            raise ValueError(f"patch({name}) needs kernel_size=")
        if len(family.methods) > 1:
            kwargs = {**kwargs, "attention": method}
        context = LatentGrid()
        targets = family.targets(model)
        processors = [family.make(context=context, **_for_block(kwargs, index))  # builds (and checks) first
                      for index in range(dense_blocks, len(targets))]
        targets = targets[dense_blocks:]
        originals, hooks = {}, []
        for (path, module), processor in zip(targets, processors, strict=False):
            originals[path] = module.processor
            module.set_processor(processor)
        if family.grid_hook is not None:  # also with a fixed grid: FLUX's single-stream blocks need the text length
            hook = family.grid_hook
            hooks.append(model.register_forward_pre_hook(
                lambda module, args, call_kwargs: hook(module, args, call_kwargs, context), with_kwargs=True))
    if not originals:
        for handle in hooks:
            handle.remove()
        raise ValueError(f"found no attention module to patch in {name}")
    setattr(model, _STATE, {"originals": originals, "hooks": hooks})
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the original processor objects go back and the hooks are removed."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by visattn")
    modules = dict(model.named_modules())
    for path, processor in state["originals"].items():
        modules[path].set_processor(processor)
    for handle in state["hooks"]:
        handle.remove()
    delattr(model, _STATE)
    return model


def patch_ltx2(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """Put :class:`LTX2NeighborhoodAttnProcessor` on every neighborhood-attention module of an LTX-2.5 decoder.

    Args:
        model: ``LTX2VideoDiffusionDecoderModel`` (or any module containing ``LTX2VideoVaeNeighborhoodAttention``).
        backend: passed to the processor.

    Returns:
        ``model`` (changed in place; ``visattn.diffusion.unpatch`` restores its processors).
    """
    return patch(model, "ltx2", backend=backend)


__all__ = ["patch", "patch_ltx2", "supported_models", "unpatch"]
