"""``ops._descriptor``: after the first (Triton-validated) descriptor of a view, later ones are copies of its
fields with the new tensor as base. Each must equal what Triton's own constructor builds for that tensor."""

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


def test_copied_descriptors_equal_freshly_built_ones():
    ops._DESCRIPTOR_FIELDS.clear()
    # a NAT-T 28x28 key view ([B * L0, L1, L2, heads, D] with L0 = 1) and a second geometry of other strides
    views = {torch.bfloat16: ops.KVDescriptor((4, 28, 28, 4, 32), (28 * 28 * 4 * 32, 28 * 4 * 32, 4 * 32, 32, 1),
                                              (1, 8, 8, 1, 32)),
             torch.float16: ops.KVDescriptor((2, 14, 14, 8, 64), (14 * 14 * 8 * 64 * 3, 14 * 8 * 64 * 3,
                                                                  8 * 64 * 3, 64, 1), (1, 4, 16, 1, 64))}
    for dtype, view in views.items():
        size = view.strides[0] * view.shape[0]
        tensors = [torch.zeros(size, dtype=dtype) for _ in range(3)]
        first = ops._descriptor(tensors[0], view)
        assert (view, dtype) in ops._DESCRIPTOR_FIELDS  # validated once, then remembered
        for t in tensors[1:]:
            made = ops._descriptor(t, view)
            want = ops.TensorDescriptor(t, list(view.shape), list(view.strides), list(view.block))
            _same_fields(made, want, t)
            assert made is not first and first.base is tensors[0]  # the first one keeps its own base
    assert len(ops._DESCRIPTOR_FIELDS) == 2  # one entry per (view, dtype)


def test_reuse_switched_off_builds_every_descriptor():
    ops._DESCRIPTOR_FIELDS.clear()
    view = ops.KVDescriptor((2, 14, 14, 8, 32), (14 * 14 * 8 * 32, 14 * 8 * 32, 8 * 32, 32, 1), (1, 8, 8, 1, 32))
    previous, ops.DESCRIPTOR_FIELD_REUSE = ops.DESCRIPTOR_FIELD_REUSE, False
    try:
        tensors = [torch.zeros(view.strides[0] * 2, dtype=torch.bfloat16) for _ in range(2)]
        made = [ops._descriptor(t, view) for t in tensors]
        for desc, t in zip(made, tensors, strict=True):
            want = ops.TensorDescriptor(t, list(view.shape), list(view.strides), list(view.block))
            _same_fields(desc, want, t)
    finally:
        ops.DESCRIPTOR_FIELD_REUSE = previous
