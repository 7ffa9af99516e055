"""Host-side path choice of the engine (``ops.cell_box``): the geometries the small-map path must decline on the
GPU. No kernel runs; the compiled-GPU case is selected by clearing ``ops.INTERPRETED`` for the call."""

from __future__ import annotations

import pytest

from visattn.kernels import ops

SWIN_5X5 = ops.make_pattern(2, True, (5, 5), (1, 1), (1, 1), (False, False), (3, 3))
LENGTHS = (1, 35, 20)  # the sweep problem that failed on an H100 (check-h100-2026-12-06-run4-failed.json)


def _box(monkeypatch, head_dim: int, rpb: bool, interpreted: bool):
    monkeypatch.setattr(ops, "INTERPRETED", interpreted)
    return ops.cell_box.__wrapped__(SWIN_5X5, LENGTHS, head_dim, head_dim, 2, 2, rpb, False)


def test_gpu_bias_at_head_dim_16_takes_the_tiled_path(monkeypatch):
    cb = _box(monkeypatch, 16, True, interpreted=False)
    assert cb.box is None
    assert "head_dim <= 16" in cb.reason


@pytest.mark.parametrize("head_dim,rpb,interpreted", [(32, True, False), (16, False, False), (16, True, True)])
def test_other_small_windows_keep_the_cell_path(monkeypatch, head_dim, rpb, interpreted):
    cb = _box(monkeypatch, head_dim, rpb, interpreted)
    assert cb.box == (1, 8, 8), cb.reason


class _CudaLike:
    """What ``window_why_not``'s guard reads of a tensor, for a CUDA tensor this CPU machine cannot make."""

    def __init__(self, rank: int, requires_grad: bool, dtype=None):
        import torch

        self._dim = rank + 3
        self.is_cuda = True
        self.requires_grad = requires_grad
        self.dtype = dtype or torch.bfloat16

    def dim(self) -> int:
        return self._dim


@pytest.mark.parametrize("rank,rpb,grad,refused", [(3, True, True, True), (3, True, False, False),
                                                   (3, False, True, False), (2, True, True, False)])
def test_window_3d_rpb_under_autograd_is_refused_on_cuda(monkeypatch, rank, rpb, grad, refused):
    import visattn.kernels as kernels

    monkeypatch.setattr(kernels, "_common_why_not", lambda *a: None)  # the device and size checks pass
    q, k, v = (_CudaLike(rank, grad) for _ in range(3))
    table = _CudaLike(rank, False) if rpb else None
    why = kernels.window_why_not(q, k, v, (5,) * rank, (0,) * rank, table)
    assert (why is not None) == refused, why
    if refused:
        assert "3-D window attention with an rpb" in why


def test_bfloat16_under_the_interpreter_is_refused(monkeypatch):
    import torch

    import visattn
    import visattn.kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q16, qb = torch.zeros(1, 8, 8, 2, 16, dtype=torch.float16), torch.zeros(1, 8, 8, 2, 16, dtype=torch.bfloat16)
    args = ((3, 3), (1, 1), (1, 1), (False, False), None, None, None)
    assert "bfloat16 under the Triton interpreter" in kernels.na_why_not(qb, qb, qb, *args)
    assert "bfloat16" not in (kernels.na_why_not(q16, q16, q16, *args) or "")
    with pytest.raises(ValueError, match="bfloat16 under the Triton interpreter"):
        visattn.na2d(qb, qb, qb, 3, backend="triton")
