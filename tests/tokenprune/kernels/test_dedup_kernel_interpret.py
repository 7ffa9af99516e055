"""VisPruner's one-launch removal kernel under TRITON_INTERPRET=1: ``remove_duplicates`` on the kernel returns
exactly the indices of its eager loop (``backends.use_backend("reference")``), of the implementation before the
kernel (per-step matmuls of the gathered tokens, kept in benchmarks/time_scorers.py) and of a plain float64
transcription of the rule (``tp_oracles.vispruner_removal_loop``) on random features: odd and even residual sizes,
targets near 0 and near the residual size, no step at all (target >= size), duplicate tokens (exact ties: the
earlier position ranks first) and a zero feature (NaN similarities: ranked first as ``torch.sort`` does, eager
oracle only); score and rank tiles smaller than the residual set exercise the chunked loops."""

from __future__ import annotations

import functools
import json
import os

import pytest

# name: (images, patches, residual size, channels, target)
CASES = {
    "odd-mid": (2, 40, 25, 16, 9),
    "even-mid": (2, 40, 24, 16, 10),
    "odd-target-1": (1, 36, 33, 8, 1),
    "even-target-2": (1, 36, 32, 8, 2),
    "near-size": (2, 30, 27, 8, 26),
    "near-size-2": (1, 30, 26, 8, 24),
    "no-step": (1, 20, 12, 8, 12),
    "above-size": (1, 20, 12, 8, 15),
    "ties": (1, 40, 30, 8, 7),  # the duplicates are set in _inputs
    "nan": (1, 30, 21, 8, 6),
}


@functools.cache
def previous_remove_duplicates():
    """``vispruner.remove_duplicates`` as it was before the fused kernel (each step's similarities by a matmul of
    the gathered even/odd tokens), as ``benchmarks/time_scorers.py`` keeps it for its baseline timings."""
    from bench_scripts import load_benchmark

    return load_benchmark("time_scorers").previous_remove_duplicates


def _inputs(name: str, seed: int):
    import torch

    g, p, size, c, target = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(g, p, c, generator=gen)
    residual = torch.stack([torch.randperm(p, generator=gen)[:size] for _ in range(g)])
    if name == "ties":  # 10 copies of one patch at even positions and one at an odd: 10 ``a`` tokens tie at the
        # top score and 8 go; 3 copies of another at even positions only: tied scores below the top
        for src, dst in ((0, [1, 2, 4, 6, 8, 10, 12, 14, 16, 18]), (20, [22, 24])):
            feats[0, residual[0, dst]] = feats[0, residual[0, src]].clone()
    if name == "nan":
        feats[0, residual[0, 6]] = 0.0
    return feats, residual, target


def run_cases() -> dict:
    from tp_oracles import vispruner_removal_loop

    from visattn import backends
    from visattn.tokenprune.kernels.dedup import dedup_positions
    from visattn.tokenprune.vispruner import remove_duplicates

    results = {}
    for seed, name in enumerate(CASES):
        feats, residual, target = _inputs(name, seed)
        with backends.use_backend("reference", family="tokenprune"):
            eager = remove_duplicates(feats, residual, target).tolist()
        fused = remove_duplicates(feats, residual, target).tolist()  # auto: the kernel (interpreted)
        f = feats.gather(1, residual[..., None].expand(-1, -1, feats.shape[-1]))
        f = f / f.norm(dim=-1, keepdim=True)
        positions = dedup_positions(f @ f.transpose(1, 2), target, 8, block_i=4, block_j=8)
        tiled = residual.gather(1, positions).tolist()
        oracle = None if name == "nan" else [vispruner_removal_loop(feats[i], residual[i].tolist(), target)
                                             for i in range(len(feats))]
        results[name] = {"fused": fused, "tiled": tiled, "eager": eager, "oracle": oracle,
                         "previous": previous_remove_duplicates()(feats, residual, target).tolist()}
    return results


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(CASES))
def test_dedup_kernel_matches_eager_previous_and_float64_oracle(interpreted_results, name):
    got = interpreted_results["test_dedup_kernel_interpret"][name]
    target, size = CASES[name][4], CASES[name][2]
    assert [len(row) for row in got["fused"]] == [min(target, size)] * CASES[name][0]
    assert got["fused"] == got["eager"]
    assert got["tiled"] == got["eager"]
    assert got["previous"] == got["eager"]
    if got["oracle"] is not None:
        assert got["fused"] == got["oracle"]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
