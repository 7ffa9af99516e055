"""The eager fast path of repeated calls (``functional._VALIDATED``): a call that chose the fused kernels is
remembered by its geometry and arguments; a repeat skips the checks, and anything that changes the checks' verdict or
the backend choice (another shape, a bad argument, a new default backend, tracing) takes the full path again."""

from __future__ import annotations

import pytest
import torch

from visattn import backends, functional, reference


@pytest.fixture
def fake_kernels(monkeypatch):
    """CPU stand-ins for the fused kernels (the reference), counting calls; every call may run on "triton"."""
    calls = []

    class Fake:
        @staticmethod
        def na(*args, **kwargs):
            calls.append("na")
            return reference.na(*args[:8], args[8], args[9], args[10], return_lse=kwargs.get("return_lse", False))

        @staticmethod
        def window(*args):
            calls.append("window")
            return reference.window(*args)

        @staticmethod
        def prepare_na(q, k, v, kernel, dilation, stride, causal, rpb, scale, extra_k, extra_v, return_lse):
            def replay(q, k, v, rpb, extra_k, extra_v):
                return Fake.na(q, k, v, kernel, dilation, stride, causal, rpb, scale, extra_k, extra_v,
                               return_lse=return_lse)

            return replay

        @staticmethod
        def prepare_window(q, k, v, window, shift, rpb, scale):
            return lambda q, k, v, rpb, extra_k, extra_v: Fake.window(q, k, v, window, shift, rpb, scale)

    monkeypatch.setattr(functional, "_kernels", Fake)
    monkeypatch.setattr(functional, "_triton_why_not", lambda *args: None)
    monkeypatch.setattr(functional, "_VALIDATED", {})
    return calls


def _qkv(shape=(2, 6, 7, 2, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def test_repeat_calls_skip_the_checks_and_give_the_same_result(fake_kernels, monkeypatch):
    q, k, v = _qkv()
    rpb = torch.randn(2, 5, 5)
    first = functional.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, backend="triton")
    assert len(functional._VALIDATED) == 1

    def no_checks(*args, **kwargs):
        raise AssertionError("the checks ran on a remembered call")

    checks = functional._check_qkv
    monkeypatch.setattr(functional, "_check_qkv", no_checks)
    again = functional.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, backend="triton")
    monkeypatch.setattr(functional, "_check_qkv", checks)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    q2, k2, v2 = _qkv(seed=1)  # a replay runs on the tensors it is given
    monkeypatch.setattr(functional, "_check_qkv", no_checks)
    other = functional.na2d(q2, k2, v2, 3, dilation=(1, 2), rpb=rpb, backend="triton")
    monkeypatch.setattr(functional, "_check_qkv", checks)
    torch.testing.assert_close(other, reference.na(q2, k2, v2, (3, 3), (1, 2), (1, 1), (False, False), rpb,
                                                   8 ** -0.5, None, None))
    assert fake_kernels == ["na", "na", "na"]
    want = reference.na(q, k, v, (3, 3), (1, 2), (1, 1), (False, False), rpb, 8 ** -0.5, None, None)
    torch.testing.assert_close(first, want)
    out = functional.window_attention(q[:, :6, :6], k[:, :6, :6], v[:, :6, :6], 3, shift=1, backend="triton")
    torch.testing.assert_close(out, reference.window(q[:, :6, :6], k[:, :6, :6], v[:, :6, :6], (3, 3), (1, 1), None,
                                                     8 ** -0.5))


def test_anything_that_changes_the_verdict_takes_the_full_path(fake_kernels):
    q, k, v = _qkv()
    rpb = torch.randn(2, 5, 5)
    functional.na2d(q, k, v, 3, rpb=rpb, backend="triton")
    with pytest.raises(ValueError, match="rpb"):  # same call, a wrong table
        functional.na2d(q, k, v, 3, rpb=torch.randn(2, 7, 7), backend="triton")
    with pytest.raises(ValueError, match="kernel_size"):  # another kernel size that does not fit
        functional.na2d(q, k, v, 9, backend="triton")
    with pytest.raises(TypeError, match="query"):  # not a tensor
        functional.na2d(q.numpy(), k, v, 3, backend="triton")
    with pytest.raises(ValueError, match="key"):  # a key of another shape
        functional.na2d(q, k[:1], v, 3, rpb=rpb, backend="triton")
    # a new default backend: the remembered "triton" verdict for backend=None no longer applies
    previous = backends.get_backend("attention")
    backends.set_backend("triton", "attention")
    try:
        functional.na2d(q, k, v, 3, rpb=rpb)
        functional.na2d(q, k, v, 3, rpb=rpb)
        assert functional.last_backend() == "triton"
        backends.set_backend("reference", "attention")
        functional.na2d(q, k, v, 3, rpb=rpb)
        assert functional.last_backend() == "reference"
    finally:
        backends.set_backend(previous, "attention")


def test_a_list_argument_is_checked_every_time(fake_kernels):
    q, k, v = _qkv()
    functional.na2d(q, k, v, [3, 3], backend="triton")  # unhashable: never remembered
    assert functional._VALIDATED == {}


def test_grad_mode_and_requires_grad_are_part_of_the_key(fake_kernels, monkeypatch):
    """A verdict remembered without autograd does not carry over to a differentiated call (a why_not may refuse
    those)."""
    def refuse_differentiated(op, q, *args):
        return "differentiated" if torch.is_grad_enabled() and q.requires_grad else None

    monkeypatch.setattr(functional, "_triton_why_not", refuse_differentiated)
    q, k, v = _qkv((2, 6, 6, 2, 8))
    with torch.no_grad():
        functional.window_attention(q.requires_grad_(), k, v, 3, backend="triton")
    assert len(functional._VALIDATED) == 1
    functional.window_attention(q.detach(), k, v, 3, backend="triton")  # grad mode on, nothing requires grad
    assert fake_kernels == ["window", "window"]
    with pytest.raises(ValueError, match="differentiated"):
        functional.window_attention(q, k, v, 3, backend="triton")
    assert fake_kernels == ["window", "window"]
