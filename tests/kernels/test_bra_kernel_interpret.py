"""The Triton bi-level routing kernels (fwd, dQ, dK/dV) under TRITON_INTERPRET=1 vs the dense float64 oracle,
on both schedules: the region schedule (forced with ``MAP_MAX_TOKENS = 0``) and the map schedule small maps take.

Triton picks interpreter or compiler when a kernel module is imported, so the cases run in a child process with
TRITON_INTERPRET=1; this keeps the rest of the test session on its normal path.
"""

import json
import os

import pytest
from interpreted import run_interpreted

CASES = [
    # B, H, W, heads, D, Dv, regions, topk, dtype, non_contiguous
    (2, 8, 8, 2, 16, 16, (2, 2), 2, "float32", True),
    (1, 6, 9, 2, 8, 12, (3, 3), 4, "float32", True),
    (1, 7, 5, 1, 16, 16, (2, 2), 3, "float32", False),  # padded: 7x5 on a 2x2 grid
    (1, 4, 12, 1, 24, 24, (1, 3), 3, "float32", False),  # topk = all regions, head dim padded 24 -> 32
    (1, 8, 8, 2, 16, 16, (4, 2), 3, "float16", True),
    (1, 8, 8, 1, 32, 32, (2, 2), 1, "float16", False),
    # BiFormer-T's 14x14 stage shape (7x7 regions of 2x2): several key tiles on the map schedule, and with topk 1
    # whole tiles masked for a row (the guarded running max)
    (1, 14, 14, 2, 16, 16, (7, 7), 1, "float32", True),
    (2, 14, 14, 1, 32, 32, (7, 7), 5, "float16", False),
    # 48 regions (1x2 tokens): routed regions on both int32 words of the mask
    (1, 6, 16, 1, 16, 16, (6, 8), 20, "float32", False),
]
# "mixed": the region forward feeds the map backward (routing.MAP_PASSES)
SCHEDULES = ("map", "region", "mixed")
# bfloat16 runs on the GPU only (tests/kernels/test_bra_kernel_gpu.py): the interpreter's bf16 tl.dot is wrong
# (triton 3.9: errors ~1e10).
TOL = {"float32": 1e-5, "float16": 3e-3}


def run_cases() -> list[dict]:
    import torch

    from visattn.bench import dense
    from visattn.kernels.routing import bilevel_routing, inverse_routing

    inverse_ok = []  # the inverse-routing kernel vs a brute force: which query regions route to each key region
    for batch, n_regions, topk in ((2, 49, 1), (2, 49, 16), (1, 9, 9), (1, 49, 49)):
        gen = torch.Generator().manual_seed(n_regions * topk)
        idx = torch.stack([torch.stack([torch.randperm(n_regions, generator=gen)[:topk] for _ in range(n_regions)])
                           for _ in range(batch)]).to(torch.int32)
        table, counts = inverse_routing(idx, n_regions)
        want = [[[q for q in range(n_regions) if r in idx[bi, q].tolist()] for r in range(n_regions)]
                for bi in range(batch)]
        inverse_ok.append(all(table[bi, r, :counts[bi, r]].tolist() == want[bi][r]
                              for bi in range(batch) for r in range(n_regions)))

    from visattn.kernels import routing as routing_module

    results = []
    for schedule, (i, (b, h, w, heads, d, dv, regions, topk, dtype, strided)) in (
            (s, c) for s in SCHEDULES for c in enumerate(CASES)):
        routing_module.MAP_MAX_TOKENS = 0 if schedule == "region" else 256
        routing_module.MAP_PASSES = ("bwd",) if schedule == "mixed" else ("fwd", "bwd")
        padded = (-(-h // regions[0]) * regions[0], -(-w // regions[1]) * regions[1])
        took_map = routing_module.map_schedule_why_not(*padded, regions) is None
        gen = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        if strided:  # views of one fused qkv tensor
            qkv = torch.randn(b, h, w, 3, heads, max(d, dv), generator=gen).to(dt)
            q, k, v = qkv[..., 0, :, :d], qkv[..., 1, :, :d], qkv[..., 2, :, :dv]
        else:
            q, k = (torch.randn(b, h, w, heads, d, generator=gen).to(dt) for _ in range(2))
            v = torch.randn(b, h, w, heads, dv, generator=gen).to(dt)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        grad = torch.randn(b, h, w, heads, dv, generator=gen)
        out, routing = bilevel_routing(q, k, v, regions, topk, d**-0.5, return_routing=True)
        grads = torch.autograd.grad(out, (q, k, v), grad.to(dt))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = dense.bilevel_routing(q64, k64, v64, regions, topk)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
        def err(a, r):
            return float((a.double() - r).abs().max() / max(1.0, float(r.abs().max())))
        result = {"case": i, "schedule": schedule, "took_map": took_map, "dtype": dtype, "fwd": err(out, ref),
                  "grads": [err(g, r) for g, r in zip(grads, ref_grads, strict=False)],
                  "nan": bool(torch.isnan(out).any()), "routing_shape": list(routing.shape)}
        if i == 0 and schedule == "map":  # traced (aot_eager, fullgraph): the custom ops' fake and autograd
            # registrations
            weight = grad.to(dt)

            def loss(q_, k_, v_, regions=regions, topk=topk, d=d, weight=weight):
                return (bilevel_routing(q_, k_, v_, regions, topk, d**-0.5) * weight).sum()

            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            traced = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(*leaves), leaves)
            result["traced_err"] = max(float((a - b).abs().max()) for a, b in zip(traced, grads, strict=True))
        results.append(result)
    results[0]["inverse_ok"] = inverse_ok  # results[0]: case 0 on the map schedule
    return results


@pytest.mark.interpret
def test_bra_kernels_match_dense_oracle_under_interpreter():
    results = run_interpreted(__file__, timeout=900)
    assert len(results) == len(CASES) * len(SCHEDULES)
    assert [r["took_map"] for r in results] == [True] * len(CASES) + [False] * len(CASES) + [True] * len(CASES)
    for res, case in zip(results, CASES * len(SCHEDULES), strict=True):
        tol = TOL[res["dtype"]]
        assert not res["nan"], res
        assert res["fwd"] < tol, res
        assert max(res["grads"]) < 4 * tol, res
        n_regions = case[6][0] * case[6][1]
        if res["case"] == 0 and res["schedule"] == "map":
            assert res["traced_err"] < 1e-6, res
            assert res["inverse_ok"] == [True] * 4, res
        assert res["routing_shape"] == [case[0], n_regions, case[7]]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
