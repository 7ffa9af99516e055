"""The packed-qkv path under ``torch.compile`` (TRITON_INTERPRET=1): a traced call on a fused projection's ``qkv`` ``[B,
*spatial, 3, heads, D]`` must hold the packed custom ops (``visattn::local_attention_packed_fwd`` in the forward
graph, ``..._packed_bwd`` in the backward graph; no op on the three views, whose gradients a compiled graph would
copy into one tensor), for neighborhoods and shifted windows, pass ``torch.library.opcheck``, and give the output,
the packed gradient and the bias gradient of the float64 oracle and of the eager call. Runs in a child process
(tests/interpreted.py)."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted

CASES = [  # (spatial, heads, head_dim, kernel or window, dilation or shift, window, bias, dtype)
    ((9, 10), 2, 16, (3, 5), (1, 2), False, True, "float16"),
    ((4, 5, 6), 1, 16, (3, 3, 3), (1, 1, 1), False, False, "float32"),
    ((8, 12), 2, 16, (4, 4), (2, 1), True, True, "float32"),
]


def run_case() -> dict:
    """Child-process body: opcheck of the packed forward op, then per case the ops in the compiled forward and
    backward graphs and the errors of the compiled call against float64 and against the eager call."""
    import oracle
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from visattn import functional
    from visattn.kernels import ops

    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max())

    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 6, 7, 3, 2, 16, generator=gen)
    rpb = torch.randn(2, 5, 5, generator=gen).requires_grad_(True)
    # schema and fake implementation (autograd is an autograd.Function around the op pair, exercised below)
    checks = torch.library.opcheck(
        ops.local_attention_packed_fwd, (qkv, rpb.detach(), False, [3, 3], [1, 1], [1, 1], [False, False], [0, 0],
                                         0.25, False), test_utils=("test_schema", "test_faketensor"))
    result: dict = {"opcheck": {name: verdict == "SUCCESS" for name, verdict in checks.items()}, "cases": []}

    for spatial, heads, d, kernel, dil, window, bias, dtype in CASES:
        rank = len(spatial)
        graphs: list[set] = []

        def record(gm, _inputs, graphs=graphs):
            graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
            return make_boxed_func(gm.forward)

        def call(qkv, rpb, rank=rank, kernel=kernel, dil=dil, window=window):
            if window:  # dil: the shift
                return functional._window_packed(qkv, kernel, dil, rpb, None, "triton")
            return functional._na_packed(rank, qkv, kernel, 1, dil, False, None, rpb, "triton")

        compiled = torch.compile(call, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
        dt = getattr(torch, dtype)
        base = torch.randn(2, *spatial, 3, heads, d, generator=gen).to(dt)
        table = (torch.randn(heads, *(2 * k - 1 for k in kernel), generator=gen) * 0.5).to(dt) if bias else None
        g = torch.randn(2, *spatial, heads, d, generator=gen).to(dt)
        runs = {}
        for name, fn in (("compiled", compiled), ("eager", call)):
            leaves = [base.clone().requires_grad_(True)] + ([table.clone().requires_grad_(True)] if bias else [])
            out = fn(leaves[0], leaves[1] if bias else None)
            runs[name] = (out.detach(), torch.autograd.grad(out, leaves, g))
        high = [base.double().requires_grad_(True)] + ([table.double().requires_grad_(True)] if bias else [])
        if window:
            want = oracle.window_oracle(*high[0].unbind(-3), kernel, dil, rpb=high[1] if bias else None)
        else:
            want = oracle.na_oracle(*high[0].unbind(-3), kernel, (1,) * rank, dil, (False,) * rank,
                                    scale=d**-0.5, rpb=high[1] if bias else None)
        g_want = torch.autograd.grad(want, high, g.double())
        (out_c, g_c), (out_e, g_e) = runs["compiled"], runs["eager"]
        result["cases"].append({
            "case": f"{spatial} window={window} {dtype} bias={bias}", "dtype": dtype,
            "graphs": [sorted(t for t in ops_ if "visattn" in t) for ops_ in graphs],
            "grad_shapes_ok": [tuple(a.shape) for a in g_c] == [tuple(t.shape) for t in high],
            "err_oracle": max([rel(out_c, want.detach())] + [rel(a, b) for a, b in zip(g_c, g_want, strict=True)]),
            "err_eager": max([rel(out_c, out_e)] + [rel(a, b) for a, b in zip(g_c, g_e, strict=True)])})
    return result


@pytest.mark.interpret
def test_compiled_packed_qkv_holds_the_packed_ops_and_matches_float64():
    res = run_case_interpreted(__file__)
    assert res["opcheck"] and all(res["opcheck"].values()), res["opcheck"]
    assert len(res["cases"]) == len(CASES)
    for case in res["cases"]:
        assert case["graphs"] == [["visattn.local_attention_packed_fwd.default"],
                                  ["visattn.local_attention_packed_bwd.default"]], case
        assert case["grad_shapes_ok"], case
        limit = 1e-2 if case["dtype"] == "float16" else 1e-4
        assert case["err_oracle"] < limit, case
        assert case["err_eager"] < limit, case
