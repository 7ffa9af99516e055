"""Benchmark peers compute the same function as visattn (a fast wrong peer would make every ratio a lie)."""

import torch

from visattn import reference
from visattn.bench import dense
from visattn.bench.bra import biformer_gather


def test_biformer_gather_peer_equals_dense_oracle():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 14, 14, 2, 8, generator=gen, dtype=torch.float64).unbind(0)
    want = dense.bilevel_routing(q, k, v, (7, 7), 4, scale=0.3)
    for use_sdpa in (False, True):
        torch.testing.assert_close(biformer_gather(q, k, v, 7, 4, 0.3, use_sdpa), want)
    torch.testing.assert_close(reference.bilevel_routing(q, k, v, (7, 7), 4, 0.3), want)
