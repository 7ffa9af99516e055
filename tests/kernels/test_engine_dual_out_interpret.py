"""The tiled forward's two output stores, under TRITON_INTERPRET=1: where a trained bias asks for a float32 output
(for the backward's delta) and the inputs are 16-bit, one launch stores the float32 output and its 16-bit copy.
The copy must equal the float32 output rounded to the inputs' dtype, element for element; the float32 output, the
16-bit result the public call returns and every gradient (q, k, v, rpb) must match the float64 oracle; the custom
op (what compiled code calls) must return the same copy; and without a trained bias there is no second store."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: the plan's flag, the copy's exactness and the errors against float64."""
    import oracle
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    ops.SMALL_MAP = False  # the tiled kernels, where the float32 output lives
    gen = torch.Generator().manual_seed(5)
    heads, d, kernel = 2, 16, (3, 5)
    q, k, v, g = (torch.randn(2, 9, 10, heads, d, generator=gen).half() for _ in range(4))
    rpb = (torch.randn(heads, 5, 9, generator=gen) * 0.5).half()
    pat = ops.make_pattern(2, False, kernel, (1, 1), (1, 1), (False, False), (0, 0))
    scale = d**-0.5
    result: dict = {}

    out32, _, _, out_low = ops._forward(q, k, v, rpb, None, None, pat, scale, torch.float32)
    plans = [p for key, p in ops._PLANS.items() if key[0] == "fwd"]
    result["dual_plan"] = len(plans) == 1 and plans[0].dual_out and not plans[0].cells
    result["low_dtype"] = str(out_low.dtype) if out_low is not None else None
    result["copy_exact"] = out_low is not None and bool(torch.equal(out_low, out32.to(torch.float16)))
    result["no_copy_in_16bit"] = ops._forward(q, k, v, rpb, None, None, pat, scale)[3] is None

    fwd_op = torch.ops.visattn.local_attention_fwd.default
    op_out, _, op_out32 = fwd_op(q, k, v, rpb, None, None, False, list(kernel), [1, 1], [1, 1], [False, False],
                                 [0, 0], scale, True)
    result["op_copy_exact"] = bool(torch.equal(op_out, op_out32.to(torch.float16)))

    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, rpb)]
    out = kernels.na(*leaves[:3], kernel, (1, 1), (1, 1), (False, False), leaves[3], scale, None, None)
    result["public_dtype"] = str(out.dtype)
    got = torch.autograd.grad(out, leaves, g)
    refs = [t.double().requires_grad_(True) for t in (q, k, v, rpb)]
    ref = oracle.na_oracle(*refs[:3], kernel, (1, 1), (1, 1), (False, False), scale=scale, rpb=refs[3])
    want = torch.autograd.grad(ref, refs, g.double())

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    result["err"] = {"out32": rel(out32, ref.detach()), "out": rel(out, ref.detach()),
                     **{name: rel(a, b) for name, a, b in zip(("dq", "dk", "dv", "drpb"), got, want, strict=True)}}
    return result


@pytest.mark.interpret
def test_one_launch_stores_the_float32_output_and_its_16bit_copy():
    res = run_case_interpreted(__file__)
    assert res["dual_plan"] and res["low_dtype"] == "torch.float16", res
    assert res["copy_exact"] and res["op_copy_exact"], res
    assert res["no_copy_in_16bit"] and res["public_dtype"] == "torch.float16", res
    assert res["err"]["out32"] < 1e-3, res  # float32 output of 16-bit inputs: float32 accumulation only
    assert max(res["err"].values()) < 1e-2, res
