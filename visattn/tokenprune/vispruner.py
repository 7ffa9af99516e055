"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs"; official code Theia-4869/VisPruner, LLaVA): visual cues only, in the vision tower.

Of the ``T = resolve(keep, N)`` tokens an image keeps, ``T_imp = int(T · important_ratio)`` are **important**:
the patches with the largest [CLS] attention of vision layer ``layer`` (heads averaged; the official
``attentions[select_layer]``, -2 for LLaVA), and ``T_div = T - T_imp`` are **diverse**, found among the remaining
patches (kept in descending attention order) by iterative similarity-based removal on the cosine similarity of
the projector-input features: while the residual set ``R`` is larger than ``T_div``, remove
``r = min(8, |R| - T_div)`` tokens — split ``R`` into ``a`` (even positions) and ``b`` (odd positions), score each
``a`` token by its largest similarity to a ``b`` token, drop the ``r`` highest-scoring ``a`` tokens; the
surviving ``a`` tokens (in descending-score order) followed by all ``b`` tokens form the next ``R``. The kept
patches go to the projector in spatial order (positions re-indexed).

The official code's indexing needs an even ``|R|`` and ``r ≤ |a|`` at every step (true for LLaVA's 576 patches at
the paper's budgets); elsewhere it raises. Here the same rule continues: ``a`` takes the extra token of an odd
``R`` and at most ``|a|`` tokens go per step. Sorting is stable (ties to the lower index; the official
``argsort`` leaves ties unspecified).
"""

from __future__ import annotations

import numbers

import torch

from visattn.tokenprune import kernels
from visattn.tokenprune.budget import Budget, check_budget
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import FasterVLM, _check_index
from visattn.tokenprune.registry import register_method

#: most tokens one removal step drops (the official code's constant)
REMOVE_PER_STEP = 8


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """VisPruner's diverse tokens: shrink ``residual`` (N, R) indices into ``features`` (N, P, C) to ``target``
    by iterative matching and removal (module docstring); returns (N, target) indices (not sorted).

    The cosine similarities of the residual tokens are one batched matmul up front; every step reads them. On
    CUDA the whole removal loop is then one Triton launch (:mod:`visattn.tokenprune.kernels.dedup`, identical
    indices) instead of ~6 launches per step."""
    if target <= 0:
        return residual[:, :0]
    f = features.gather(1, residual[..., None].expand(-1, -1, features.shape[-1])).float()
    f = f / f.norm(dim=-1, keepdim=True)
    sim = f @ f.transpose(1, 2)  # (N, R, R): sim[n, x, y] = cos(residual x, residual y)
    if kernels.runs("tokenprune.dedup", lambda: kernels.dedup_why_not(sim)):
        return residual.gather(1, kernels.dedup_positions(sim, target, REMOVE_PER_STEP))
    positions = torch.arange(residual.shape[1], device=residual.device).expand_as(residual)
    while True:
        size = positions.shape[1]
        r = min(REMOVE_PER_STEP, size - target, (size + 1) // 2)
        if r <= 0:
            break
        a, b = positions[:, ::2], positions[:, 1::2]
        rows = sim.gather(1, a[..., None].expand(-1, -1, sim.shape[-1]))
        score = rows.gather(2, b[:, None, :].expand(-1, a.shape[1], -1)).amax(-1)
        distinct = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, r:]
        positions = torch.cat([a.gather(1, distinct), b], 1)
    return residual.gather(1, positions)


@register_method("vispruner", "vis-pruner")
class VisPruner(FasterVLM):
    """VisPruner: ``keep`` patches per image, ``important_ratio`` of them by [CLS] attention of vision layer
    ``layer`` (heads averaged), the rest diverse by iterative similarity-based removal (module docstring)."""

    name = "vispruner"
    capabilities = Capabilities(stage="vision", cls_attention=True, output="merged")

    def __init__(self, keep: Budget = 0.25, important_ratio: float = 0.5, layer: int = -2):
        self.keep = check_budget(keep, "keep")
        if isinstance(important_ratio, bool) or not isinstance(important_ratio, numbers.Real) \
                or not 0.0 <= float(important_ratio) <= 1.0:
            raise ValueError(f"important_ratio={important_ratio!r}: expected a float in [0, 1]")
        self.important_ratio = float(important_ratio)
        self.layer = _check_index(layer, "layer")

    def reduce(self, patches, cls_hidden, captures):
        t = self.output_count(patches.shape[1])
        t_imp = int(t * self.important_ratio)
        order = torch.sort(self.patch_scores(captures), dim=-1, descending=True, stable=True).indices
        diverse = remove_duplicates(patches, order[:, t_imp:], t - t_imp)
        idx = torch.cat([order[:, :t_imp], diverse], 1).sort(-1).values
        return patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1])), idx, {"important": t_imp}
