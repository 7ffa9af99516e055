"""Score-free baselines: ``random`` (a seeded uniform subset of each image's visual tokens) and ``pooling`` (spatial
average pooling of the patch grid). Both judge what a scoring method buys (UniPruneBench finds random selection a
strong baseline)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from visattn.tokenprune.budget import Budget, check_budget, check_layer, resolve_budget
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import EmbeddingPruner, VisionPruner
from visattn.tokenprune.registry import register_method


@register_method("random", "random-prune")
class RandomPrune(EmbeddingPruner):
    """Keep ``keep`` visual tokens of each image drawn uniformly without replacement (embedding stage).

    The subset depends only on ``seed`` and the image's token count ``N``: it is the first ``k`` entries of
    ``torch.randperm(N)`` drawn on the CPU from a generator seeded with ``seed``, sorted. Every image is therefore
    a uniform random subset, the result is the same on every device and for every batch composition (a batch row
    equals the row run alone), and two images with the same ``N`` get the same subset in one call; vary ``seed``
    to average over draws.
    """

    name = "random"

    def __init__(self, keep: Budget = 0.25, seed: int = 0):
        super().__init__(keep)
        self.seed = check_layer(seed, "seed", 0)

    def select(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings`` (G, N, D) of G images → kept indices (G, k), ascending."""
        n = embeddings.shape[-2]
        k = resolve_budget(self.keep, n)
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=gen)[:k].sort().values.to(embeddings.device)
        return idx.expand(*embeddings.shape[:-2], -1)


def pooled_sizes(side: int) -> list[int]:
    """Token counts an average pool with a window dividing ``side`` can produce on a ``side × side`` grid."""
    return sorted((side // w) ** 2 for w in range(1, side + 1) if side % w == 0)


@register_method("pooling", "avgpool", "avg-pool")
class Pooling(VisionPruner):
    """Average-pool each image's ``s × s`` patch grid (the projector input, vision layer ``vision_feature_layer``)
    with a ``w × w`` window and stride ``w`` to ``keep = (s / w)²`` tokens, in raster order (vision stage).

    ``keep`` (an int, or a ratio resolved against the ``s²`` patches) must be a pooled grid size: ``(s / w)²`` for
    a window ``w`` that divides ``s`` (on LLaVA-1.5's 24 × 24 grid: 576, 144, 64, 36, 16, 9, 4, 1; ``keep=144`` is
    a 2 × 2 pool, ``keep=64`` a 3 × 3 pool). Any other value raises ``ValueError`` naming ``keep``, the valid
    sizes and the nearest one (raised at ``apply`` on LLaVA-1.5, where the grid is known from the config).
    ``keep >= s²`` keeps the grid unchanged. No scores are computed. ``kept_indices`` lists each window's top-left
    patch index; ``extra`` of the reduction holds the window size. Patch grids that are not square raise
    ``ValueError``.
    """

    name = "pooling"
    capabilities = Capabilities(stage="vision", output="merged")

    def __init__(self, keep: Budget = 0.25):
        self.keep = check_budget(keep, "keep")

    def capture_layers(self, num_layers: int) -> list[int]:
        return []

    def window(self, num_patches: int) -> int:
        """The pooling window ``w`` for ``num_patches`` patches (1: nothing is pooled)."""
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"keep={self.keep!r}: pooling needs a square patch grid, got {num_patches} patches")
        k = resolve_budget(self.keep, num_patches)
        out = math.isqrt(k)
        if out * out != k or side % out:
            sizes = pooled_sizes(side)
            nearest = min(sizes, key=lambda s: (abs(s - k), s))
            raise ValueError(f"keep={self.keep!r}: {k} tokens is not a pooled size of the {side}x{side} patch grid; "
                             f"valid: {sizes} (nearest: {nearest})")
        return side // out

    def output_count(self, num_patches: int) -> int:
        return (math.isqrt(num_patches) // self.window(num_patches)) ** 2

    def reduce(self, patches, cls_hidden, captures):
        n, p, c = patches.shape
        w = self.window(p)
        side = math.isqrt(p)
        grid = patches.transpose(1, 2).reshape(n, c, side, side)
        pooled = F.avg_pool2d(grid, w, w).flatten(2).transpose(1, 2)
        out = side // w
        r = torch.arange(out, device=patches.device)
        corners = ((r[:, None] * w) * side + r[None, :] * w).flatten()
        return pooled, corners.expand(n, -1), {"window": w}
