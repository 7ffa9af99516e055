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
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import LLMPruner, LLMStage
from visattn.tokenprune.registry import register_method

#: official v1.5 schedule: pruning layers and visual tokens kept (of 576) for 192 / 128 / 64 retained tokens
OFFICIAL_LAYERS = (2, 6, 15)
OFFICIAL_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
OFFICIAL_DEPTH = 32


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-KNN clustering of ``x`` (M, C) or a batch (G, M, C) into ``clusters`` groups; returns the group means
    (clusters, C) or (G, clusters, C). Every batch item is clustered on its own (no host sync).

    Density from the ``clusters`` nearest distances (self included), parent distance to the nearest denser
    token (the maximum distance for the densest), centres = top ``clusters`` of density x parent distance, every
    token joins its nearest centre, a centre joins itself. Ties are broken by index (the official code adds
    1e-6 uniform noise to the density instead). Means divide by ``count + 1e-6`` as the official code.
    """
    single = x.dim() == 2
    xb = x[None] if single else x
    g, m, c = xb.shape
    xf = xb.float()
    dist = torch.cdist(xf, xf) / c**0.5
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = density[:, None, :] > density[:, :, None]
    parent = torch.where(denser, dist, dist.amax((1, 2), keepdim=True)).min(-1).values
    centres = (parent * density).topk(clusters, dim=-1).indices
    assign = dist.gather(1, centres[..., None].expand(-1, -1, m)).argmin(1)
    assign.scatter_(1, centres, torch.arange(clusters, device=x.device).expand(g, -1))
    sums = xf.new_zeros(g, clusters, c).scatter_add_(1, assign[..., None].expand(-1, -1, c), xf)
    counts = xf.new_zeros(g, clusters).scatter_add_(1, assign, xf.new_ones(g, m))[..., None] + 1e-6
    out = (sums / counts).to(x.dtype)
    return out[0] if single else out


@register_method("sparsevlm", "sparse-vlm")
class SparseVLM(LLMPruner):
    """SparseVLM v1.5: text-rater attention at ``layers`` (official 2, 6, 15), per-layer ``counts``, recycling.

    ``keep`` 64 / 128 / 192 selects the official counts; another int ``k`` scales the 64-token schedule by
    ``k / 64`` (not from the paper); a float ``r`` uses ratios ``r * (66, 30, 17) / 64`` of the image's tokens.
    ``counts`` (ints, or float ratios of the image's original tokens) overrides ``keep``. ``layers=None`` uses
    the official layers on a 32-layer LLM and scales them to other depths at apply time.
    """

    name = "sparsevlm"
    capabilities = Capabilities(stage="llm", text_raters=True, recycles=True, positions=("reindex",))
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
        return [LLMStage(layer + 1, count, layer) for layer, count in zip(layers, self.counts, strict=False)]

    # ------------------------------------------------------------------------------------------ scoring
    @staticmethod
    def rater_scores(embeds: torch.Tensor, visual: torch.Tensor, t_idx: torch.Tensor, t_ok: torch.Tensor,
                     text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Which candidate text tokens ``t_idx`` (B, T) (real where ``t_ok``) are raters, (B, T) bool.

        ``visual`` (B, S) marks the visual tokens of ``embeds`` (B, S, C); ``t_idx`` indexes ``text_embeds``
        (default ``embeds``), so a column slice of ``embeds`` / ``visual`` holding every image saves work.
        Relevance of text ``t`` = mean over visual ``v`` of ``softmax_t(v · t)`` over the real candidates;
        raters exceed the mean relevance of the sample's candidates.
        """
        src = embeds if text_embeds is None else text_embeds
        et = src.gather(1, t_idx[..., None].expand(-1, -1, src.shape[-1]))
        probs = (embeds.float() @ et.float().transpose(1, 2)).masked_fill(~t_ok[:, None], float("-inf")).softmax(-1)
        n_vis = visual.sum(1, keepdim=True)
        rel = (probs * visual[..., None]).sum(1) / n_vis.clamp(min=1)
        n_text = t_ok.sum(1, keepdim=True)
        mean = torch.where(t_ok, rel, 0.0).sum(1, keepdim=True) / n_text.clamp(min=1)
        return (rel > mean) & t_ok & (n_vis > 0)

    def stage_keep(self, stage_index: int, n_current: int, num_original: int) -> int:
        return max(1, min(resolve_budget(self.counts[stage_index], num_original), n_current - 1))

    @staticmethod
    def recycle_pick(m: int) -> int:
        """Deleted tokens (the best-scoring) that recycling clusters, of ``m``."""
        return int(m * 0.3) + 1

    def recycled_count(self, m: int) -> int:
        """Recycled tokens made from ``m`` deleted ones (0 when recycling is off or nothing was deleted)."""
        return int(self.recycle_pick(m) / 10) + 1 if self.recycle and m > 0 else 0

    def recycled(self, hidden: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Recycled tokens (c, C) from the deleted tokens' hidden states (m, C) and scores (m,); a leading batch
        dim (G, m, C) / (G, m) recycles G images with the same ``m`` at once."""
        m = hidden.shape[-2]
        if not self.recycle or m == 0:
            return hidden[..., :0, :]
        top = scores.topk(self.recycle_pick(m), dim=-1).indices
        picked = hidden.gather(-2, top[..., None].expand(*top.shape, hidden.shape[-1]))
        return dpc_knn_merge(picked, self.recycled_count(m))
