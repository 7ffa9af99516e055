"""Problems the GPU sweep (`visattn check`) failed, replayed with its own judge (the float64 brute force).

From check-h100-2026-12-06-run4-failed.json (H100, torch 2.11, triton 3.6). On that machine both were wrong on every
replay, in float16 and bfloat16, in every layout and at batch 1, and right without a bias:

* the 2-D shifted window at head_dim 16: the small-map backward gave a wrong dK (tf32x3 bias bins; right with ieee
  products, with 2 or 8 warps, or split in 32-row blocks). Such calls now take the tiled path, which was right on it.
* the 3-D window at head_dim 64 on the tiled path: dQ and the bias gradient wrong, dK/dV right (so the delta the
  dQ pass stores is right). Replayed with one launch choice changed at a time, it was right with the dQ pass
  unpipelined (1 stage) or at 2 or 8 warps: the per-pair dS buffer's dQ pass now runs with one stage on CUDA.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

WINDOW_2D_HEAD_DIM_16 = dict(index=353, rank=2, heads=1, seed=786892907, op="window", dtype="bfloat16",
                             layout="fused_qkv", head_dim=16, rpb=True, lengths=[35, 20], window=[5, 5],
                             shift=[3, 3], batch=4)
WINDOW_3D_HEAD_DIM_64 = dict(index=72, rank=3, heads=3, seed=863816899, op="window", dtype="bfloat16",
                             layout="fused_qkv", head_dim=64, rpb=True, lengths=[20, 26, 14], window=[5, 1, 2],
                             shift=[3, 0, 0], batch=4)


def _replay(problem: dict) -> dict:
    from visattn.bench import check

    return check.run_problem(dict(problem))


def test_window_2d_bias_head_dim_16():
    result = _replay(WINDOW_2D_HEAD_DIM_16)
    assert result["ok"], result


def test_window_3d_bias_head_dim_64():
    result = _replay(WINDOW_3D_HEAD_DIM_64)
    assert result["ok"], result
