"""The engine's small-map path (``kernels/cells.py``: a whole dilation group or window per program, a one-pass
backward) under TRITON_INTERPRET=1 against the float64 oracle: forward and every gradient (q, k, v, rpb, the LSE's),
for neighborhood patterns (dilation, uneven groups, causal, stride, 1-D/2-D/3-D, head_dim_v != head_dim) and
(shifted) windows, with the path each case took checked, the bias gradient bitwise repeatable, and a traced call.
"""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted
from test_engine_interpret import CASES, TOL, _na

# name, op, spatial, heads, head_dim, params, rpb, extra keys, dtype, layout (as test_engine_interpret.CASES)
CELL_CASES = [
    ("cell-2d-rpb-128", "na", (7, 12), 2, 16, _na((5, 7), (1, 1), (1, 1), (False, False)), True, 0,
     "float32", "fused"),
    ("cell-2d-dil-uneven-causal-rpb", "na", (12, 9), 1, 16, _na((3, 3), (2, 2), (1, 1), (True, False)), True, 0,
     "float32", "permuted"),
    ("cell-2d-stride", "na", (7, 7), 2, 16, _na((5, 5), (1, 1), (2, 5), (False, False)), False, 0, "float32",
     "plain"),
    ("cell-2d-fp16-rpb-7x7", "na", (7, 7), 2, 32, _na((7, 7), (1, 1), (1, 1), (False, False)), True, 0, "float16",
     "fused"),
    ("cell-1d-dil-causal", "na", (20,), 2, 16, _na((5,), (2,), (1,), (True,)), False, 0, "float32", "fused"),
    ("cell-3d-dil", "na", (4, 5, 6), 1, 16, _na((3, 3, 3), (1, 1, 2), (1, 1, 1), (False, True, False)), False, 0,
     "float32", "plain"),
    ("cell-window-1d", "window", (12,), 1, 16, dict(window=(4,), shift=(2,)), False, 0, "float32", "fused"),
]
# the cases of the tiled sweep that the small-map path takes (the rest: extra keys, 1-D/3-D biases, sparse maps)
ON_CELLS = {"1d-fp16-blocked", "window-2d", "window-2d-shifted", "window-2d-fp16"} | {c[0] for c in CELL_CASES}


