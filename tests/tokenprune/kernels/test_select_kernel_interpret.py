"""The one-launch per-image top-k selection equals a plain Python selection, under TRITON_INTERPRET=1."""

import json
import os

import pytest

# rows (images per row), tokens per image, row length, k per image, with ties
CASES = [([1], 9, 20, [4], False), ([2, 1, 0], 7, 30, [3, 7, 9], True), ([1, 2], 12, 45, [1, 12, 5], True)]


def expected(scores, image, valid, ks):
    """Per image: the ks[j] best current tokens, ties to the earlier token; keep mask, in-image indices, last."""
    bsz, length = scores.shape
    keep = [[bool(valid[b, i]) and int(image[b, i]) < 0 for i in range(length)] for b in range(bsz)]
    sel, last = [], []
    for j, k in enumerate(ks):
        toks = [(b, i) for b in range(bsz) for i in range(length) if valid[b, i] and int(image[b, i]) == j]
        ranked = sorted(range(len(toks)), key=lambda t: (-float(scores[toks[t]]), t))[:k]
        for t in ranked:
            keep[toks[t][0]][toks[t][1]] = True
        sel.append(sorted(ranked))
        b, i = toks[max(ranked)]
        last.append(b * length + i)
    return keep, sel, last


def run_cases() -> list[bool]:
    import torch

    from visattn.tokenprune.kernels.select import topk_per_image

    results = []
    for c, (per_row, n_tok, length, ks, ties) in enumerate(CASES):
        g = torch.Generator().manual_seed(c)
        bsz = len(per_row)
        scores = torch.rand(bsz, length, generator=g)
        if ties:
            scores = (scores * 4).floor() / 4  # many exact ties
        image = torch.full((bsz, length), -1, dtype=torch.long)
        valid = torch.ones(bsz, length, dtype=torch.bool)
        j = 0
        for b, n in enumerate(per_row):
            valid[b, : b + 1] = False  # left padding
            for i in range(n):
                image[b, 2 + b + i * (n_tok + 1) : 2 + b + i * (n_tok + 1) + n_tok] = j
                j += 1
        valid[image >= 0] = True
        keep, sel, last = topk_per_image(scores, image, valid, ks, per_row)
        want_keep, want_sel, want_last = expected(scores, image, valid, ks)
        ok = keep.tolist() == want_keep and last.tolist() == want_last
        ok = ok and all(sel[j, : len(w)].tolist() == w for j, w in enumerate(want_sel))
        results.append(ok)
    return results


@pytest.mark.interpret
def test_topk_per_image_kernel_matches_python(interpreted_results):
    assert interpreted_results["test_select_kernel_interpret"] == [True] * len(CASES)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
