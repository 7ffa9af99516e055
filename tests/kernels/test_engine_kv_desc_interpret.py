"""The tiled passes' tensor-descriptor (TMA) loads of their walked boxes, under TRITON_INTERPRET=1 against the float64
oracle: 1-D, 2-D (maps not a multiple of the key box, so boxes reach past the map and are zero-filled), a 3-D map
with batch 1, GNA strides, causal dims, a shifted window, a trained bias, extra keys and a padded head dim (12 of 16
columns). Forward and every gradient are compared, with the dQ pass reading key / value boxes and the dK/dV pass
query / output-gradient boxes through descriptors too (the dQ pass keeps pointer loads where a bias gradient takes
the per-pair buffer); four cases again with the dK/dV pass reading LSE and delta from their head-major copy, by
pointer and through a descriptor (``ops.DKV_STATS``). Also: why other calls keep pointer loads (dilation, a 3-D
batch, unaligned strides)."""

from __future__ import annotations

from interpreted import run_case_interpreted

CASES = {
    # name: (batch, spatial, kernel, stride, causal, window, rpb, extra keys, head_dim)
    "na1d": (2, (19,), (5,), (1,), (False,), False, False, False, 16),
    "na2d_rpb": (2, (9, 10), (3, 5), (1, 1), (False, False), False, True, False, 16),
    "gna2d_causal": (2, (11, 9), (5, 3), (2, 1), (False, True), False, False, False, 16),
    "na2d_extra_d12": (1, (7, 9), (3, 3), (1, 1), (False, False), False, False, True, 12),
    "na3d_b1": (1, (5, 6, 7), (3, 3, 5), (1, 1, 2), (False, False, False), False, False, False, 16),
    "window2d_shift": (2, (8, 12), (4, 6), (2, 3), None, True, True, False, 16),
}
# the dK/dV pass's LSE / delta reads from their head-major copy (ops.DKV_STATS): kernel mode per setting
STATS_MODES = {"pointer": 1, "descriptor": 2}
STATS_CASES = ("na2d_rpb", "gna2d_causal", "na3d_b1", "window2d_shift")


def run_case() -> dict:
    """Child-process body: every case's forward / gradient error on the descriptor path, and the path choices."""
    import oracle
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    ops.SMALL_MAP = False
    ops.KV_DESCRIPTORS = ops.KV_DESC_INTERPRETED = True
    gen = torch.Generator().manual_seed(11)
    errors: dict = {}
    runs = [(name, "rows") for name in CASES] + [(name, m) for m in STATS_MODES for name in STATS_CASES]
    for name, stats in runs:
        batch, spatial, kernel, stride, causal, window, with_rpb, extra, d = CASES[name]
        ops.DKV_STATS = stats
        heads = 2
        q, k, v = (torch.randn(batch, *spatial, heads, d, generator=gen) for _ in range(3))
        rpb = torch.randn(heads, *[2 * x - 1 for x in kernel], generator=gen) if with_rpb else None
        ek = ev = None
        if extra:
            ek, ev = (torch.randn(batch, 6, heads, d, generator=gen) for _ in range(2))
        grad = torch.randn(batch, *spatial, heads, d, generator=gen)
        inputs = [t for t in (q, k, v, rpb, ek, ev) if t is not None]
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        refs = [t.double().requires_grad_(True) for t in inputs]

        def split(ts, with_rpb=with_rpb, extra=extra):
            it = iter(ts)
            q_, k_, v_ = next(it), next(it), next(it)
            rpb_ = next(it) if with_rpb else None
            ek_, ev_ = (next(it), next(it)) if extra else (None, None)
            return q_, k_, v_, rpb_, ek_, ev_

        q_, k_, v_, rpb_, ek_, ev_ = split(leaves)
        rq, rk, rv, rrpb, rek, rev = split(refs)
        ops._PLANS.clear()
        if window:
            out = kernels.window(q_, k_, v_, kernel, stride, rpb_, 0.3)
            ref = oracle.window_oracle(rq, rk, rv, kernel, stride, rpb=rrpb, scale=0.3)
        else:
            ones = (1,) * len(spatial)
            out = kernels.na(q_, k_, v_, kernel, ones, stride, causal, rpb_, 0.3, ek_, ev_)
            ref = oracle.na_oracle(rq, rk, rv, kernel, stride, ones, causal, scale=0.3, additional_keys=rek,
                                   additional_values=rev, rpb=rrpb)
        got = torch.autograd.grad(out, leaves, grad)
        want = torch.autograd.grad(ref, refs, grad.double())
        fwd = [p for key, p in ops._PLANS.items() if key[0] == "fwd"]
        bwd = [p for key, p in ops._PLANS.items() if key[0] == "bwd"]
        errors[name if stats == "rows" else f"{name}@{stats}"] = {
            "fwd": len(fwd) == 1 and fwd[0].kv_desc is not None,
            "dq": len(bwd) == 1 and bwd[0].dq_desc is not None,
            "dkv": len(bwd) == 1 and bwd[0].dkv_desc is not None,
            "stats": len(bwd) == 1 and bwd[0].dkv.constexprs["STATS"],
            "err": max([(out.double() - ref).abs().max().item() / ref.abs().max().item()]
                       + [(a.double() - b).abs().max().item() / b.abs().max().item()
                          for a, b in zip(got, want, strict=True)]),
        }
    # calls the descriptor path refuses, each with its reason
    pat_dil = ops.make_pattern(2, False, (3, 3), (2, 1), (1, 1), (False, False), (0, 0))
    pat = ops.make_pattern(2, False, (3, 3), (1, 1), (1, 1), (False, False), (0, 0))
    pat3 = ops.make_pattern(3, False, (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False), (0, 0, 0))
    x2 = torch.randn(2, 8, 8, 2, 16)
    x3 = torch.randn(2, 4, 4, 4, 2, 16)
    x_odd = torch.randn(2, 8, 8, 2, 6)  # a head dim of 6 float32: 24-byte strides
    errors["why_not"] = {
        "dilation": ops.kv_descriptor_why_not(ops._view3(x2, 2), pat_dil),
        "batch3d": ops.kv_descriptor_why_not(ops._view3(x3, 3), pat3),
        "unaligned": ops.kv_descriptor_why_not(ops._view3(x_odd, 2), pat),
        "ok": ops.kv_descriptor_why_not(ops._view3(x2, 2), pat),
    }
    return errors


def test_descriptor_loads_match_oracle():
    errors = run_case_interpreted(__file__)
    why = errors.pop("why_not")
    assert why["ok"] is None, why
    assert "dilation" in why["dilation"] and "batch" in why["batch3d"] and "aligned" in why["unaligned"], why
    for key, res in errors.items():
        name, _, stats = key.partition("@")
        assert res["fwd"] and res["dkv"], f"{key} did not take the descriptor path: {res}"
        assert res["dq"] == (not CASES[name][6]), f"{key}: dQ descriptors {res}"  # the bias cases take the buffer
        assert res["stats"] == STATS_MODES.get(stats, 0), f"{key}: LSE / delta reads {res}"
        assert res["err"] < 1e-5, (name, res)
