"""The packed-qkv path under TRITON_INTERPRET=1: an eager call on a fused projection's ``qkv`` ``[B, *spatial, 3, heads,
D]`` that autograd records runs as one autograd node on ``qkv`` (``ops._PackedLocalAttention``), whose backward
writes dq, dk, dv straight into one packed gradient (the kernels store through the views' strides). The output, the
packed gradient and the bias gradient must match the float64 oracle on the tiled and the small-map kernels, in 1-D,
2-D (dilated, with a trained 16-bit bias, whose float32 output the dual store serves) and 3-D; the nn module must
take the path and match the same module on the reference backend; ``ops.PACKED_QKV = False``
(``VISATTN_PACKED_QKV=0``) must send the call to the kernels on the views. Shifted Swin / Video-Swin windows
(``functional._window_packed``, ``visattn.nn.WindowAttention``) take the same path."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted

CASES = [  # (spatial, heads, head_dim, kernel, dilation, bias, dtype)
    ((13,), 2, 16, (5,), (2,), True, "float32"),
    ((9, 10), 2, 16, (3, 5), (1, 2), True, "float16"),
    ((8, 9), 1, 32, (3, 3), (1, 1), False, "float32"),
    ((4, 5, 6), 1, 16, (3, 3, 3), (1, 1, 1), False, "float32"),
]
WINDOW_CASES = [  # (spatial, heads, head_dim, window, shift, bias, dtype)
    ((8, 12), 2, 16, (4, 4), (2, 1), True, "float16"),
    ((4, 4, 6), 1, 16, (2, 2, 3), (1, 0, 1), False, "float32"),
]


def run_case() -> dict:
    """Child-process body: per case and kernel path, which node autograd recorded and the errors against
    float64; then the 2-D module against its reference-backend twin."""
    import copy

    import oracle
    import torch

    import visattn
    from visattn import functional
    from visattn.kernels import ops

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    result: dict = {"cases": []}
    gen = torch.Generator().manual_seed(11)
    for small_map in (False, True):
        ops.SMALL_MAP = small_map
        for spatial, heads, d, kernel, dil, bias, dtype in CASES:
            rank = len(spatial)
            dt = getattr(torch, dtype)
            qkv = torch.randn(2, *spatial, 3, heads, d, generator=gen).to(dt).requires_grad_(True)
            rpb = None
            if bias:
                rpb = (torch.randn(heads, *(2 * k - 1 for k in kernel), generator=gen) * 0.5).to(dt)
                rpb.requires_grad_(True)
            g = torch.randn(2, *spatial, heads, d, generator=gen).to(dt)
            with functional.track_backends() as used:
                out = functional._na_packed(rank, qkv, kernel, 1, dil, False, None, rpb, "triton")
            node = type(out.grad_fn).__name__ if out.grad_fn is not None else None
            leaves = [qkv] + ([rpb] if bias else [])
            got = torch.autograd.grad(out, leaves, g)
            # a repeat replays the prepared call (its plans); after a cleared plan cache it is prepared again
            replays = []
            for clear in (False, True):
                if clear:
                    ops._PLANS.clear()
                again = functional._na_packed(rank, qkv, kernel, 1, dil, False, None, rpb, "triton")
                replays.append(bool(torch.equal(again, out)) and all(
                    torch.equal(a, b) for a, b in zip(torch.autograd.grad(again, leaves, g), got, strict=True)))
            ref_qkv = qkv.detach().double().requires_grad_(True)
            ref_rpb = None if rpb is None else rpb.detach().double().requires_grad_(True)
            ref = oracle.na_oracle(*ref_qkv.unbind(-3), kernel, (1,) * rank, dil, (False,) * rank,
                                   scale=d**-0.5, rpb=ref_rpb)
            want = torch.autograd.grad(ref, [ref_qkv] + ([ref_rpb] if bias else []), g.double())
            result["cases"].append({
                "case": f"{spatial} {dtype} bias={bias} small_map={small_map}", "backend": dict(used),
                "node": node, "out_dtype": str(out.dtype), "dtype": str(dt), "replays_equal": replays,
                "err": {"out": rel(out, ref.detach()),
                        **{n: rel(a, b) for n, a, b in zip(("dqkv", "drpb"), got, want, strict=False)}}})

    for spatial, heads, d, window, shift, bias, dtype in WINDOW_CASES:  # Swin / Video-Swin windows, shifted
        dt = getattr(torch, dtype)
        qkv = torch.randn(2, *spatial, 3, heads, d, generator=gen).to(dt).requires_grad_(True)
        rpb = (torch.randn(heads, *(2 * w - 1 for w in window), generator=gen) * 0.5).to(dt) if bias else None
        leaves = [qkv] + ([rpb.requires_grad_(True)] if bias else [])
        g = torch.randn(2, *spatial, heads, d, generator=gen).to(dt)
        with functional.track_backends() as used:
            out = functional._window_packed(qkv, window, shift, rpb, None, "triton")
        got = torch.autograd.grad(out, leaves, g)
        again = functional._window_packed(qkv, window, shift, rpb, None, "triton")  # replays the prepared call
        replayed = bool(torch.equal(again, out)) and all(
            torch.equal(a, b) for a, b in zip(torch.autograd.grad(again, leaves, g), got, strict=True))
        high = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = oracle.window_oracle(*high[0].unbind(-3), window, shift, rpb=high[1] if bias else None)
        want = torch.autograd.grad(ref, high, g.double())
        result["cases"].append({
            "case": f"window {spatial} {window} shift {shift} {dtype} bias={bias}", "backend": dict(used),
            "node": type(out.grad_fn).__name__, "out_dtype": str(out.dtype), "dtype": str(dt),
            "replays_equal": [replayed, replayed],
            "err": {"out": rel(out, ref.detach()),
                    **{n: rel(a, b) for n, a, b in zip(("dqkv", "drpb"), got, want, strict=False)}}})

    ops.PACKED_QKV = False  # the escape hatch: the kernels on the three views
    qkv = torch.randn(1, 8, 8, 3, 1, 16, generator=gen).requires_grad_(True)
    result["hatch_node"] = type(functional._na_packed(2, qkv, 3, 1, 1, False, None, None, "triton").grad_fn).__name__
    ops.PACKED_QKV = True

    ops.SMALL_MAP = True
    torch.manual_seed(3)
    module = visattn.nn.NeighborhoodAttention2D(32, 2, 3, dilation=2, rel_pos_bias=True, backend="triton")
    twin = copy.deepcopy(module).double()
    twin.backend = "reference"
    x = torch.randn(2, 9, 11, 32, generator=gen)
    with functional.track_backends() as used:
        y = module(x)
    y_ref = twin(x.double())
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, list(module.parameters()), g)
    want = torch.autograd.grad(y_ref, list(twin.parameters()), g.double())
    result["module"] = {"backend": dict(used), "node": type(y.grad_fn.next_functions[0][0]).__name__,
                        "err": max([rel(y, y_ref.detach())] + [rel(a, b) for a, b in zip(got, want, strict=True)])}

    module = visattn.nn.WindowAttention(32, 4, 2, shift_size=2, backend="triton")  # pads 9 x 11 to 12 x 12
    twin = copy.deepcopy(module).double()
    twin.backend = "reference"
    with functional.track_backends() as used:
        y = module(x)
    y_ref = twin(x.double())
    got = torch.autograd.grad(y, list(module.parameters()), g)
    want = torch.autograd.grad(y_ref, list(twin.parameters()), g.double())
    result["window_module"] = {
        "backend": dict(used), "err": max([rel(y, y_ref.detach())] + [rel(a, b) for a, b in zip(got, want,
                                                                                               strict=True)])}
    return result


@pytest.mark.interpret
def test_packed_qkv_matches_float64_with_one_packed_gradient():
    res = run_case_interpreted(__file__)
    assert len(res["cases"]) == 2 * len(CASES) + len(WINDOW_CASES)
    for case in res["cases"]:
        assert case["backend"] == {"triton": 1}, case
        assert case["node"] == "_PackedLocalAttentionBackward", case
        assert case["out_dtype"] == case["dtype"], case
        assert case["replays_equal"] == [True, True], case
        limit = 1e-2 if case["dtype"] == "torch.float16" else 1e-4
        assert max(case["err"].values()) < limit, case
    assert res["hatch_node"] == "_LocalAttentionBackward", res["hatch_node"]
    assert res["module"]["backend"] == {"triton": 1}, res["module"]
    assert res["module"]["err"] < 1e-4, res["module"]
    assert res["window_module"]["backend"] == {"triton": 1}, res["window_module"]
    assert res["window_module"]["err"] < 1e-4, res["window_module"]


def test_packed_qkv_checks_name_the_argument():
    import torch

    from visattn import functional

    qkv = torch.randn(1, 8, 8, 2, 2, 16, requires_grad=True)  # 2 where the packed dim holds 3
    with pytest.raises(ValueError, match="qkv"):
        functional._na_packed(2, qkv, 3, 1, 1, False, None, None, None)
    qkv = torch.randn(1, 8, 8, 3, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="kernel_size"):
        functional._na_packed(2, qkv, 9, 1, 1, False, None, None, None)
