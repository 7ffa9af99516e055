"""DyMU's dynamic token merging (Wang et al., 2025, "DyMU: Dynamic Merging and Virtual Unmerging for Efficient
VLMs", arXiv 2504.17040; official code MikeWangWZHL/dymu, ``src/open_clip/tome.py``): ToMe in the vision tower
with a per-layer similarity **threshold** instead of a fixed ``r``, so each image keeps as many tokens as its
content needs.

In every layer ``l`` with a threshold ``t_l`` (ToMe's matching otherwise: keys averaged over heads as the metric,
A = even tokens, B = odd tokens, [CLS] never merged): every A token whose best cosine similarity to a B token is
**above** ``t_l`` merges into that partner (size-weighted average, proportional attention with ``log(size)``), at
most half of the image's mergeable tokens (the most similar first), as the official instance-level inference
path (``bipartite_soft_matching(..., specified_threshold=t_l)``). The images of a batch end with different token
counts: rows are padded to the longest, the padding is masked out of the attention keys and of the matching, and
``last_report(model).extra["valid"]`` marks each row's real tokens (``visual_tokens_kept`` counts them).

The thresholds come from the official **threshold finding** (DToMe): ToMe with a fixed ``r_l`` run over a large
image set with the merge chosen batch-wide (the ``r_l · B`` most similar pairs of the whole batch), each batch's
``t_l`` being the similarity of the best pair left unmerged (clamped at 0), averaged over batches.
:func:`find_thresholds` runs that search over the images you give it; its result is the ``thresholds`` argument
(the official checkpoints ship theirs).

``unmerge="virtual"`` adds DyMU's virtual token unmerging (VTU) in the language model (LLaVA-1.5): the language
model keeps the merged tokens, and every attention runs as over the full sequence (the merge map expands q / k /
v, RoPE at the full positions, causal attention, re-merged output: :mod:`visattn.tokenprune.vtu`,
:mod:`visattn.tokenprune.hf_vtu`; docs/TOKENPRUNE.md, "DyMU").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import TokenPruner
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.tome import ThresholdMatching, ToMe, batch_matching, threshold_matching
from visattn.tokenprune.vtu import FORMS, Store


def _check_thresholds(value: object) -> list[float | None]:
    def ok(v: object) -> bool:
        return v is None or (not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v)))

    if isinstance(value, (list, tuple)) and len(value) > 0 and all(ok(v) for v in value):
        return [None if v is None else float(v) for v in value]
    raise ValueError(f"thresholds={value!r}: expected a non-empty list of finite floats (one per vision layer; "
                     "None = no merging in that layer)")


@register_method("dymu", "dtome")
class DyMU(TokenPruner):
    """DyMU's dynamic token merging (module docstring): in vision layer ``i`` merge every pair whose cosine
    similarity exceeds ``thresholds[i]`` (``None``: no merging; a list shorter than the tower is padded with
    ``None``). ``trace_source`` / ``prop_attn`` as :class:`~visattn.tokenprune.tome.ToMe`. ``unmerge``:
    ``"none"`` (the language model sees the merged tokens as a shorter sequence, positions re-indexed) or
    ``"virtual"`` (VTU: the language model attends as over the full unmerged sequence; LLaVA-1.5 only).
    ``vtu_form``: VTU's attention arithmetic, ``"exact"`` (expand q / k / v, fused attention, re-merge) or
    ``"rope_linear"`` (the paper's cos / sin form on the merged tokens; same result, more memory)."""

    name = "dymu"
    capabilities = Capabilities(stage="vision", output="merged", tower_merge=True, dynamic_merge=True,
                                standalone_tower=True)
    positions = "reindex"

    def __init__(self, thresholds: Sequence[float | None], trace_source: bool = False, prop_attn: bool = True,
                 unmerge: str = "none", vtu_form: str = "exact"):
        self.thresholds = _check_thresholds(thresholds)
        if unmerge not in ("none", "virtual"):
            raise ValueError(f"unmerge={unmerge!r}: expected 'none' or 'virtual'")
        if vtu_form not in FORMS:
            raise ValueError(f"vtu_form={vtu_form!r}: expected one of {tuple(FORMS)}")
        self.unmerge, self.vtu_form = unmerge, vtu_form
        if unmerge == "virtual":
            self.capabilities = dataclasses.replace(type(self).capabilities, virtual_unmerge=True,
                                                    standalone_tower=False, positions=("original",))
            self.positions = "original"
        for nm, v in (("trace_source", trace_source), ("prop_attn", prop_attn)):
            if not isinstance(v, bool):
                raise ValueError(f"{nm}={v!r}: expected a bool")
        self.trace_source, self.prop_attn = trace_source, prop_attn

    def virtual_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                          ok: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, scaling: float,
                          store: Store | None = None) -> torch.Tensor:
        """VTU's attention of ``vtu_form`` (:func:`visattn.tokenprune.vtu.virtual_attention` documents the
        arguments); called by the adapter in every decoder layer of a prefill with ``unmerge="virtual"``."""
        return FORMS[self.vtu_form](q, k, v, index, ok, cos, sin, scaling, store)

    @classmethod
    def from_keep(cls, keep: Any, **kwargs: Any) -> DyMU:
        """Refused: DyMU's token count follows its thresholds and each image (ValueError naming ``keep``)."""
        raise ValueError(f"keep={keep!r}: DyMU has no fixed budget; each image's token count follows the per-layer "
                         "thresholds (create('dymu', thresholds=[...]))")

    def layer_thresholds(self, num_layers: int) -> list[float | None]:
        """The threshold of each of ``num_layers`` vision layers (None: no merging there)."""
        if len(self.thresholds) > num_layers:
            raise ValueError(f"thresholds={self.thresholds!r}: {len(self.thresholds)} values for a tower with "
                             f"{num_layers} layers")
        return self.thresholds + [None] * (num_layers - len(self.thresholds))

    def schedule(self, num_layers: int) -> list[int]:
        """No fixed ``r`` in any layer (the thresholds decide; see :meth:`layer_thresholds`)."""
        return [0] * num_layers

    def match(self, layer: int, metric: torch.Tensor, valid: torch.Tensor,
              threshold: float) -> ThresholdMatching | None:
        """The merge of one layer: every row's A tokens above ``threshold`` (:func:`~visattn.tokenprune.tome.
        threshold_matching`; ``metric`` (B, N, D), ``valid`` (B, N))."""
        return threshold_matching(metric, valid, threshold, protect_first=True)


