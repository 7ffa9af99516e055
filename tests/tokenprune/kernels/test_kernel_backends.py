"""The pruning kernels under the shared backend policy: registered for ``visattn info`` with probes that never
raise, "reference" always takes the eager ops, "triton" raises why a kernel cannot run, "auto" falls back."""

from __future__ import annotations

import pytest
import torch

from visattn import backends
from visattn.tokenprune import kernels

NAMES = ("tokenprune.rowscore", "tokenprune.select", "tokenprune.recycle", "tokenprune.maxmin", "tokenprune.dpp",
         "tokenprune.dedup")


def test_kernels_are_listed_with_a_reason_or_none():
    listed = {entry.name: reason for entry, reason in backends.list_kernels("cpu") if entry.family == "tokenprune"}
    assert set(NAMES) <= set(listed)
    for device in ("cpu", "cuda", "not-a-device"):
        for entry, reason in backends.list_kernels(device):
            assert reason is None or isinstance(reason, str), (entry.name, device)


def test_policy_words_pick_the_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scores = torch.rand(2, 10)  # a CPU tensor: the kernels cannot run it
    reason = kernels.select_why_not(scores)
    assert reason is not None
    assert not kernels.runs("tokenprune.select", lambda: reason)  # auto: eager fallback
    with backends.use_backend("reference", family="tokenprune"):
        assert not kernels.runs("tokenprune.select", lambda: None)  # reference even where the kernel could run
    with backends.use_backend("triton", family="tokenprune"), pytest.raises(ValueError, match="backend='triton'"):
        kernels.runs("tokenprune.select", lambda: reason)
