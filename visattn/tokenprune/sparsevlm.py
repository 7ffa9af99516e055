"""SparseVLM (Zhang et al., ICML 2025), v1.5 of the official code (Gumpest/SparseVLMs, branch ``v1.5``).

* **Raters** (once, on the LLM input embeddings): relevance of text token ``t`` = mean over the sample's visual
  tokens ``v`` of ``softmax_t(v · t)`` (softmax over the text tokens after the first image); raters are the text
  tokens whose relevance exceeds the mean relevance.
* **Scores** at each pruning layer ``l``: attention of layer ``l`` (heads averaged, full causal row softmax)
  from the raters to the image's current visual tokens, averaged over raters.
* **Selection**: keep the top ``min(count_l, n - 1)`` of the image's ``n`` current visual tokens; the rest are
  dropped from layer ``l + 1`` on (the layer's output is pruned, as the official code does).
* **Recycling**: of the deleted tokens, the top ``int(0.3 m) + 1`` by score are clustered with DPC-KNN
  (``int(n'/10) + 1`` centres) on their hidden states (the output of layer ``l``) and each cluster's mean is
  kept as a recycled token, placed right after the image's kept tokens (centre order: descending DPC score).
  Recycled tokens are visual tokens of the image from then on (scored and prunable at later layers).
* Positions are re-indexed (the official code truncates ``position_ids``).
"""

from __future__ import annotations

import torch

from visattn.tokenprune.budget import Budget, check_budget, check_increasing, resolve_budget
from visattn.tokenprune.methods import LLMPruner, LLMStage

#: official v1.5 schedule: pruning layers and visual tokens kept (of 576) for 192 / 128 / 64 retained tokens
OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
OFFICIAL_DEPTH = 32


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-KNN clustering of ``x`` (M, C) into ``clusters`` groups; returns the group means (clusters, C).

    Density from the ``clusters`` nearest distances (self included), parent distance to the nearest denser
    token (the maximum distance for the densest), centres = top ``clusters`` of density x parent distance, every
    token joins its nearest centre, a centre joins itself. Ties are broken by index (the official code adds
    1e-6 uniform noise to the density instead). Means divide by ``count + 1e-6`` as the official code.
    """
    m, c = x.shape
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / c**0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    parent = torch.where(denser, dist, dist.max()).min(-1).values
    centres = (parent * density).topk(clusters).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = torch.zeros(clusters, c, dtype=torch.float32, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=clusters).float()[:, None] + 1e-6
    return (sums / counts).to(x.dtype)


class SparseVLM(LLMPruner):
    """SparseVLM v1.5: text-rater attention at ``layers`` (official 2, 6, 15), per-layer ``counts``, recycling.

    ``keep`` 64 / 128 / 192 selects the official counts; another int ``k`` scales the 64-token schedule by
    ``k / 64`` (not from the paper); a float ``r`` uses ratios ``r * (66, 30, 17) / 64`` of the image's tokens.
    ``counts`` (ints, or float ratios of the image's original tokens) overrides ``keep``. ``layers=None`` uses
    the official layers on a 32-layer LLM and scales them to other depths at apply time.
    """

    name = "sparsevlm"
    positions = "reindex"

    def __init__(
        self,
        keep: Budget = 64,
        layers: tuple[int, ...] | list[int] | None = None,
        counts: tuple[Budget, ...] | list[Budget] | None = None,
        recycle: bool = True,
    ):
        self.keep = check_budget(keep, "keep")
        if counts is None:
            if isinstance(self.keep, float):
                counts = [self.keep * n / 64 for n in OFFICIAL_COUNTS[64]]
            elif self.keep in OFFICIAL_COUNTS:
                counts = list(OFFICIAL_COUNTS[self.keep])
            else:
                counts = [max(1, round(self.keep * n / 64)) for n in OFFICIAL_COUNTS[64]]
        counts = [check_budget(min(v, 1.0) if isinstance(v, float) else v, "counts") for v in counts]
        self.layers = None if layers is None else check_increasing(list(layers), "layers")
        n_layers = len(OFFICIAL_LAYERS) if layers is None else len(self.layers)
        if len(counts) != n_layers:
            raise ValueError(f"counts={counts!r}: expected {n_layers} values (one per pruning layer)")
        self.counts = counts
        if not isinstance(recycle, bool):
            raise ValueError(f"recycle={recycle!r}: expected a bool")
        self.recycle = recycle
        self._depth: int | None = None

    # ------------------------------------------------------------------------------------------ schedule
    def bind(self, num_layers: int) -> None:
        """Resolve the default layers for an LLM of ``num_layers`` layers (raises ``ValueError`` if impossible)."""
        self._depth = num_layers
        layers = self.resolved_layers()
        if layers[-1] + 1 >= num_layers:
            raise ValueError(f"layers={layers}: the language model has {num_layers} layers (need layer + 1 < "
                             f"{num_layers})")

    def resolved_layers(self) -> list[int]:
        if self.layers is not None:
            return self.layers
        depth = self._depth or OFFICIAL_DEPTH
        if depth == OFFICIAL_DEPTH:
            return list(OFFICIAL_LAYERS)
        out: list[int] = []
        for layer in OFFICIAL_LAYERS:
            v = min(max(round(layer * depth / OFFICIAL_DEPTH), out[-1] + 1 if out else 0), depth - 2)
            if not out or v > out[-1]:
                out.append(v)
        return out

    def stages(self) -> list[LLMStage]:
        layers = self.resolved_layers()
        return [LLMStage(layer + 1, count, layer) for layer, count in zip(layers, self.counts)]

    # ------------------------------------------------------------------------------------------ scoring
    @staticmethod
    def raters(embeds: torch.Tensor, valid: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Rater mask (B, L): text tokens after the first image whose relevance exceeds the mean."""
        out = torch.zeros_like(valid)
        ar = torch.arange(valid.shape[1], device=valid.device)
        for b in range(valid.shape[0]):
            vis = (image[b] >= 0) & valid[b]
            if not bool(vis.any()):
                continue
            first = int(vis.nonzero()[0])
            text = valid[b] & (image[b] < 0) & (ar > first)
            if not bool(text.any()):
                continue
            rel = (embeds[b, vis].float() @ embeds[b, text].float().T).softmax(-1).mean(0)
            idx = text.nonzero()[:, 0]
            out[b, idx[rel > rel.mean()]] = True
        return out

    def select(self, stage_index: int, scores: torch.Tensor, num_original: int) -> torch.Tensor:
        n = scores.shape[-1]
        k = resolve_budget(self.counts[stage_index], num_original)
        k = max(1, min(k, n - 1))
        return scores.topk(k, dim=-1).indices.sort(dim=-1).values

    def recycled(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Recycled tokens (c, C) from the deleted tokens' hidden states (m, C) and scores (m,)."""
        m = hidden.shape[0]
        if not self.recycle or m == 0:
            return hidden[:0]
        top = scores.topk(int(m * 0.3) + 1).indices
        return dpc_knn_merge(hidden[top], int((int(m * 0.3) + 1) / 10) + 1)


def _register() -> None:
    from visattn.tokenprune.api import register

    register("sparsevlm", SparseVLM, "sparse-vlm")


_register()