class _ThresholdFinding(DyMU):
    """DToMe's threshold finding as a tower pruner: ToMe with a fixed ``r`` per layer, merged batch-wide
    (:func:`~visattn.tokenprune.tome.batch_matching`), recording every batch's threshold per layer."""

    name = "dymu-threshold-finding"

    def __init__(self, r: int | Sequence[int]):
        super().__init__([None])
        self.r = ToMe(r=r).r
        self.found: list[list[float]] = []

    def layer_thresholds(self, num_layers: int) -> list[float | None]:
        rs = ToMe(r=self.r).schedule(num_layers)
        self.found = [[] for _ in rs]
        return [0.0 if r > 0 else None for r in rs]  # placeholders: the layers that merge

    def match(self, layer, metric, valid, threshold):
        r = ToMe(r=self.r).schedule(len(self.found))[layer]
        m, found = batch_matching(metric, valid, r, protect_first=True)
        if found is not None:
            self.found[layer].append(found)
        return m


def find_thresholds(tower: torch.nn.Module, batches: Iterable[torch.Tensor],
                    r: int | Sequence[int]) -> list[float | None]:
    """DyMU's threshold finding (DToMe): run ``tower`` (an HF ``CLIPVisionModel`` or an open_clip vision tower,
    e.g. ``llava.model.vision_tower``) on every image batch of ``batches`` (pixel tensors, called as
    ``tower(pixels)``) with ToMe's ``r`` per layer (an int, or a per-layer list as :class:`ToMe` takes it) merged
    batch-wide — the ``r · B`` most similar pairs of the batch — and return each layer's threshold averaged over
    the batches (the official running average; ``None`` for a layer that never merges), ready for
    ``DyMU(thresholds=...)``. The tower is left as it was."""
    from visattn.tokenprune.api import apply, remove

    finder = _ThresholdFinding(r)
    apply(tower, finder)
    try:
        with torch.no_grad():
            for pixels in batches:
                tower(pixels)
    finally:
        remove(tower)
    return [sum(v) / len(v) if v else None for v in finder.found]
