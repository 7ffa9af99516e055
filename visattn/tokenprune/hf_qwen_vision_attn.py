"""Batched window / frame attention for the vision towers of Hugging Face Qwen2-VL and Qwen2.5-VL (opt-in, exact).

With ``attn_implementation="sdpa"`` (or ``"eager"``), transformers' ``VisionAttention`` (Qwen2-VL) and
``Qwen2_5_VLVisionAttention`` (Qwen2.5-VL) read the chunk lengths of ``cu_seqlens`` back to the host
(``lengths.tolist()``) in every layer and then call the attention function once per chunk in a Python loop: once
per frame in the full-attention blocks, once per window in Qwen2.5-VL's windowed blocks (a 32-frame 448x448 video
is 256 windows x 28 windowed blocks + 16 frames x 4 full blocks, about 7,000 calls per video, each on a few dozen
tokens).

:func:`patch_vision_attention` rebinds the ``forward`` of those modules (instances only: no parameter, buffer or
state-dict change) to one that groups the chunks by length and makes ONE attention call per distinct length, the
chunks of that length stacked as a batch ``[n_chunks, heads, length, head_dim]``. Windows of equal size (grids
divisible by the window) and frames of one video are then one call per layer. Everything else is the stock
arithmetic, called from the model's own module: the ``qkv`` and ``proj`` layers, ``apply_rotary_pos_emb_vision``,
and the attention function ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)`` picks for the
configured implementation (``sdpa_attention_forward`` or ``eager_attention_forward``), with the same arguments.
Each chunk attends only to itself in both forms, so the results are the stock ones up to the floating-point
reassociation a batched kernel may do.

The grouping needs the chunk lengths on the host once per ``cu_seqlens`` tensor: it is read back at its first use
in a tower forward and kept, with the index tensors built from it, until the tower's forward ends (a forward
pre-hook and an always-called forward hook on the tower clear it). The tower passes one tensor to all its
full-attention blocks and one to all its windowed blocks, so a forward reads back once (Qwen2-VL) or twice
(Qwen2.5-VL: the windows' and the frames'), instead of once per block. Flash attention already runs the chunks as
one variable-length call; a patched module whose implementation is changed to anything but sdpa / eager after
patching (``set_attn_implementation``) runs the stock forward.

The modules are found by the table :data:`VISION_ATTENTION_FAMILIES`, keyed by ``config.model_type`` like the
pruning adapters (:mod:`visattn.tokenprune.adapters`); transformers itself is never imported here.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from visattn.caching import may_cache
from visattn.tokenprune.hf_contract import TransformersContractError, check_version, transformers_version

#: attention implementations the batched forward serves (flash attention is already one varlen call)
BATCHED_IMPLEMENTATIONS = ("sdpa", "eager")
#: the stock forward's leading arguments the batched forward takes over
_FORWARD_ARGS = ("hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen")
#: the names the batched forward calls from the attention class's own module
_MODULE_NAMES = ("apply_rotary_pos_emb_vision", "eager_attention_forward", "ALL_ATTENTION_FUNCTIONS")
_MARK = "_visattn_chunk_cache"
_HOOKS = "_visattn_vision_attention_hooks"


@dataclass(frozen=True)
class VisionFamily:
    """Where one model family's vision attention lives in transformers.

    Attributes:
        tower: class name of the vision tower (its forward hooks bound the chunk-grouping cache).
        attention: class name of the vision attention module whose ``forward`` is rebound.
        module: the transformers module that defines both classes.
    """

    tower: str
    attention: str
    module: str

    def is_tower(self, module: nn.Module) -> bool:
        return type(module).__name__ == self.tower and type(module).__module__ == self.module

    def is_attention(self, module: nn.Module) -> bool:
        return type(module).__name__ == self.attention and type(module).__module__ == self.module


#: HF ``config.model_type`` -> the family's vision tower and attention classes
VISION_ATTENTION_FAMILIES: dict[str, VisionFamily] = {
    "qwen2_vl": VisionFamily("Qwen2VisionTransformerPretrainedModel", "VisionAttention",
                             "transformers.models.qwen2_vl.modeling_qwen2_vl"),
    "qwen2_5_vl": VisionFamily("Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLVisionAttention",
                               "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"),
}
#: the vision towers' own config model types (a tower passed alone) -> their family's key
TOWER_MODEL_TYPES = {"qwen2_vl_vision": "qwen2_vl", "qwen2_5_vl_vision": "qwen2_5_vl"}


@dataclass(frozen=True)
class VisionAttentionReport:
    """What :func:`patch_vision_attention` did.

    Attributes:
        model: the model's class name.
        model_type: its family key in :data:`VISION_ATTENTION_FAMILIES`.
        attn_implementation: the vision tower's attention implementation ("sdpa" or "eager").
        towers: vision towers found.
        patched: vision attention modules now running batched (all of the towers').
    """

    model: str
    model_type: str
    attn_implementation: str
    towers: int
    patched: int

    def __str__(self) -> str:
        return (f"{self.model} ({self.model_type}, {self.attn_implementation}): {self.patched} vision attention "
                f"modules batched by chunk length in {self.towers} tower(s)")


@dataclass(frozen=True)
class ChunkGroups:
    """The chunks of one ``cu_seqlens`` grouped by length.

    Attributes:
        runs: per distinct length, in order of first appearance: (length, number of chunks, first row of the group
            in the grouped order).
        order: token rows in grouped order (a chunk's rows stay consecutive), or None when that is the stock order.
        inverse: the permutation back to the stock order (None with ``order``).
    """

    runs: tuple[tuple[int, int, int], ...]
    order: torch.Tensor | None
    inverse: torch.Tensor | None


def group_chunks(cu_seqlens: torch.Tensor, seq_len: int, device: torch.device | None = None) -> ChunkGroups:
    """Group the chunks that ``cu_seqlens`` (cumulative boundaries, ``(chunks + 1,)``) cuts a sequence of
    ``seq_len`` rows into by their length; chunks of length 0 are dropped. One host readback of ``cu_seqlens``.

    Raises:
        ValueError: ``cu_seqlens`` is not 1-D, decreases, or does not span ``seq_len`` rows (naming it).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor of chunk boundaries, got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(b) for b in cu_seqlens.tolist()]  # the one host readback
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    if any(n < 0 for n in lengths) or bounds[-1] - bounds[0] != seq_len:
        raise ValueError(f"cu_seqlens: boundaries {bounds[:4]}...{bounds[-2:]} do not cut {seq_len} rows into "
                         "chunks (non-decreasing, spanning them all)")
    starts: dict[int, list[int]] = {}
    for first, n in zip(bounds, lengths, strict=False):
        if n:
            starts.setdefault(n, []).append(first - bounds[0])
    runs, row, identity = [], 0, True
    for n, firsts in starts.items():
        runs.append((n, len(firsts), row))
        for first in firsts:
            identity &= first == row
            row += n
    if identity:
        return ChunkGroups(tuple(runs), None, None)
    with torch.inference_mode(False):  # kept across calls: never an inference tensor (visattn.caching's rule)
        order = torch.cat([(torch.tensor(firsts)[:, None] + torch.arange(n)).flatten() for n, firsts in
                           starts.items()])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(seq_len)
        return ChunkGroups(tuple(runs), order.to(device), inverse.to(device))


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class ChunkCache:
    """The :class:`ChunkGroups` of the ``cu_seqlens`` tensors one tower forward uses, keyed by the tensor itself
    (held, so its identity cannot pass to another tensor; its version counter guards in-place edits). Cleared by
    the tower's forward hooks; bounded for calls outside a tower forward."""

    LIMIT = 8

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, int | None, int, torch.device, ChunkGroups]] = []

    def clear(self, *_hook_args) -> None:
        """Forget every grouping (the tower's forward pre-hook and forward hook)."""
        self.entries.clear()

    def groups(self, cu_seqlens: torch.Tensor, seq_len: int, device: torch.device) -> ChunkGroups:
        if not may_cache(cu_seqlens):  # tracing or fake tensors: nothing kept
            return group_chunks(cu_seqlens, seq_len, device)
        version = _version(cu_seqlens)
        for tensor, ver, rows, dev, found in self.entries:
            if tensor is cu_seqlens and ver == version and rows == seq_len and dev == device:
                return found
        found = group_chunks(cu_seqlens, seq_len, device)
        if len(self.entries) >= self.LIMIT:
            self.entries.pop(0)
        self.entries.append((cu_seqlens, version, seq_len, device, found))
        return found


