"""``ops.kv_descriptor`` validates a view's descriptor through Triton once, when the plan is made, and keeps its
fields; ``ops._descriptor`` copies them with each call's tensor as base. Each copy must equal what Triton's own
constructor builds for that tensor."""

import dataclasses

import pytest
import torch

from visattn.kernels import ops

pytestmark = pytest.mark.skipif(ops.TensorDescriptor is None, reason="this Triton has no host tensor descriptors")


def _same_fields(made, want, base):
    assert type(made) is type(want)
    for field in dataclasses.fields(want):
        if field.name == "base":
            assert made.base is base
        else:
            assert getattr(made, field.name) == getattr(want, field.name), field.name


def _canonical(shape, dtype, channels=1):
    """A canonical 6-D view [B, L0, L1, L2, heads, D] of a fresh tensor; ``channels`` > 1 makes it a strided slice
    of a fused projection (as q/k/v of one qkv tensor)."""
    b, l1, l2, heads, d = shape
    return torch.zeros(b, 1, l1, l2, channels, heads, d, dtype=dtype)[:, :, :, :, 0]


def test_copied_descriptors_equal_freshly_built_ones():
    # a NAT-T 28x28 key view (L0 = 1) and a strided view of a fused qkv tensor, in two dtypes
    cases = [((4, 28, 28, 4, 32), torch.bfloat16, 1, (1, 8, 8), 32),
             ((2, 14, 14, 8, 64), torch.float16, 3, (1, 4, 16), 64)]
    for shape, dtype, channels, box, block_d in cases:
        tensors = [_canonical(shape, dtype, channels) for _ in range(3)]
        view = ops.kv_descriptor(tensors[0], box, block_d)
        assert view.fields is not None and "base" not in view.fields  # validated once, then remembered
        for t in tensors:
            made = ops._descriptor(t, view)
            want = ops.TensorDescriptor(t, list(view.shape), list(view.strides), list(view.block))
            _same_fields(made, want, t)


def test_reuse_switched_off_builds_every_descriptor():
    tensors = [_canonical((2, 14, 14, 8, 32), torch.bfloat16) for _ in range(2)]
    view = ops.kv_descriptor(tensors[0], (1, 8, 8), 32)
    previous, ops.DESCRIPTOR_FIELD_REUSE = ops.DESCRIPTOR_FIELD_REUSE, False
    try:
        for t in tensors:
            want = ops.TensorDescriptor(t, list(view.shape), list(view.strides), list(view.block))
            _same_fields(ops._descriptor(t, view), want, t)
    finally:
        ops.DESCRIPTOR_FIELD_REUSE = previous
