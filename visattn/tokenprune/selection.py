"""Selectors: turn scores or features into kept indices (always returned in ascending, i.e. spatial, order)."""

from __future__ import annotations

import torch

from visattn.tokenprune import kernels


def topk_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` along the last dim, sorted ascending."""
    k = min(k, scores.shape[-1])
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def maxmin_diversity(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max–min selection on cosine distance, for ``features`` (N, D) or a batch (G, N, D).

    The first pick is the token farthest from its nearest neighbour; each next pick maximises the distance to the
    closest already-picked token. Returns the picked indices sorted ascending, (k,) or (G, k).
    """
    single = features.dim() == 2
    f = features[None] if single else features
    g, n, _ = f.shape
    k = min(k, n)
    if n == 1:
        out = torch.zeros(g, 1, dtype=torch.long, device=f.device)
        return out[0] if single else out
    f = f.float()
    f = f / f.norm(dim=-1, keepdim=True)
    dist = 1.0 - f @ f.transpose(1, 2)
    rows = torch.arange(g, device=f.device)
    nearest = dist.topk(2, dim=1, largest=False).values[:, 1]
    first = nearest.argmax(-1)
    if kernels.runs("tokenprune.maxmin", lambda: kernels.maxmin_why_not(dist)):
        picked = kernels.maxmin_picks(dist, first, k)  # one launch instead of ~4 per pick
    else:
        picked = torch.empty(g, k, dtype=torch.long, device=f.device)
        picked[:, 0] = first
        closest = dist[rows, picked[:, 0]].clone()
        for i in range(1, k):
            picked[:, i] = closest.argmax(-1)
            closest = torch.minimum(closest, dist[rows, picked[:, i]])
    picked = picked.sort(-1).values
    return picked[0] if single else picked


def contextual_merge(
    hidden: torch.Tensor, metric: torch.Tensor, num_contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens for one batch of remaining tokens.

    ``hidden`` (B, M, C) and ``metric`` (B, M, D) are the tokens left after the dominant ones. Targets are every
    ``max(1, M // num_contextual)``-th token (the first ``num_contextual``); every other token joins the target with
    the highest cosine similarity; a contextual token is ``target + mean(assigned)``.
    Returns (contextual (B, c, C), target indices (c,), assignment (B, M - c) into targets).
    """
    bsz, m, _ = hidden.shape
    c = min(num_contextual, m)
    step = max(1, m // c)
    targets = torch.arange(0, m, step, device=hidden.device)[:c]
    r = torch.arange(m - c, device=hidden.device)  # non-targets in order, by index arithmetic (no mask / sync)
    if step > 1:
        inside = c * (step - 1)
        others = torch.where(r < inside, (r // (step - 1)) * step + 1 + r % (step - 1), r + c)
    else:
        others = r + c
    metric = metric / metric.norm(dim=-1, keepdim=True)
    sim = torch.bmm(metric[:, others], metric[:, targets].transpose(1, 2))
    assign = sim.argmax(dim=-1)
    one_hot = torch.zeros(bsz, m - c, c, dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(2, assign[..., None], 1)
    counts = one_hot.sum(1).clamp(min=1)[..., None]
    merged = torch.bmm(one_hot.transpose(1, 2), hidden[:, others]) / counts
    return hidden[:, targets] + merged, targets, assign


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel ``kernel`` (G, N, N) (symmetric PSD), by the fast
    incremental-Cholesky greedy of Chen et al. (NeurIPS 2018), as CDPruner's official code runs it.

    ``d[j]²`` (the squared Cholesky pivot of candidate ``j``, i.e. ``det L[S+j] / det L[S]``) starts at
    ``L[j, j]``; each step picks ``j* = argmax d²`` (first index on ties), sets ``e = (L[j*] - c[:, j*] · c) /
    d[j*]``, appends ``e`` as a new row of ``c`` and lowers ``d² -= e²``; a picked token gets ``d² = -inf``.
    O(k·N) memory per image beyond the kernel. Returns the ``k`` picks of every image sorted ascending (G, k).

    On CUDA (float32) the whole loop is one Triton launch (:mod:`visattn.tokenprune.kernels.dpp`, the same
    arithmetic but for the summation order of the ``c`` dot products) instead of ~8 launches per pick.
    """
    g, n, _ = kernel.shape
    k = min(k, n)
    if kernels.runs("tokenprune.dpp", lambda: kernels.dpp_why_not(kernel)):
        return kernels.dpp_picks(kernel, k).sort(-1).values
    rows = torch.arange(g, device=kernel.device)
    c = kernel.new_zeros(k, g, n)
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()
    picked = torch.empty(g, k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        j = d2.argmax(-1)
        picked[:, i] = j
        e = (kernel[rows, j] - torch.einsum("tg,tgn->gn", c[:i, rows, j], c[:i])) / d2[rows, j].sqrt()[:, None]
        c[i] = e
        d2 = d2 - e * e
        d2[rows, j] = float("-inf")
    return picked.sort(-1).values
