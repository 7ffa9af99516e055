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


def test_window_3d_rpb_under_autograd_runs_the_kernels(monkeypatch):
    """The fence of 2026-12-06 (3-D window + rpb under autograd sent to the reference) is lifted: the dQ pass's
    pipelining was the cause (tests/kernels/test_check_regressions_gpu.py replays the problem on a GPU)."""
    import visattn.kernels as kernels

    monkeypatch.setattr(kernels, "_common_why_not", lambda *a: None)  # the device and size checks pass
    q, k, v = (_CudaLike(3, True) for _ in range(3))
    assert kernels.window_why_not(q, k, v, (5, 5, 5), (0, 0, 0), _CudaLike(3, True)) is None


def test_per_pair_buffer_dq_pass_runs_unpipelined_on_cuda(monkeypatch):
    """The dQ pass that writes the per-pair dS buffer (1-D / 3-D biases) is planned with one pipeline stage on CUDA:
    with two, triton 3.6 compiled a wrong dQ for a 3-D window on an H100."""
    import torch

    from visattn.kernels import ops

    monkeypatch.setattr(ops, "INTERPRETED", False)
    q = torch.zeros(2, 6, 5, 4, 2, 64)
    pat = ops.make_pattern(3, True, (5, 1, 2), (1, 1, 1), (1, 1, 1), (False,) * 3, (2, 0, 1))
    plan = ops._backward_plan(q, q, q, q, q, q[..., 0], torch.zeros(2, 9, 1, 3), None, None, pat, 0.125, None)
    assert plan.rpb_mode == "dsn" and plan.dq.options["num_stages"] == 1
    q2 = torch.zeros(2, 6, 5, 2, 64)
    pat2 = ops.make_pattern(2, False, (3, 3), (1, 1), (1, 1), (False,) * 2, (0, 0))
    plan2 = ops._backward_plan(q2, q2, q2, q2, q2, q2[..., 0], None, None, None, pat2, 0.125, None)
    assert plan2.dq.options["num_stages"] > 1


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


def test_engine_path_names_the_bias_tiles():
    """A trained 2-D bias on the tiled path says it is read from expanded tiles; a 3-D one (per-pair buffer) does
    not, nor does a call without a bias."""
    import torch

    import visattn.kernels as kernels

    q = torch.zeros(2, 28, 28, 4, 32, dtype=torch.float16)
    args = ((7, 7), (1, 1), (1, 1), (False, False), (0, 0))
    path, why = kernels.engine_path(q, q, torch.zeros(4, 13, 13), None, False, *args)
    assert path == "tiled" and "bias expanded once per call" in why, why
    path, why = kernels.engine_path(q, q, None, None, False, *args)
    assert "bias expanded" not in why, why
    # the tiled path also names its loads: tensor descriptors (TMA) need a Hopper GPU (CPU tensors cannot take
    # them), dilation keeps pointer loads, and VISATTN_KV_DESC=0 switches them off
    assert "pointer loads" in why and "compute capability 9.0" in why, why
    from visattn.kernels import ops

    previous = ops.KV_DESCRIPTORS
    ops.KV_DESCRIPTORS = False
    try:
        path, why = kernels.engine_path(q, q, None, None, False, *args)
        assert "pointer loads" in why and "VISATTN_KV_DESC=0" in why, why
    finally:
        ops.KV_DESCRIPTORS = previous
    ops.KV_DESCRIPTORS = True
    try:
        path, why = kernels.engine_path(q, q, None, None, False, *args)
        assert "pointer loads" in why and "compute capability 9.0" in why, why
        q_big = torch.zeros(1, 64, 64, 2, 32, dtype=torch.float16)  # 32x32 dilation groups: the tiled path
        path, why = kernels.engine_path(q_big, q_big, None, None, False, (7, 7), (2, 2), (1, 1), (False, False),
                                        (0, 0))
        assert path == "tiled" and "pointer loads (dilation" in why, (path, why)
    finally:
        ops.KV_DESCRIPTORS = previous
    q3 = torch.zeros(2, 12, 12, 12, 2, 32, dtype=torch.float16)
    path, why = kernels.engine_path(q3, q3, torch.zeros(2, 5, 5, 5), None, False, (3, 3, 3), (1, 1, 1), (1, 1, 1),
                                    (False,) * 3, (0, 0, 0))
    assert path == "tiled" and "bias expanded" not in why, why


def test_routing_path_names_the_schedule(monkeypatch):
    """BiFormer-T's stages: the 14x14 map (7x7 regions) takes the region forward and the map backward by default
    ("mixed"), both passes on the map schedule when ``MAP_PASSES`` says so; 28x28 and 56x56 the region schedule,
    each with its reason; padding to the region grid counts (13x13 pads to 14x14), and more than 64 regions (one
    bit each) decline the map schedule."""
    import visattn.kernels as kernels
    from visattn.kernels import routing

    path, why = kernels.routing_path(14, 14, (7, 7))
    assert path == "mixed" and "196 tokens" in why and "backward takes the map" in why, why
    assert kernels.routing_path(13, 13, (7, 7))[0] == "mixed"
    monkeypatch.setattr(routing, "MAP_PASSES", ("fwd", "bwd"))
    assert kernels.routing_path(14, 14, (7, 7))[0] == "map"
    monkeypatch.setattr(routing, "MAP_PASSES", ())
    assert kernels.routing_path(14, 14, (7, 7))[0] == "regions"
    for side in (28, 56):
        path, why = kernels.routing_path(side, side, (7, 7))
        assert path == "regions" and f"{side * side} tokens exceed" in why, why
    path, why = kernels.routing_path(9, 9, (9, 9))
    assert path == "regions" and "81 regions exceed" in why, why


def test_engine_path_names_the_dkv_stats_reads(monkeypatch):
    """Where descriptors are taken, a non-default ``DKV_STATS`` is named; the default ("rows") adds nothing; a bad
    ``VISATTN_DKV_STATS`` is refused at import, naming the variable."""
    import os
    import subprocess
    import sys

    import torch

    import visattn.kernels as kernels
    from visattn.kernels import ops

    q = torch.zeros(1, 32, 32, 2, 64, dtype=torch.float16)
    args = ((9, 9), (1, 1), (1, 1), (False, False), (0, 0))
    monkeypatch.setattr(ops, "kv_descriptor_why_not", lambda t3, pat: None)
    path, why = kernels.engine_path(q, q, None, None, False, *args)
    assert path == "tiled" and "TMA tensor descriptors" in why and "LSE / delta" not in why, why
    monkeypatch.setattr(ops, "DKV_STATS", "pointer")
    path, why = kernels.engine_path(q, q, None, None, False, *args)
    assert "LSE / delta from their head-major copy (pointer" in why, why
    bad = subprocess.run([sys.executable, "-c", "import visattn.kernels.ops"], capture_output=True, text=True,
                         env={**os.environ, "VISATTN_DKV_STATS": "tma"})
    assert bad.returncode != 0 and "VISATTN_DKV_STATS='tma'" in bad.stderr, bad.stderr[-300:]
