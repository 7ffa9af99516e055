"""DyMU's virtual token unmerging on a Hugging Face Llama-family language model (``capabilities.virtual_unmerge``).

The adapter of the model family (LLaVA-1.5: :class:`~visattn.tokenprune.hf_llava.ToMeLlavaAdapter`) feeds the
language model the merged tokens, as without VTU, and builds the **merge map** of the prefill (:func:`merge_map`):
for every position of the full, unmerged language-model input (each image's placeholder span = its original
patches, raster order) the column of the merged sequence that stands for it. During that prefill every decoder
layer's ``self_attn.forward`` is replaced (an instance attribute, removed by :func:`uninstall`) by the VTU
attention the method names (``pruner.virtual_attention``: :mod:`visattn.tokenprune.vtu`, the exact form or the
RoPE-linear one): q / k / v projected on the merged tokens, attention as over the full sequence expanded by the
map with RoPE at the full positions, output averaged back per merged token, then ``o_proj``. Norms and MLPs see
only the merged tokens.

KV cache: the prefill stores the **expanded** keys (rotated at the full positions) and values, one entry per full
position — the cache a stock prefill of the unmerged sequence would hold in shape — so ``get_seq_length`` is the
full length, and decode steps run the stock attention with the stock masks and positions (the generated tokens
continue after the full prompt); the attention substitution is idle outside the prefill.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from visattn.tokenprune.hf_contract import CACHE_ARGUMENTS, _fail
from visattn.tokenprune.layout import TokenLayout
from visattn.tokenprune.state import Spans


@dataclass
class VirtualPrefill:
    """The merge map of one prefill and the full sequence's RoPE tables."""

    index: torch.Tensor  # (B, Lf) long: merged column standing for each full position
    ok: torch.Tensor | None  # (B, Lf) bool: real full positions (padding False); None: no padding
    cos: torch.Tensor  # (B, Lf, d)
    sin: torch.Tensor  # (B, Lf, d)


def check_attention_layers(layers) -> None:
    """The decoder layers must have a Llama-style ``self_attn`` (q/k/v/o projections, ``head_dim``, ``scaling``,
    ``layer_idx``) without a sliding window (the substitute attends over the whole sequence)."""
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        needs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
        if attn is None or any(not hasattr(attn, n) for n in needs):
            raise _fail(f"{type(layer).__name__} lacks a Llama-style self_attn ({', '.join(needs)}), which DyMU's "
                        "virtual unmerging replaces")
        if getattr(attn, "sliding_window", None) is not None or getattr(layer, "sliding_window", None) is not None:
            raise ValueError(f"model: {type(attn).__name__} uses a sliding window; DyMU's virtual unmerging "
                             "supports full causal attention only (unmerge='virtual')")


def install(layers, state, attend) -> list[torch.nn.Module]:
    """Replace every layer's ``self_attn.forward``; ``state()`` returns the current :class:`VirtualPrefill` or
    None (then the stock forward runs); ``attend(q, k, v, index, ok, cos, sin, scaling, store)`` is the VTU
    attention (:func:`visattn.tokenprune.vtu.virtual_attention`'s signature). Returns the patched modules for
    :func:`uninstall`."""
    patched = []
    for layer in layers:
        attn = layer.self_attn
        attn.forward = types.MethodType(_forward(state, attend, type(attn).forward), attn)
        patched.append(attn)
    return patched


def uninstall(patched: list[torch.nn.Module]) -> None:
    """Restore the stock attention forwards :func:`install` replaced."""
    for attn in patched:
        if "forward" in attn.__dict__:
            del attn.forward
    patched.clear()


def _forward(state, attend, orig):
    def forward(self, hidden_states, *args, **kwargs):
        vp = state()
        if vp is None:
            return orig(self, hidden_states, *args, **kwargs)
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cache = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        store = None if cache is None else (lambda kf, vf: cache.update(kf, vf, self.layer_idx))
        out = attend(q, k, v, vp.index, vp.ok, vp.cos.to(q.dtype), vp.sin.to(q.dtype), self.scaling,
                                store)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None

    return forward


def merge_map(full: TokenLayout, merged: TokenLayout, spans: Spans, groups: torch.Tensor | None) -> torch.Tensor:
    """(B, Lf) merged column of every full position. ``full``: the layout of the unmerged input (placeholder spans
    of ``spans``, one slot per original patch); ``merged``: the layout the language model receives (its ``orig``
    names each column's full position); ``groups`` (images, patches): the merged slot (0-based, within its image's
    span) holding each patch, images in batch order; None: nothing merged (the identity map). A full position of
    padding maps to column 0 (its ``ok`` is False)."""
    bsz, lf = full.valid.shape
    device = full.valid.device
    src = torch.arange(lf, device=device).expand(bsz, lf).clone()
    if groups is not None:
        j = 0
        for r, row in enumerate(spans):
            for s, e in row:
                if groups.shape[1] != e - s:
                    raise ValueError(f"groups: {groups.shape[1]} patches for an image span of {e - s} tokens")
                src[r, s:e] = s + groups[j].to(device)
                j += 1
    lm = merged.valid.shape[1]
    target = torch.where(merged.valid, merged.orig, lf)
    cols = torch.arange(lm, device=device).expand(bsz, lm)
    inverse = torch.zeros(bsz, lf + 1, dtype=torch.long, device=device).scatter_(1, target, cols)[:, :lf]
    return inverse.gather(1, src)
