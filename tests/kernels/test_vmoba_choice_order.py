"""VMoBA's query grouping (visattn.kernels._choice_order): a permutation per (batch, head) after which rows with the
same chunk choice are adjacent, for choices of one to three 62-chunk words; checked against grouping the rows'
choice tuples in plain Python."""

import pytest
import torch

kernels = pytest.importorskip("visattn.kernels")


@pytest.mark.parametrize("chunks", [1, 7, 62, 63, 130])
def test_rows_with_the_same_choice_are_adjacent(chunks):
    g = torch.Generator().manual_seed(chunks)
    patterns = torch.rand(5, chunks, generator=g) < 0.4  # a few distinct choices, repeated across rows
    picks = torch.randint(0, 5, (2, 3, 40), generator=g)
    sel = patterns[picks]  # [B, heads, N, C]
    order = kernels._choice_order(sel)
    assert order.shape == (2, 3, 40)
    for b in range(2):
        for h in range(3):
            rows = order[b, h].tolist()
            assert sorted(rows) == list(range(40))  # a permutation
            keys = [tuple(sel[b, h, r].tolist()) for r in rows]
            runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
            assert len(runs) == len(set(keys))  # each distinct choice forms one contiguous run
