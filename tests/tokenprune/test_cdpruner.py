"""CDPruner: the greedy DPP MAP against a float64 plain-loop transcription of the incremental-Cholesky greedy
(Chen et al. 2018, the arithmetic of CDPruner's official code) and against the definition (each step adds the
token that maximises det L[S]); on a tiny random LLaVA-1.5 and Qwen2-VL the kept indices equal the loop oracle
run on the conditional kernel built by loops from the eager model's projected features and the instruction's
token embeddings; generate() with KV cache = a layer-by-layer reference; batch rows = single runs."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from test_custom_method import _check_before_llm  # noqa: E402
from test_llava_methods import N_IMG, _inputs, _span, rows_equal_single_runs  # noqa: E402
from tp_oracles import greedy_map_loop  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune.selection import dpp_greedy_map  # noqa: E402


def greedy_map_by_determinants(kernel: torch.Tensor, k: int) -> list[int]:
    """The definition: each step adds the token with the largest det L[S ∪ {j}] (float64)."""
    picked: list[int] = []
    for _ in range(k):
        dets = {j: torch.linalg.det(kernel[picked + [j]][:, picked + [j]]).item()
                for j in range(kernel.shape[0]) if j not in picked}
        picked.append(max(dets, key=dets.get))
    return sorted(picked)


def kernel_loop(visual: torch.Tensor, text: torch.Tensor, theta: float | None = None) -> list[list[float]]:
    """diag(r) S diag(r) by loops in float64: S = cosine similarity of the visual tokens, r = min-max normalised
    negative mean cosine similarity to the text tokens (+1e-6), optionally exp(theta / (2 (1 - theta)) r)."""
    v = [x / x.norm() for x in visual.double()]
    t = [x / x.norm() for x in text.double()]
    raw = [-sum(float(a @ b) for b in t) / len(t) for a in v]
    lo, hi = min(raw), max(raw)
    rel = [(x - lo + 1e-6) / (hi - lo) for x in raw]
    if theta is not None:
        rel = [math.exp(theta / (2 * (1 - theta)) * x) for x in rel]
    return [[rel[i] * float(v[i] @ v[j]) * rel[j] for j in range(len(v))] for i in range(len(v))]


def test_greedy_map_matches_loop_and_determinant_definition():
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 20, 12, generator=g, dtype=torch.float64)
    quality = torch.rand(3, 20, generator=g, dtype=torch.float64) + 0.1
    kernel = quality[:, :, None] * (feats @ feats.transpose(1, 2)) * quality[:, None, :]
    got = dpp_greedy_map(kernel, 7)
    for b in range(3):
        assert got[b].tolist() == greedy_map_loop(kernel[b].tolist(), 7)
        assert got[b].tolist() == greedy_map_by_determinants(kernel[b], 7)
    assert dpp_greedy_map(kernel.float(), 7).tolist() == got.tolist()


def _instruction(eager, i: int) -> torch.Tensor:
    ids, mask, _ = _inputs()
    row = ids[i][mask[i].bool()]
    return eager.model.language_model.embed_tokens(row[_span(row) + N_IMG:])


@pytest.mark.parametrize("theta", [None, 0.5])
def test_llava_kept_and_generate_match_oracle(models, theta):
    model, eager = models
    tp.REGISTRY["cdpruner-test"] = type("CDPrunerTheta", (tp.CDPruner,), {
        "__init__": lambda self, keep: tp.CDPruner.__init__(self, keep, theta)})
    try:
        _check_before_llm(model, eager, "cdpruner-test", lambda i, px, feats: greedy_map_loop(
            kernel_loop(feats[i], _instruction(eager, i), theta), 5))
    finally:
        tp.REGISTRY.pop("cdpruner-test")


def test_instruction_changes_the_kept_set_and_batch_rows_equal_single_runs(models):
    model, _ = models
    ids, mask, px = _inputs(rows=[(3, 4, 11), (6, 3, 12), (3, 4, 13)])
    px = torch.cat([px[:1], px[1:2], px[:1]])  # rows 0 and 2: same image, other instruction
    report = rows_equal_single_runs(model, lambda: tp.CDPruner(keep=5), ids, mask, px)
    assert report.kept_indices[0][0].tolist() != report.kept_indices[2][0].tolist()


@pytest.mark.parametrize("bad,arg", [(0, "keep"), (1.5, "keep"), (True, "keep"), (1.0, "theta"), (-0.1, "theta"),
                                     ("0.5", "theta")])
def test_bad_arguments_raise_naming_them(bad, arg):
    with pytest.raises(ValueError, match=rf"{arg}="):
        tp.create("cdpruner", **{"keep": 4, arg: bad})
