"""Pins of the one dense oracle (visattn.bench.dense) against hand-written cases of docs/SEMANTICS.md.

The oracle used to exist twice (bench/dense.py and tests/oracle.py). The two agreed on every valid input; they
differed in the neighborhood op's positional order (dilation before stride in one, NATTEN's stride before dilation
in the other) and in the bias of pairs whose offset leaves the rpb table (clamped into the table in one, 0 in the
other; only masked pairs). These tests pin the merged choices: NATTEN's order, and 0 off the table.
"""

import math

import torch

from visattn.bench import dense


def _rows_softmax(q, k, v, rows, scale, extra_k=None, extra_v=None):
    """1-D attention by hand: query i attends exactly the keys listed in rows[i] (and every extra key)."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i, keys in enumerate(rows):
                logits = [float(q[b, i, h] @ k[b, j, h]) * scale for j in keys]
                vals = [v[b, j, h] for j in keys]
                if extra_k is not None:
                    logits += [float(q[b, i, h] @ extra_k[b, e, h]) * scale for e in range(extra_k.shape[1])]
                    vals += [extra_v[b, e, h] for e in range(extra_k.shape[1])]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                out[b, i, h] = sum(w * x for w, x in zip(weights, vals, strict=True)) / total
                lse[b, i, h] = top + math.log(total)
    return out, lse


def test_na_takes_natten_positional_order_stride_before_dilation():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(1, 2, 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    # SEMANTICS.md, L=6, k=3: stride 2 -> the stride groups share their leader's window; dilation 2 -> two groups
    by_stride = [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[3, 4, 5]] * 2
    by_dilation = [[0, 2, 4], [1, 3, 5]] * 3
    for (stride, dilation), rows in (((2, 1), by_stride), ((1, 2), by_dilation)):
        out, lse = dense.na(q, k, v, 3, stride, dilation, False, 0.5, ek, ev, return_lse=True)
        want, want_lse = _rows_softmax(q, k, v, rows, 0.5, ek, ev)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)


def test_rpb_bias_is_the_table_entry_of_the_offset_and_zero_off_the_table():
    rpb = torch.arange(1.0, 7.0, dtype=torch.float64).view(2, 3)  # 2 heads, kernel 2: offsets -1, 0, 1
    bias = dense.relative_bias(rpb, (4,), (1,), (2,))
    for h in range(2):
        for i in range(4):
            for j in range(4):
                want = float(rpb[h, j - i + 1]) if abs(j - i) <= 1 else 0.0
                assert float(bias[h, i, j]) == want, (h, i, j)


def test_rpb_offsets_are_in_dilation_group_coordinates():
    rpb = torch.arange(1.0, 6.0, dtype=torch.float64).view(1, 5)  # kernel 3: offsets -2..2
    bias = dense.relative_bias(rpb, (6,), (2,), (3,))
    assert float(bias[0, 1, 5]) == float(rpb[0, 5 // 2 - 1 // 2 + 2])  # group coordinates 0 -> 2: offset 2
    assert float(bias[0, 4, 0]) == float(rpb[0, 0])  # 2 -> 0: offset -2
