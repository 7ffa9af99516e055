"""``caching.cached`` once CUDA is in use: a kept value is built on another thread (outside any CUDA-graph pool the
caller's thread allocates into), after that thread waited on the caller's stream, and synchronised before it is
handed over; errors reach the caller; nothing is built during a capture. The CUDA runtime is replaced by a recorder
here (no GPU in CI); tests/kernels/test_cuda_graphs_gpu.py checks the real pool under reduce-overhead."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from visattn import caching


class _Stream:
    def __init__(self, log: list, name: str):
        self.log, self.name, self.device = log, name, "cuda:0"

    def wait_stream(self, other: _Stream) -> None:
        self.log.append(("wait", self.name, other.name, threading.current_thread().name))

    def synchronize(self) -> None:
        self.log.append(("sync", self.name, threading.current_thread().name))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a process that has initialised CUDA: each thread has its own current stream."""
    log: list = []
    state = {"capturing": False}
    main = threading.current_thread()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream(
        log, "caller" if threading.current_thread() is main else "worker-default"))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return log, state


def test_a_kept_value_is_built_on_another_thread_after_the_callers_stream(fake_cuda):
    log, _ = fake_cuda
    seen = {}

    def build():
        seen["thread"] = threading.current_thread()
        seen["inference"] = torch.is_inference_mode_enabled()
        log.append(("build",))
        return torch.arange(3)

    store: dict = {}
    with torch.inference_mode():
        value = caching.cached(store, "k", build)
    assert seen["thread"] is not threading.current_thread()
    assert seen["inference"] is False  # a kept tensor is never an inference tensor
    assert torch.equal(store["k"], torch.arange(3)) and value is store["k"]
    kinds = [entry[0] for entry in log]
    assert kinds == ["wait", "build", "sync"], log  # wait on the caller's stream, build, synchronise
    assert log[0][1:3] == ("worker-default", "caller")
    # a hit builds nothing
    assert caching.cached(store, "k", build) is value and [e[0] for e in log] == kinds


def test_build_errors_reach_the_caller(fake_cuda):
    def build():
        raise ValueError("bad table")

    with pytest.raises(ValueError, match="bad table"):
        caching.cached({}, "k", build)


def test_nothing_is_built_inside_a_capture(fake_cuda):
    _, state = fake_cuda
    state["capturing"] = True
    built = []
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        caching.cached({}, "k", lambda: built.append(1))
    assert built == []


def test_without_cuda_the_value_is_built_in_place():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    seen = {}
    caching.cached({}, "k", lambda: seen.setdefault("thread", threading.current_thread()))
    assert seen["thread"] is threading.current_thread()
