"""The CDPruner / VisPruner kernel launchers reject bad arguments by name before launching anything, and their
predicates say why a call cannot run (CPU without the interpreter, float64, too many tokens)."""

from __future__ import annotations

import pytest
import torch

from visattn.tokenprune import kernels

pytest.importorskip("triton")


@pytest.mark.parametrize("args,kwargs,error,word", [
    ((torch.zeros(2, 3, 4), 2), {}, ValueError, "kernel"),
    ((torch.zeros(2, 3, 3, dtype=torch.float64), 2), {}, TypeError, "kernel"),
    ((torch.zeros(2, 3, 3), 4), {}, ValueError, "k="),
    ((torch.zeros(2, 3, 3), True), {}, ValueError, "k="),
    ((torch.zeros(2, 3, 3), 2), {"block_n": 48}, ValueError, "block_n="),
    ((torch.zeros(2, 3, 3), 2), {"block_t": 0}, ValueError, "block_t="),
    ((torch.zeros(2, 3, 3), 2), {"num_stages": 0}, ValueError, "num_stages="),
])
def test_dpp_picks_rejects_bad_arguments(args, kwargs, error, word):
    from visattn.tokenprune.kernels.dpp import dpp_picks

    with pytest.raises(error, match=word):
        dpp_picks(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,error,word", [
    ((torch.zeros(2, 3), 2), {}, ValueError, "sim"),
    ((torch.zeros(2, 3, 3, dtype=torch.float16), 2), {}, TypeError, "sim"),
    ((torch.zeros(2, 3, 3), 0), {}, ValueError, "target="),
    ((torch.zeros(2, 3, 3), 2.0), {}, ValueError, "target="),
    ((torch.zeros(2, 3, 3), 2, 0), {}, ValueError, "per_step="),
    ((torch.zeros(2, 3, 3), 2), {"block_j": 100}, ValueError, "block_j="),
])
def test_dedup_positions_rejects_bad_arguments(args, kwargs, error, word):
    from visattn.tokenprune.kernels.dedup import dedup_positions

    with pytest.raises(error, match=word):
        dedup_positions(*args, **kwargs)


def test_predicates_say_why_not(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in kernels.dpp_why_not(torch.zeros(1, 4, 4))
    assert "CUDA" in kernels.dedup_why_not(torch.zeros(1, 4, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.dpp_why_not(torch.zeros(1, 4, 4)) is None
    assert kernels.dedup_why_not(torch.zeros(1, 4, 4)) is None
    assert "float32" in kernels.dpp_why_not(torch.zeros(1, 4, 4, dtype=torch.float64))
    assert "float32" in kernels.dedup_why_not(torch.zeros(1, 4, 4, dtype=torch.float64))
    big = torch.zeros(1, 1, kernels.MAX_TOKENS + 1).expand(1, kernels.MAX_TOKENS + 1, -1)
    assert "tokens per image" in kernels.dpp_why_not(big)
    assert "tokens per image" in kernels.dedup_why_not(big)
