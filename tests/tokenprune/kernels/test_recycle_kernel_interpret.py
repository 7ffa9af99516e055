"""SparseVLM's one-launch token recycling equals a float64 loop oracle (top-p by score, DPC-KNN with index
tie-breaks), under TRITON_INTERPRET=1."""

import json
import os

import pytest

# (row length, images as (row, start, end), picked, clusters per image, hidden width, dtype)
CASES = [
    (40, [(0, 5, 25)], [6], [2], 24, "float32"),
    (48, [(0, 2, 30), (1, 3, 15), (1, 20, 44)], [9, 0, 7], [3, 0, 4], 70, "float32"),  # an image with no picks
    (36, [(0, 1, 33), (1, 4, 30)], [17, 20], [5, 6], 32, "float16"),
    # bfloat16 hidden states: the kernels read scores (float32) and the Gram matrix of the upcast picks, so unlike
    # the attention kernels (bf16 tl.dot is wrong in the interpreter) this path runs in bf16 on the CPU too
    (30, [(0, 2, 28)], [12], [3], 40, "bfloat16"),
]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}  # relative to the largest |mean|, vs float64


def dpc_oracle(x, clusters):
    """Float64 DPC-KNN by loops: density from the ``clusters`` nearest distances (self included), parent = nearest
    denser token (else the largest distance), centres = best density x parent, ties to the lower index."""
    import torch

    x = x.double()
    m, dim = x.shape
    d = [[float((x[i] - x[j]).norm()) / dim**0.5 for j in range(m)] for i in range(m)]
    dens = [torch.tensor(sorted(row)[:clusters]).pow(2).mean().neg().exp().item() for row in d]
    dmax = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(m) if dens[j] > dens[i]] or [dmax]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-parent[i] * dens[i], i))[:clusters]
    groups = [[] for _ in centres]
    for i in range(m):
        k = centres.index(i) if i in centres else min(range(clusters), key=lambda k: (d[centres[k]][i], k))
        groups[k].append(x[i])
    return torch.stack([torch.stack(g).sum(0) / (len(g) + 1e-6) for g in groups])


def run_cases() -> list[float]:
    import torch

    from visattn.tokenprune.kernels.recycle import recycle_tokens

    errors = []
    for c, (length, spans, picked, clusters, width, dtype) in enumerate(CASES):
        g = torch.Generator().manual_seed(c)
        bsz = 1 + max(r for r, _, _ in spans)
        hidden = torch.randn(bsz, length, width, generator=g).to(getattr(torch, dtype))
        scores = torch.rand(bsz, length, generator=g)
        image = torch.full((bsz, length), -1, dtype=torch.long)
        valid = torch.ones(bsz, length, dtype=torch.bool)
        keep = torch.rand(bsz, length, generator=g) < 0.3
        for j, (r, s, e) in enumerate(spans):
            image[r, s:e] = j
        out_rows = [sum(clusters[:j]) for j in range(len(spans))]
        got = recycle_tokens(hidden, scores, image, valid, keep, [r for r, _, _ in spans], picked, clusters)
        worst = 0.0
        assert got.shape == (sum(clusters), width)
        for j, (r, s, e) in enumerate(spans):
            if not clusters[j]:
                continue
            gone = sorted((i for i in range(s, e) if not keep[r, i]), key=lambda i: (-float(scores[r, i]), i))
            want = dpc_oracle(hidden[r, gone[: picked[j]]], clusters[j])
            mine = got[out_rows[j] : out_rows[j] + clusters[j]].double()
            worst = max(worst, float((mine - want).abs().max() / want.abs().max()))
        errors.append(worst)
    return errors


@pytest.mark.interpret
def test_recycle_kernel_matches_float64_loops(interpreted_results):
    errors = interpreted_results["test_recycle_kernel_interpret"]
    assert all(e < TOL[c[-1]] for e, c in zip(errors, CASES, strict=True)), errors


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
