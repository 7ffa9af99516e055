"""Bias tiles (``kernels/bias_tiles.py``: a trained 2-D bias expanded once per call into the tiled kernels' tiles,
its gradient summed over batch chunks and binned once per chunk) under TRITON_INTERPRET=1, against the float64
oracle: forward and every gradient for dilated, causal, strided and shifted-window patterns, float32 and float16
inputs (the float16 expansion), one and several batch chunks (the last one partial), the path each call took, the
gradient bitwise repeatable, and the backward reusing the forward's expansion. The per-pair gather
(``ops.BIAS_TILES = False``) is run on one case as a second opinion."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted
from test_engine_interpret import _na

# name, op, spatial, heads, head_dim, params, rpb, extra keys, dtype, layout (as test_engine_interpret.CASES)
TILE_CASES = [
    ("na-dilated-uneven", "na", (11, 13), 2, 16, _na((3, 5), (2, 1), (1, 1), (False, False)), True, 0, "float32",
     "fused"),
    ("na-causal-stride", "na", (9, 10), 1, 16, _na((4, 3), (1, 1), (2, 1), (True, False)), True, 0, "float32",
     "permuted"),
    ("na-7x7-fp16", "na", (9, 11), 1, 32, _na((7, 7), (1, 1), (1, 1), (False, False)), True, 0, "float16",
     "plain"),
    ("window-shifted", "window", (10, 12), 1, 16, dict(window=(5, 6), shift=(2, 3)), True, 0, "float32", "fused"),
]
TOL = {"float32": 1e-5, "float16": 3e-3}
BATCH = 3


def run_case() -> dict:
    """Child-process body: relative errors and paths per (case, batch chunking), repeatability, the gather."""
    import oracle
    import test_engine_interpret as tiled
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    ops.SMALL_MAP = False  # the tiled kernels (the small-map path has its own bias handling)
    ops.BIAS_GRAD_BUFFER = False  # the recomputing bias-gradient kernel first (its batch chunks); the buffer below
    ops.POISON = True  # NaN-filled outputs and partials: anything never written fails the comparison
    results = {}

    def run(case, seed):
        name, op, spatial, heads, d, params = case[:6]
        gen = torch.Generator().manual_seed(seed)
        q, k, v, rpb, _, _, _ = tiled._make(case, gen)
        q, k, v = (torch.cat([t, t[:1] * 0.5]) for t in (q, k, v))  # batch 3: chunks of 2 leave a partial one
        grad = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen).to(q.dtype)
        ours_in = [t.detach().requires_grad_(True) for t in (q, k, v, rpb)]
        ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v, rpb)]
        out = tiled._call_engine(kernels, op, params, d ** -0.5, [*ours_in, None, None])
        ref = tiled._call_oracle(oracle, op, params, d ** -0.5, [*ref_in, None, None])
        grads = torch.autograd.grad(out, ours_in, grad)
        ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
        errs = {label: float((a.double() - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")
                for label, a, b in zip(["out", "dq", "dk", "dv", "drpb"], (out, *grads), (ref, *ref_grads),
                                       strict=True)}
        return errs, grads[3]

    for i, case in enumerate(TILE_CASES):
        # batch chunks of the bias gradient: 2 + 1 for every case; 3 items in one and 1 + 1 + 1 for the first
        for chunks in (1, 2, BATCH) if i == 0 else (2,):
            ops._PLANS.clear()
            ops.BIAS_GRAD_PROGRAMS = 0 if chunks == 1 else 10 ** 6
            layout = None
            if chunks == 2:  # programs = chunks x (grad programs per chunk) for exactly two chunks
                name, op, spatial, heads, d, params = case[:6]
                q = torch.zeros(BATCH, *spatial, heads, d, dtype=getattr(torch, case[8]))
                pat = (ops.make_pattern(2, True, params["window"], (1, 1), (1, 1), (False, False), params["shift"])
                       if op == "window" else
                       ops.make_pattern(2, False, params["kernel"], params["dilation"], params["stride"],
                                        params["causal"], (0, 0)))
                layout = ops._tile_layout_of(q, q, q.new_zeros(1), None, pat)
                ops.BIAS_GRAD_PROGRAMS = 2 * layout.q_programs * layout.q_walk * heads
            errs, drpb = run(case, 40 + i)
            again = run(case, 40 + i)[1] if chunks == 2 else drpb
            modes = {plan.rpb_mode for key, plan in ops._PLANS.items() if key[0] == "bwd"}
            used = {plan.part_shape[0] for key, plan in ops._PLANS.items() if key[0] == "bwd"}
            results[f"{case[0]}/{chunks}"] = dict(errs=errs, modes=sorted(modes), chunks=sorted(used),
                                                  repeat_equal=bool(torch.equal(drpb, again)))
    ops.BIAS_GRAD_PROGRAMS = 1024

    # the gradient from the dQ pass's dS, written once per pair into the per-position buffer
    ops.BIAS_GRAD_BUFFER = True

    class Counted:  # the query-walk expansion's launches: the eager backward reuses the forward's
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def record(self, *args, **kwargs):
            return self.inner.record(*args, **kwargs)

        def __call__(self, rec, tensors):
            self.calls += 1
            self.inner(rec, tensors)

    real_expand = ops._EXPAND_Q
    for i, case in enumerate(TILE_CASES):
        ops._PLANS.clear()
        ops._EXPAND_Q = counted = Counted(real_expand)
        errs, _ = run(case, 40 + i)
        modes = {plan.rpb_mode for key, plan in ops._PLANS.items() if key[0] == "bwd"}
        results[f"{case[0]}/buffer"] = dict(errs=errs, modes=sorted(modes), expand_q_launches=counted.calls)
    ops._EXPAND_Q = real_expand

    # the per-pair gather, same case: the second opinion of the fused path
    ops.BIAS_TILES = False
    ops._PLANS.clear()
    errs, _ = run(TILE_CASES[0], 40)
    modes = {plan.rpb_mode for key, plan in ops._PLANS.items() if key[0] == "bwd"}
    results["gather"] = dict(errs=errs, modes=sorted(modes))
    return results


@pytest.fixture(scope="module")
def tile_results():
    pytest.importorskip("triton")
    return run_case_interpreted(__file__)


RUNS = [(c, 2) for c in TILE_CASES] + [(TILE_CASES[0], 1), (TILE_CASES[0], BATCH)]


@pytest.mark.interpret
@pytest.mark.parametrize(("case", "chunks"), RUNS, ids=[f"{c[0]}-{n}chunks" for c, n in RUNS])
def test_bias_tiles_match_oracle(case, chunks, tile_results):
    got = tile_results[f"{case[0]}/{chunks}"]
    tol = TOL[case[8]]
    bad = {k: v for k, v in got["errs"].items() if not v < tol}
    assert not bad, f"{case[0]}, {chunks} chunks: relative errors above {tol}: {bad}"
    assert got["modes"] == ["tiles"], got
    assert got["chunks"] == [chunks], got
    assert got["repeat_equal"], got


@pytest.mark.interpret
@pytest.mark.parametrize("case", TILE_CASES, ids=[c[0] for c in TILE_CASES])
def test_bias_gradient_from_the_dq_buffer_matches_oracle(case, tile_results):
    got = tile_results[f"{case[0]}/buffer"]
    assert got["modes"] == ["tiles-dsn"], got
    assert got["expand_q_launches"] == 1, got  # one forward + backward: the forward's expansion, reused
    tol = TOL[case[8]]
    assert all(v < tol for v in got["errs"].values()), got


@pytest.mark.interpret
def test_gather_path_still_matches(tile_results):
    got = tile_results["gather"]
    assert got["modes"] == ["bins"], got
    assert all(v < TOL["float32"] for v in got["errs"].values()), got
