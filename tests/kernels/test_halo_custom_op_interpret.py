"""The HaloNet kernels as torch.library custom ops (what a ``torch.compile`` graph holds, one opaque node per
call) under TRITON_INTERPRET=1: ``torch.library.opcheck`` on the forward (schema, fake tensor, autograd
registration), and a compiled function's output and gradients equal to the eager autograd path and to the float64
brute force of tests/test_functional_halo.py, with and without relative logits. Runs in a child process
(tests/interpreted.py)."""

from __future__ import annotations

from interpreted import run_case_interpreted


def run_case() -> dict:
    import importlib

    import torch
    from test_functional_halo import oracle

    import visattn

    halo_kernels = importlib.import_module("visattn.kernels.halo")
    g = torch.Generator().manual_seed(0)
    block, halo = (4, 4), (1, 1)
    q = torch.randn(2, 8, 8, 2, 8, generator=g)
    k = torch.randn(2, 8, 8, 2, 8, generator=g)
    v = torch.randn(2, 8, 8, 2, 8, generator=g)
    tables = [torch.randn(2 * 6 - 1, 8, generator=g) * 0.5 for _ in range(2)]
    rel = torch.einsum("bxynd,rd->bxynr", q, torch.cat(tables)).contiguous()
    checks = torch.library.opcheck(halo_kernels.halo_forward, (q, k, v, rel, list(block), list(halo), 0.3),
                                   test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    result = {"opcheck": {name: verdict == "SUCCESS" for name, verdict in checks.items()}, "cases": []}

    def call(q, k, v, *tabs):
        return visattn.halo_attention(q, k, v, block, halo, *(tabs or (None, None)), scale=0.3, backend="triton")

    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for with_rel in (True, False):
        base = [q, k, v, *tables] if with_rel else [q, k, v]
        weight = torch.randn(2, 8, 8, 2, 8, generator=g)
        errs = {}
        grads = {}
        for name, fn in (("compiled", compiled), ("eager", call)):
            leaves = [t.clone().requires_grad_(True) for t in base]
            out = fn(*leaves)
            grads[name] = (out.detach(), torch.autograd.grad((out * weight).sum(), leaves))
        high = [t.double().requires_grad_(True) for t in base]
        want = oracle(*high[:3], block, halo, *(high[3:] or [None, None]), 0.3)
        g_want = torch.autograd.grad((want * weight.double()).sum(), high)
        out_c, g_c = grads["compiled"]
        out_e, g_e = grads["eager"]
        errs["out_vs_eager"] = (out_c - out_e).abs().max().item()
        errs["out_vs_oracle"] = (out_c.double() - want).abs().max().item()
        errs["grad_vs_eager"] = max((a - b).abs().max().item() for a, b in zip(g_c, g_e, strict=True))
        errs["grad_vs_oracle"] = max((a.double() - b).abs().max().item() for a, b in zip(g_c, g_want, strict=True))
        result["cases"].append({"rel": with_rel, "grads": len(g_c), "errs": errs})
    return result


def test_halo_custom_ops_under_compile_match_eager_and_oracle():
    result = run_case_interpreted(__file__)
    assert result["opcheck"] and all(result["opcheck"].values()), result["opcheck"]
    assert [c["grads"] for c in result["cases"]] == [5, 3]
    for case in result["cases"]:
        assert case["errs"]["out_vs_eager"] <= 1e-6 and case["errs"]["grad_vs_eager"] <= 1e-5, case
        assert case["errs"]["out_vs_oracle"] <= 1e-4 and case["errs"]["grad_vs_oracle"] <= 1e-4, case