def run_case() -> dict:
    """Child-process body: errors and path of every case, then the LSE gradient, repeatability and tracing."""
    import oracle
    import test_engine_interpret as tiled
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    ops.POISON = True  # NaN-filled outputs: an element the kernels never write fails the comparison
    results, paths = {}, {}
    for i, case in enumerate(CASES + CELL_CASES):
        name, op, spatial, heads, d, params = case[:6]
        q, k, v, rpb, ek, ev, grad = tiled._make(case, torch.Generator().manual_seed(100 + i))
        present_mask = [t is not None for t in (q, k, v, rpb, ek, ev)]
        present = [t for t in (q, k, v, rpb, ek, ev) if t is not None]
        if op == "window":
            pat = ops.make_pattern(len(spatial), True, params["window"], (1,) * len(spatial),
                                   (1,) * len(spatial), (False,) * len(spatial), params["shift"])
        else:
            pat = ops.make_pattern(len(spatial), False, params["kernel"], params["dilation"], params["stride"],
                                   params["causal"], (0,) * len(spatial))
        paths[name] = "cells" if ops.engine_path(q, v, rpb, ek, pat).box else "tiled"
        if paths[name] != "cells":
            continue
        ours_in = [t.detach().requires_grad_(True) for t in present]
        ref_in = [t.detach().double().requires_grad_(True) for t in present]
        out = tiled._call_engine(kernels, op, params, d ** -0.5, tiled._unpack(ours_in, present_mask))
        ref = tiled._call_oracle(oracle, op, params, d ** -0.5, tiled._unpack(ref_in, present_mask))
        grads = torch.autograd.grad(out, ours_in, grad)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
        labels = ["out", "dq", "dk", "dv"] + ["drpb"] * (rpb is not None)
        results[name] = {label: float((a.double() - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")
                         for label, a, b in zip(labels, (out, *grads), (ref, *ref_grads), strict=False)}
    results["paths"] = paths

    # several batch items per program (NB = 4 and 2 over a batch of 3: the last group is partial), bias included
    ops.CELL_PROGRAMS = 1
    for name in ("window-2d-shifted", "cell-2d-fp16-rpb-7x7"):
        case = next(c for c in CASES + CELL_CASES if c[0] == name)
        op, params = case[1], case[5]
        gen = torch.Generator().manual_seed(11)
        q, k, v, rpb, _, _, _ = tiled._make(case, gen)
        q, k, v = (torch.cat([t, t[:1] * 0.5]) for t in (q, k, v))  # batch 3
        grad = torch.randn(q.shape, generator=gen).to(q.dtype)
        ours_in = [t.detach().requires_grad_(True) for t in (q, k, v, rpb)]
        ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v, rpb)]
        out = tiled._call_engine(kernels, op, params, 0.3, [*ours_in, None, None])
        ref = tiled._call_oracle(oracle, op, params, 0.3, [*ref_in, None, None])
        grads = torch.autograd.grad(out, ours_in, grad)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
        results["nb-" + name] = {label: float((a.double() - b).norm() / b.norm())
                                 for label, a, b in zip(["out", "dq", "dk", "dv", "drpb"], (out, *grads),
                                                        (ref, *ref_grads), strict=True)}
    results["nb_used"] = sorted({plan.launch.constexprs["NB"] for key, plan in ops._PLANS.items()
                                 if getattr(plan, "cells", False) or key[0] == "bwd" and hasattr(plan, "part_shape")})
    ops.CELL_PROGRAMS = 1024
    ops.POISON = False

    # out and LSE in the loss, a trained bias, head_dim_v != head_dim: every gradient against the oracle's
    gen = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, 7, 9, 2, 16, generator=gen) for _ in range(2))
    v = torch.randn(2, 7, 9, 2, 32, generator=gen)
    rpb = torch.randn(2, 9, 9, generator=gen)
    grad = torch.randn(2, 7, 9, 2, 32, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    args = ((5, 5), (1, 2), (1, 1), (False, False))
    out, lse = kernels.na(*leaves[:3], *args, leaves[3], 0.25, None, None, return_lse=True)
    weight = torch.randn(lse.shape, generator=gen)
    got = torch.autograd.grad((out * grad).sum() + (lse * weight).sum(), leaves)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, rpb)]
    ref_out, ref_lse = oracle.na_oracle(*ref_leaves[:3], (5, 5), 1, (1, 2), (False, False), scale=0.25,
                                        rpb=ref_leaves[3], return_lse=True)
    want = torch.autograd.grad((ref_out * grad.double()).sum() + (ref_lse * weight.double()).sum(), ref_leaves)
    pat = ops.make_pattern(2, False, *args, (0, 0))
    results["lse_case_path"] = "cells" if ops.engine_path(q, v, rpb, None, pat).box else "tiled"
    results["lse_err"] = (lse.double() - ref_lse).abs().max().item()
    results["lse_grad_err"] = max((a.double() - b).abs().max().item() / b.abs().max().item()
                                  for a, b in zip(got, want, strict=True))
    again = torch.autograd.grad((kernels.na(*leaves[:3], *args, leaves[3], 0.25, None, None, return_lse=True)[0]
                                 * grad).sum(), leaves[3])[0]
    first = torch.autograd.grad((kernels.na(*leaves[:3], *args, leaves[3], 0.25, None, None, return_lse=True)[0]
                                 * grad).sum(), leaves[3])[0]
    results["rpb_repeat_equal"] = bool(torch.equal(again, first))

    # the same call traced (aot_eager, fullgraph): the custom ops' fake and autograd registrations on this path
    def traced(q_, k_, v_, table_):
        out_, lse_ = kernels.na(q_, k_, v_, *args, table_, 0.25, None, None, return_lse=True)
        return (out_ * grad).sum() + (lse_ * weight).sum()

    compiled_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    loss = torch.compile(traced, backend="aot_eager", fullgraph=True)(*compiled_leaves)
    compiled = torch.autograd.grad(loss, compiled_leaves)
    results["compiled_grad_err"] = max((a - b).abs().max().item() for a, b in zip(compiled, got, strict=True))
    return results


@pytest.fixture(scope="module")
def cell_results():
    pytest.importorskip("triton")
    return run_case_interpreted(__file__)


@pytest.mark.interpret
def test_small_map_path_is_taken_where_expected(cell_results):
    paths = cell_results["paths"]
    assert {name for name, path in paths.items() if path == "cells"} == ON_CELLS, paths
    assert cell_results["lse_case_path"] == "cells"


@pytest.mark.interpret
@pytest.mark.parametrize("case", [c for c in CASES + CELL_CASES if c[0] in ON_CELLS], ids=lambda c: c[0])
def test_small_map_matches_oracle(case, cell_results):
    errs = cell_results[case[0]]
    tol = TOL[case[8]]
    assert {"out", "dq", "dk", "dv"} <= set(errs) and ("drpb" in errs) == case[6]
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"{case[0]}: relative errors above {tol}: {bad}"


@pytest.mark.interpret
def test_small_map_several_batch_items_per_program(cell_results):
    """NB > 1 (a partial last group over a batch of 3), bias gradient summed over the items before binning."""
    assert max(cell_results["nb_used"]) > 1, cell_results["nb_used"]
    for name, tol in (("nb-window-2d-shifted", 1e-5), ("nb-cell-2d-fp16-rpb-7x7", 3e-3)):
        bad = {k: v for k, v in cell_results[name].items() if not v < tol}
        assert not bad, f"{name}: {bad}"


@pytest.mark.interpret
def test_small_map_lse_gradient_repeatable_bias_and_tracing(cell_results):
    assert cell_results["lse_err"] < 1e-5 and cell_results["lse_grad_err"] < 1e-5, cell_results
    assert cell_results["rpb_repeat_equal"], cell_results
    assert cell_results["compiled_grad_err"] < 1e-6, cell_results
