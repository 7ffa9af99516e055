"""Budget arithmetic of every token-pruning method and every budget form, against the documented rules
(docs/TOKENPRUNE.md "Budget semantics", the method tables) written out here independently:

* int ``k``: ``min(k, N)``; float ``r``: ``max(1, round(r * N))`` (Python's ``round``), per image;
* PyramidDrop truncates as PDrop does: ``max(1, int(r * N))`` of the *original* N, capped by the current count;
* SparseVLM: ``counts`` from the official table for keep 64 / 128 / 192, ``round(k * c / 64)`` for another int,
  ratios ``r * c / 64`` for a float (then the ratio rule), capped at ``n - 1`` of the current tokens;
* VisionZip: the paper's dominant + contextual splits (54+10, 108+20, 162+30);
* ToMe: ``r`` per layer, or the official ``parse_r`` inflection ``int(lo + (hi - lo) / (L - 1) * i)``;
* Uniform: ``k`` indices, ascending and distinct, the first and last token included, each within half a step of
  the ideal ``i * (N - 1) / (k - 1)`` (evenly spaced over the whole image, not the first k).

The (r, N) grid holds cases where rounding and truncation differ (r * N with a fractional part >= 0.5)."""

from __future__ import annotations

import pytest
import torch

import visattn.tokenprune as tp
from visattn.tokenprune.budget import resolve_budget

RATIO_GRID = [(0.25, 7), (0.3, 5), (0.5, 9), (0.125, 576), (0.111, 576), (0.7, 3), (0.05, 10), (0.01, 30),
              (1.0, 13), (0.999, 2)]
INT_GRID = [(1, 1), (3, 10), (10, 3), (64, 576), (576, 576), (700, 576)]


def spec(budget, n: int) -> int:
    """The documented budget rule (docs/TOKENPRUNE.md)."""
    if isinstance(budget, int):
        return min(budget, n)
    return max(1, round(budget * n))


def test_grid_distinguishes_rounding_from_truncation():
    assert any(round(r * n) != int(r * n) for r, n in RATIO_GRID)  # the grid can catch a floor


@pytest.mark.parametrize("budget,n", RATIO_GRID + INT_GRID)
def test_resolve_budget(budget, n):
    assert resolve_budget(budget, n) == spec(budget, n)


@pytest.mark.parametrize("budget,n", RATIO_GRID + INT_GRID)
@pytest.mark.parametrize("cls", [tp.FasterVLM, tp.VTCCLS])
def test_vision_methods_output_count(cls, budget, n):
    assert cls(keep=budget).output_count(n) == spec(budget, n)


@pytest.mark.parametrize("budget,n", RATIO_GRID + INT_GRID)
def test_fastv_stage_keep(budget, n):
    pruner = tp.FastV(layer=2, keep=budget)
    assert pruner.stage_keep(0, n, n) == spec(budget, n)
    assert pruner.stage_keep(0, max(1, n // 2), n) == min(spec(budget, n), max(1, n // 2))  # capped by current


@pytest.mark.parametrize("budget,n", [(r, n) for r, n in RATIO_GRID if n <= 64] + [(3, 10), (10, 3), (1, 1)])
@pytest.mark.parametrize("name", ["divprune", "uniform"])
def test_embedding_methods_select_the_budget(name, budget, n):
    emb = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(n))
    idx = tp.create(name, keep=budget).select(emb)
    assert idx.shape[-1] == spec(budget, n)
    assert (idx.diff(dim=-1) > 0).all() and int(idx.min()) >= 0 and int(idx.max()) < n


@pytest.mark.parametrize("n,k", [(10, 3), (576, 64), (7, 7), (9, 2), (100, 37), (5, 1)])
def test_uniform_indices_are_evenly_spaced_over_the_image(n, k):
    idx = tp.Uniform(keep=k).select(torch.zeros(n, 4)).tolist()
    assert len(idx) == k and idx == sorted(set(idx))
    if k == 1:
        assert 0 <= idx[0] < n
        return
    assert idx[0] == 0 and idx[-1] == n - 1
    step = (n - 1) / (k - 1)
    assert all(abs(j - i * step) <= 0.5 + 1e-9 for i, j in enumerate(idx)), idx


@pytest.mark.parametrize("ratios,n", [((0.5, 0.25, 0.125), 576), ((0.3, 0.2, 0.1), 7), ((0.9, 0.6, 0.05), 11)])
def test_pyramid_drop_truncates_like_pdrop(ratios, n):
    pruner = tp.PyramidDrop(layers=(2, 4, 6), ratios=ratios)
    current = n
    for i, r in enumerate(ratios):
        want = min(max(1, int(r * n)), current)
        assert pruner.stage_keep(i, current, n) == want
        current = want


@pytest.mark.parametrize("keep,counts", [(64, (66, 30, 17)), (128, (303, 110, 36)), (192, (300, 200, 110))])
def test_sparsevlm_official_counts(keep, counts):
    """The official schedule (SparseVLM v1.5 for 576 LLaVA tokens) and the n - 1 cap of the current tokens."""
    pruner = tp.SparseVLM(keep=keep)
    for i, c in enumerate(counts):
        assert pruner.stage_keep(i, 576, 576) == min(c, 575)
        assert pruner.stage_keep(i, 40, 576) == max(1, min(c, 39))


@pytest.mark.parametrize("keep,n", [(32, 576), (100, 576), (0.25, 576), (0.11, 97), (0.5, 9), (1.0, 50)])
def test_sparsevlm_scaled_and_ratio_counts(keep, n):
    pruner = tp.SparseVLM(keep=keep)
    for i, c in enumerate((66, 30, 17)):
        want = max(1, round(keep * c / 64)) if isinstance(keep, int) else spec(min(keep * c / 64, 1.0), n)
        assert pruner.stage_keep(i, n, n) == max(1, min(min(want, n), n - 1))


@pytest.mark.parametrize("keep,split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30))])
def test_visionzip_paper_splits_and_output_count(keep, split):
    pruner = tp.VisionZip.from_keep(keep)
    assert (pruner.dominant, pruner.contextual) == split
    assert pruner.output_count(576) == keep and pruner.output_count(40) == min(keep, 41)


@pytest.mark.parametrize("r,inflect,layers", [(8, 0.0, 12), (8, 0.5, 12), (13, -0.5, 24), (4, 1.0, 5)])
def test_tome_schedule(r, inflect, layers):
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    want = [int(lo + (hi - lo) / (layers - 1) * i) for i in range(layers)]
    assert tp.ToMe(r=r, inflect=inflect).schedule(layers) == want
    assert tp.ToMe(r=[3, 1]).schedule(4) == [3, 1, 0, 0]
