"""The fused Triton agent-attention kernels (forward, backward) under TRITON_INTERPRET=1 vs the float64 oracle.

Triton picks interpreter or compiler when a kernel module is imported, so the cases run in a child process with
TRITON_INTERPRET=1 (tests/interpreted.py). Every input gets a gradient checked: q, k, v, agents and both biases.
"""

import json
import os

import pytest
from interpreted import run_interpreted

CASES = [
    # B, spatial, heads, D, Dv, agents, dtype, fused qkv views, agent_bias shape, query_bias shape
    (2, (5, 7), 2, 16, 16, 9, "float32", True, "broadcast", "broadcast"),
    (1, (37,), 1, 8, 12, 4, "float32", False, "full", None),
    (2, (3, 4, 5), 2, 16, 16, 20, "float32", False, None, "full"),
    (1, (9, 9), 3, 32, 32, 16, "float16", True, "broadcast", "broadcast"),
    (1, (6, 11), 1, 16, 16, 1, "float32", False, None, None),
]
TOL = {"float32": 2e-5, "float16": 4e-3}


def run_cases() -> list[dict]:
    import torch
    from oracle import agent_oracle

    from visattn.kernels.agent_attn import agent_attention

    results = []
    for i, (b, spatial, heads, d, dv, n_agents, dtype, fused, ab_kind, qb_kind) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        n = 1
        for size in spatial:
            n *= size
        if fused:  # strided views of one fused qkv tensor, as the models make them
            qkv = torch.randn(b, *spatial, 3, heads, max(d, dv), generator=gen).to(dt)
            q, k, v = qkv[..., 0, :, :d], qkv[..., 1, :, :d], qkv[..., 2, :, :dv]
        else:
            q, k = (torch.randn(b, *spatial, heads, d, generator=gen).to(dt) for _ in range(2))
            v = torch.randn(b, *spatial, heads, dv, generator=gen).to(dt)
        agents = torch.randn(b, n_agents, heads, d, generator=gen).to(dt)

        def bias(kind, shape, b=b, gen=gen, dt=dt):
            if kind is None:
                return None
            full = (b, *shape) if kind == "full" else (1, *shape)
            return (0.5 * torch.randn(*full, generator=gen)).to(dt)

        ab, qb = bias(ab_kind, (heads, n_agents, n)), bias(qb_kind, (heads, n, n_agents))
        leaves = [t.detach().requires_grad_() for t in (q, k, v, agents)]
        leaves += [t.detach().requires_grad_() for t in (ab, qb) if t is not None]
        it = iter(leaves[4:])
        ab_l = next(it) if ab is not None else None
        qb_l = next(it) if qb is not None else None
        scale = d**-0.5
        out = agent_attention(*leaves[:4], ab_l, qb_l, scale)
        grad = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad(out, leaves, grad.to(dt))
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        it = iter(leaves64[4:])
        ab64 = next(it) if ab is not None else None
        qb64 = next(it) if qb is not None else None
        ref = agent_oracle(*leaves64[:4], ab64, qb64, scale)
        ref_grads = torch.autograd.grad(ref, leaves64, grad.double())

        def err(a, r):
            return float((a.detach().double() - r.detach()).abs().max() / max(1.0, float(r.detach().abs().max())))

        result = {"case": i, "dtype": dtype, "fwd": err(out, ref), "shape_ok": list(out.shape) == list(ref.shape),
                  "grads": [err(g, r) for g, r in zip(grads, ref_grads, strict=True)],
                  "nan": bool(torch.isnan(out).any() or any(torch.isnan(g).any() for g in grads))}
        if i == 0:  # traced (aot_eager, fullgraph): the custom ops' fake and autograd registrations
            weight = grad.to(dt)

            def loss(*xs, scale=scale, weight=weight):
                return (agent_attention(*xs[:4], xs[4], xs[5], scale) * weight).sum()

            traced_leaves = [t.detach().clone().requires_grad_() for t in leaves]
            traced = torch.compile(loss, backend="aot_eager", fullgraph=True)(*traced_leaves)
            traced_grads = torch.autograd.grad(traced, traced_leaves)
            result["traced_err"] = max(err(a, b) for a, b in zip(traced_grads, grads, strict=True))
            # fake vs real kernels (shapes, strides, dtypes) of both custom ops, e.g. d(agents)'s layout
            from visattn.kernels import agent_attn

            flat = [agent_attn._flat(t.detach()) for t in leaves[:3]]
            op_args = (*flat, leaves[3].detach(), leaves[4].detach(), leaves[5].detach(), scale)
            out_, av_, lse_ = agent_attn.agent_forward(*op_args)
            checks = [torch.library.opcheck(agent_attn.agent_forward, op_args, test_utils="test_faketensor"),
                      torch.library.opcheck(agent_attn.agent_backward,
                                            (torch.randn(out_.shape, generator=gen), *op_args[:6], av_, lse_, scale,
                                             True, True), test_utils="test_faketensor")]
            result["opcheck"] = [all(v == "SUCCESS" for v in c.values()) for c in checks]
        results.append(result)
    return results


@pytest.mark.interpret
def test_agent_kernels_match_float64_oracle_under_interpreter():
    results = run_interpreted(__file__, timeout=600)
    assert len(results) == len(CASES)
    for res in results:
        tol = TOL[res["dtype"]]
        assert not res["nan"], res
        assert res["shape_ok"], res
        assert res["fwd"] < tol, res
        assert max(res["grads"]) < 4 * tol, res
    assert results[0]["traced_err"] < 1e-6, results[0]
    assert results[0]["opcheck"] == [True, True], results[0]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
