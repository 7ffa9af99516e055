"""The per-image top-k kernel on CUDA against a stable-sort oracle: LLaVA-1.5 / NeXT sizes, padding, ties."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def oracle(scores, image, valid, ks):
    """Per image: a stable descending sort of its current tokens' scores (ties to the earlier token)."""
    bsz, length = scores.shape
    keep = valid & (image < 0)
    sel, last = [], []
    for j, k in enumerate(ks):
        rows, cols = ((image == j) & valid).nonzero(as_tuple=True)
        order = torch.sort(scores[rows, cols], descending=True, stable=True).indices[:k]
        picked = order.sort().values
        keep[rows[picked], cols[picked]] = True
        sel.append(picked)
        last.append(int(rows[picked[-1]] * length + cols[picked[-1]]))
    return keep, sel, last


CASES = [  # images per row, tokens per image, text before / after, k per image (same for all), ties
    ([1] * 8, 576, 35, 40, 288, False),
    ([1] * 8, 576, 35, 40, 72, True),
    ([5], 576, 35, 40, 64, False),
    ([5, 5], 576, 35, 40, 575, True),
    ([2, 1, 3], 100, 7, 9, 33, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_topk_per_image_matches_stable_sort(case):
    from visattn.tokenprune.kernels.select import topk_per_image

    per_row, n_tok, before, after, k, ties = case
    g = torch.Generator(device="cuda").manual_seed(sum(per_row) * n_tok + k)
    bsz = len(per_row)
    length = before + max(per_row) * n_tok + after + bsz
    image = torch.full((bsz, length), -1, dtype=torch.long, device="cuda")
    valid = torch.ones(bsz, length, dtype=torch.bool, device="cuda")
    j = 0
    for b, n in enumerate(per_row):
        pad = length - (before + n * n_tok + after)
        valid[b, :pad] = False  # left padding
        for i in range(n):
            start = pad + before + i * n_tok
            image[b, start : start + n_tok] = j
            j += 1
    scores = torch.rand(bsz, length, generator=g, device="cuda")
    if ties:
        scores = (scores * 16).floor() / 16
    ks = [min(k, n_tok)] * j
    keep, sel, last = topk_per_image(scores, image, valid, ks, per_row)
    want_keep, want_sel, want_last = oracle(scores, image, valid, ks)
    assert torch.equal(keep, want_keep)
    assert last.tolist() == want_last
    for i, w in enumerate(want_sel):
        assert torch.equal(sel[i, : ks[i]], w)
