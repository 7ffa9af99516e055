"""The host reduction of the per-pair dS buffer into the bias gradient (``ops._reduce_rpb_grad``): the joint
one-hot map (one matmul) and the per-dimension chain must both equal a float64 loop over positions and neighbours."""

import itertools
import math

import pytest
import torch

from visattn.geometry import interval
from visattn.kernels import ops, tables


def _slots(length, dilation, kernel, stride, shift, causal, window):
    """Per position: [(neighbour slot, table offset)] along one dimension, from the pattern's interval rule."""
    out = []
    for p in range(length):
        group, q = p % dilation, p // dilation
        group_len = (length - group + dilation - 1) // dilation
        start, end = interval(q, group_len, kernel, stride, shift, causal, window)
        out.append([(j, start + j - q + kernel - 1) for j in range(end - start + 1)])
    return out


def _per_dim(pat, lengths):
    return [_slots(lengths[i], pat.dilation[i], pat.kernel[i], pat.stride[i], pat.shift[i], pat.causal[i],
                   pat.window) for i in range(3)]


def _brute_force(dsn, pat, lengths):
    k0, k1, k2 = pat.kernel
    heads = dsn.shape[1]
    per_dim = _per_dim(pat, lengths)
    total = dsn.double().sum(0).view(heads, *lengths, k0, k1, k2)
    out = torch.zeros(heads, 2 * k0 - 1, 2 * k1 - 1, 2 * k2 - 1, dtype=torch.float64)
    for x, y, z in itertools.product(*(range(n) for n in lengths)):
        for (i, a), (j, b), (k, c) in itertools.product(per_dim[0][x], per_dim[1][y], per_dim[2][z]):
            out[:, a, b, c] += total[:, x, y, z, i, j, k]
    return out


def _valid_mask(pat, lengths):
    """1 where a (position, neighbour slot) pair exists: the kernel leaves the others zero."""
    mask = torch.zeros(*lengths, *pat.kernel)
    per_dim = _per_dim(pat, lengths)
    for x, y, z in itertools.product(*(range(n) for n in lengths)):
        for (i, _), (j, _), (k, _) in itertools.product(per_dim[0][x], per_dim[1][y], per_dim[2][z]):
            mask[x, y, z, i, j, k] = 1
    return mask.view(math.prod(lengths), -1)


CASES = [  # rank, window, kernel, dilation, causal, shift, lengths (canonical 3-D)
    (2, False, (1, 3, 5), (1, 1, 2), (False, False, False), (0, 0, 0), (1, 7, 9)),
    (3, False, (3, 3, 3), (1, 2, 1), (False, False, True), (0, 0, 0), (4, 6, 5)),
    (1, False, (1, 1, 5), (1, 1, 1), (False, False, True), (0, 0, 0), (1, 1, 11)),
    (2, True, (1, 4, 4), (1, 1, 1), (False, False, False), (0, 2, 2), (1, 8, 8)),
]


@pytest.mark.parametrize("joint", [True, False], ids=["joint-map", "per-dimension"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"rank{c[0]}{'-window' if c[1] else ''}")
def test_reduction_matches_float64_loop(case, joint, monkeypatch):
    rank, window, kernel, dilation, causal, shift, lengths = case
    pat = ops.make_pattern(rank, window, kernel[3 - rank:], dilation[3 - rank:], (1,) * rank, causal[3 - rank:],
                           shift[3 - rank:])
    monkeypatch.setattr(tables, "JOINT_MAP_BYTES", tables.JOINT_MAP_BYTES if joint else 0)
    tables._DEVICE_TABLES.clear()
    heads, batch = 3, 2
    torch.manual_seed(0)
    dsn = torch.randn(batch, heads, math.prod(lengths), math.prod(pat.kernel)) * _valid_mask(pat, lengths)
    assert (tables.rpb_joint_map(pat, lengths, dsn.device) is not None) == joint
    got = ops._reduce_rpb_grad(dsn, pat, lengths, heads)
    torch.testing.assert_close(got.double(), _brute_force(dsn, pat, lengths), rtol=1e-5, atol=1e-5)
