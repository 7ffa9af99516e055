"""``visattn.bench.common.kernel_gpu_ms`` (the per-kernel GPU time the profiling scripts report) on a real CUDA
matmul: kernels are found with positive times, and work done outside ``fn`` is not counted."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_kernel_gpu_ms_names_the_kernels_of_one_call():
    from visattn.bench.common import kernel_gpu_ms

    a = torch.randn(1024, 1024, device="cuda")
    torch.cos(a)  # outside fn: must not appear
    found = kernel_gpu_ms(lambda: a @ a)
    assert found and all(ms > 0 for ms in found.values())
    assert not any("cos" in name for name in found), found
    assert sum(found.values()) < 50, found  # one 1024^3 matmul, not the profiler's own setup
