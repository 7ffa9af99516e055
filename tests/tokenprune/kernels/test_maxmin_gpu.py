"""DivPrune's one-launch max–min kernel equals the greedy loop on the same CUDA distances (LLaVA sizes)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("groups,tokens,picks", [(8, 576, 64), (1, 2880, 320), (4, 576, 192), (2, 17, 17)])
def test_kernel_equals_loop(groups, tokens, picks):
    from visattn.tokenprune.kernels.maxmin import maxmin_picks

    f = torch.randn(groups, tokens, 64, device="cuda")
    f = f / f.norm(dim=-1, keepdim=True)
    dist = 1.0 - f @ f.transpose(1, 2)
    first = dist.topk(2, dim=1, largest=False).values[:, 1].argmax(-1)
    rows = torch.arange(groups, device="cuda")
    want = torch.empty(groups, picks, dtype=torch.long, device="cuda")
    want[:, 0] = first
    closest = dist[rows, first].clone()
    for i in range(1, picks):
        want[:, i] = closest.argmax(-1)
        closest = torch.minimum(closest, dist[rows, want[:, i]])
    assert torch.equal(maxmin_picks(dist, first, picks), want)
