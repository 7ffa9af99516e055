"""SparseVLM's recycling kernel on CUDA at LLaVA sizes against a float64 oracle (top-p by score, DPC-KNN with
index tie-breaks), and the eager DPC-KNN on the same picks."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def dpc_float64(x, clusters):
    x = x.double()
    m, dim = x.shape
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0).sqrt() / dim**0.5
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    density = (-(d.sort(1).values[:, :clusters] ** 2).mean(1)).exp()
    denser = density[None, :] > density[:, None]
    parent = torch.where(denser, d, d.max()).min(1).values
    centres = torch.sort(-(parent * density), stable=True).indices[:clusters]
    assign = d[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    onehot = torch.nn.functional.one_hot(assign, clusters).double()
    return (onehot.T @ x) / (onehot.sum(0)[:, None] + 1e-6)


CASES = [  # batch, images per row, tokens per image, kept per image, width, dtype
    (8, 1, 576, 66, 4096, torch.float16),
    (1, 5, 576, 30, 4096, torch.float16),
    (2, 2, 300, 120, 1024, torch.bfloat16),
    (3, 1, 100, 99, 256, torch.float32),
    (1, 1, 850, 2, 512, torch.float16),  # 255 picks, 26 clusters: the kernel's largest tiles
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_recycle_kernel_matches_float64_oracle(case):
    from visattn.tokenprune.kernels.recycle import recycle_tokens
    from visattn.tokenprune.sparsevlm import SparseVLM

    bsz, per_row, n_tok, n_keep, width, dtype = case
    g = torch.Generator(device="cuda").manual_seed(n_tok + n_keep)
    length = 40 + per_row * n_tok + 10
    hidden = torch.randn(bsz, length, width, generator=g, device="cuda").to(dtype)
    scores = torch.rand(bsz, length, generator=g, device="cuda")
    image = torch.full((bsz, length), -1, dtype=torch.long, device="cuda")
    keep = torch.zeros(bsz, length, dtype=torch.bool, device="cuda")
    spans = []
    for b in range(bsz):
        for i in range(per_row):
            s = 40 + i * n_tok
            image[b, s : s + n_tok] = len(spans)
            keep[b, s + torch.randperm(n_tok, generator=g, device="cuda")[:n_keep]] = True
            spans.append((b, s, s + n_tok))
    valid = torch.ones(bsz, length, dtype=torch.bool, device="cuda")
    removed = n_tok - n_keep
    picks, made = SparseVLM.recycle_pick(removed), SparseVLM().recycled_count(removed)
    n = len(spans)
    got = recycle_tokens(hidden, scores, image, valid, keep, [b for b, _, _ in spans], [picks] * n, [made] * n)
    for j, (b, s, e) in enumerate(spans):
        gone = (~keep[b, s:e]).nonzero().flatten() + s
        top = gone[torch.sort(-scores[b, gone].double(), stable=True).indices[:picks]]
        want = dpc_float64(hidden[b, top], made)
        err = float((got[j * made : (j + 1) * made].double() - want).abs().max() / want.abs().max())
        assert err < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype], (j, err)
        eager = SparseVLM().recycled(hidden[b, gone], scores[b, gone])
        torch.testing.assert_close(got[j * made : (j + 1) * made].float(), eager.float(), atol=1e-2, rtol=1e-2)