def _batched_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """The stock vision attention with one attention call per distinct chunk length (module docstring)."""
    impl = self.config._attn_implementation
    seq_len = hidden_states.shape[0]
    if impl not in BATCHED_IMPLEMENTATIONS or position_embeddings is None or seq_len == 0:
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    space = sys.modules[type(self).__module__].__dict__
    groups = getattr(self, _MARK).groups(cu_seqlens, seq_len, hidden_states.device)
    # the stock projections and rotary embedding, (seq, heads, head_dim) each
    q, k, v = self.qkv(hidden_states).reshape(seq_len, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = space["apply_rotary_pos_emb_vision"](q, k, cos, sin)
    if groups.order is not None:
        q, k, v = (t.index_select(0, groups.order) for t in (q, k, v))
    attention = space["ALL_ATTENTION_FUNCTIONS"].get_interface(impl, space["eager_attention_forward"])
    dropout = 0.0 if not self.training else self.attention_dropout
    outs = []
    for length, count, first in groups.runs:
        rows = length * count
        qg, kg, vg = (t.narrow(0, first, rows).unflatten(0, (count, length)).transpose(1, 2) for t in (q, k, v))
        out = attention(self, qg, kg, vg, attention_mask=None, scaling=self.scaling, dropout=dropout,
                        is_causal=False, **kwargs)[0]  # (count, length, heads, head_dim)
        outs.append(out.reshape(rows, -1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    if groups.inverse is not None:
        out = out.index_select(0, groups.inverse)
    return self.proj(out.contiguous())


def _refuse(what: str) -> TransformersContractError:
    return TransformersContractError(f"patch_vision_attention: transformers {transformers_version()}: {what}")


def _check_contract(attention: nn.Module) -> None:
    """The stock forward's arguments, the module's layers and the names the batched forward calls."""
    cls = type(attention)
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    names = tuple(p.name for p in params[: len(_FORWARD_ARGS)])
    if names != _FORWARD_ARGS or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise _refuse(f"{cls.__name__}.forward takes {[p.name for p in params]}, not {list(_FORWARD_ARGS)} + "
                      "**kwargs")
    missing = [n for n in ("qkv", "proj", "num_heads", "scaling", "attention_dropout", "config")
               if not hasattr(attention, n)]
    if missing or not isinstance(attention.qkv, nn.Linear):
        raise _refuse(f"{cls.__name__} lacks {missing or ['a Linear qkv']}")
    space = sys.modules[cls.__module__].__dict__
    absent = [n for n in _MODULE_NAMES if n not in space]
    if absent or not callable(getattr(space.get("ALL_ATTENTION_FUNCTIONS"), "get_interface", None)):
        raise _refuse(f"{cls.__module__} has no {absent or ['ALL_ATTENTION_FUNCTIONS.get_interface']}")


def _family(model: nn.Module) -> tuple[str, VisionFamily]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    key = TOWER_MODEL_TYPES.get(model_type, model_type)
    if key not in VISION_ATTENTION_FAMILIES:
        raise ValueError(f"model: {type(model).__name__} (model_type={model_type!r}) has no batched vision attention; "
                         f"supported model types: {', '.join(VISION_ATTENTION_FAMILIES)}")
    return key, VISION_ATTENTION_FAMILIES[key]


def patch_vision_attention(model: nn.Module) -> VisionAttentionReport:
    """Run the vision attention of a Hugging Face Qwen2-VL / Qwen2.5-VL model as one batched call per distinct
    chunk length (module docstring). In place and idempotent; :func:`unpatch_vision_attention` restores it.

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (or its ``model``,
            or the vision tower alone) with ``attn_implementation`` "sdpa" or "eager" in its vision tower.

    Returns:
        A :class:`VisionAttentionReport`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model``'s ``config.model_type`` is not in :data:`VISION_ATTENTION_FAMILIES`, its vision
            tower's ``attn_implementation`` is not sdpa / eager, or it holds no vision tower.
        TransformersContractError: the attention module or its transformers module does not look like what this
            was written for (naming the version); also a transformers release outside the tested range (see
            :mod:`visattn.tokenprune.hf_contract`). Nothing is changed when it raises.
    """
    key, family = _family(model)
    towers = [m for m in model.modules() if family.is_tower(m)]
    found = [(tower, [m for m in tower.modules() if family.is_attention(m)]) for tower in towers]
    if not any(attns for _, attns in found):
        raise ValueError(f"model: {type(model).__name__} holds no {family.tower} with {family.attention} modules")
    impls = {tower.config._attn_implementation for tower in towers}
    bad = sorted(str(i) for i in impls - set(BATCHED_IMPLEMENTATIONS))
    if bad:
        raise ValueError(f"model: the vision tower's attn_implementation={bad[0]!r} is not batched here (only "
                         f"{' / '.join(BATCHED_IMPLEMENTATIONS)}; flash attention already runs all chunks as one "
                         "variable-length call)")
    check_version()
    for _, attns in found:
        for attn in attns[:1]:
            _check_contract(attn)
    for tower, attns in found:
        if not getattr(tower, _HOOKS, None):
            cache = ChunkCache()
            setattr(tower, _HOOKS, (tower.register_forward_pre_hook(cache.clear),
                                    tower.register_forward_hook(cache.clear, always_call=True), cache))
        cache = getattr(tower, _HOOKS)[2]
        for attn in attns:
            if "forward" not in attn.__dict__:
                attn.forward = types.MethodType(_batched_forward, attn)
            setattr(attn, _MARK, cache)
    return VisionAttentionReport(type(model).__name__, key, "/".join(sorted(impls)), len(towers),
                                 sum(len(attns) for _, attns in found))


def is_vision_attention_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a vision attention module) runs the batched forward."""
    return hasattr(module, _MARK) and "forward" in module.__dict__


def unpatch_vision_attention(model: nn.Module) -> nn.Module:
    """Restore the stock vision attention on every module :func:`patch_vision_attention` patched; returns
    ``model`` (TypeError naming ``model`` when it is not an ``nn.Module``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if hasattr(module, _MARK):
            if "forward" in module.__dict__:
                del module.forward
            delattr(module, _MARK)
        hooks = module.__dict__.get(_HOOKS)
        if hooks:
            hooks[0].remove()
            hooks[1].remove()
            delattr(module, _HOOKS)
    return model


__all__ = [
    "VISION_ATTENTION_FAMILIES",
    "ChunkGroups",
    "VisionAttentionReport",
    "group_chunks",
    "is_vision_attention_patched",
    "patch_vision_attention",
    "unpatch_vision_attention",
]
