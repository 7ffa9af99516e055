"""The one-launch Triton max–min (DivPrune) selection equals the PyTorch greedy loop, under TRITON_INTERPRET=1."""

import json
import os

import pytest

CASES = [(1, 7, 3, 5), (3, 50, 12, 16), (2, 130, 40, 8), (1, 64, 64, 4)]  # groups, tokens, picks, feature dim


def run_cases() -> list[bool]:
    import torch

    from visattn.tokenprune.kernels.maxmin import maxmin_picks

    results = []
    for i, (g, n, k, d) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        f = torch.randn(g, n, d, generator=gen)
        f = f / f.norm(dim=-1, keepdim=True)
        dist = 1.0 - f @ f.transpose(1, 2)
        first = dist.topk(2, dim=1, largest=False).values[:, 1].argmax(-1)
        # the plain greedy loop, written independently of visattn
        want = []
        for b in range(g):
            picks = [int(first[b])]
            closest = dist[b, picks[0]].clone()
            while len(picks) < k:
                picks.append(int(closest.argmax()))
                closest = torch.minimum(closest, dist[b, picks[-1]])
            want.append(picks)
        results.append(maxmin_picks(dist, first, k).tolist() == want)
    return results


@pytest.mark.interpret
def test_maxmin_kernel_matches_greedy_loop(interpreted_results):
    assert interpreted_results["test_maxmin_kernel_interpret"] == [True] * len(CASES)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
