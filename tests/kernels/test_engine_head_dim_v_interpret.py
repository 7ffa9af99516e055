"""The fused engine with a value head dim different from the query's (``head_dim_v != head_dim``), forward and
every gradient (q, k, v, rpb), under TRITON_INTERPRET=1 against the float64 oracle, on the small-map and the tiled
kernels: the backward's dK and dV are written with their own tensors' strides. Also: one geometry run with two
output dtypes gets two launch plans."""

from __future__ import annotations

from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: neighborhood (2-D, rpb, dilation) and shifted window, D=16, Dv=32."""
    import oracle
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    gen = torch.Generator().manual_seed(5)
    errors = {}
    for name in ("na", "window", "na-tiled", "window-tiled"):  # small-map kernels (these maps fit), then tiled
        ops.SMALL_MAP = not name.endswith("tiled")
        q, k = (torch.randn(2, 9, 10, 2, 16, generator=gen) for _ in range(2))
        v = torch.randn(2, 9, 10, 2, 32, generator=gen)
        rpb = torch.randn(2, 5, 5, generator=gen)
        grad = torch.randn(2, 9, 10, 2, 32, generator=gen)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
        ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, rpb)]
        if name.startswith("na"):
            out = kernels.na(*leaves[:3], (3, 3), (1, 2), (1, 1), (False, False), leaves[3], 0.25, None, None)
            ref = oracle.na_oracle(*ref_leaves[:3], (3, 3), 1, (1, 2), (False, False), scale=0.25, rpb=ref_leaves[3])
        else:
            out = kernels.window(*leaves[:3], (3, 3), (1, 2), leaves[3], 0.25)
            ref = oracle.window_oracle(*ref_leaves[:3], (3, 3), (1, 2), rpb=ref_leaves[3], scale=0.25)
        got = torch.autograd.grad(out, leaves, grad)
        want = torch.autograd.grad(ref, ref_leaves, grad.double())
        errors[name] = max([(out.double() - ref).abs().max().item() / ref.abs().max().item()]
                           + [(a.double() - b).abs().max().item() / b.abs().max().item()
                              for a, b in zip(got, want, strict=True)])
    # one geometry, two output dtypes (a trained half-precision rpb keeps a float32 output): two launch plans, since
    # the compiled kernel is specialised on the output pointer's type
    ops.SMALL_MAP = False
    ops._PLANS.clear()
    pat = ops.make_pattern(2, False, (3, 3), (1, 1), (1, 1), (False, False), (0, 0))
    outs = [ops.forward(q, k, v, None, None, None, pat, 0.25, dtype)[0] for dtype in (None, torch.float64)]
    errors["plans"] = len([key for key in ops._PLANS if key[0] == "fwd"])
    errors["out_dtypes"] = [str(out.dtype) for out in outs]
    return errors


def test_value_head_dim_differs():
    errors = run_case_interpreted(__file__)
    assert errors.pop("plans") == 2 and errors.pop("out_dtypes") == ["torch.float32", "torch.float64"], errors
    assert all(err < 1e-5 for err in errors.values()), errors
