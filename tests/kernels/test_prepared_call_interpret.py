"""Replayed eager calls (``ops.PreparedCall``, remembered by ``visattn.functional`` per call geometry) under
TRITON_INTERPRET=1 against the float64 oracle. A replay skips the pattern, path and plan lookups and, without
gradients, the autograd Function (writing an unread LSE into one scratch buffer). Checked: repeated calls with new
values, forward and every gradient (q, k, v, rpb) through replays; no-grad replays back to back (the scratch LSE
must not leak into outputs); ``return_lse`` through a replay; a 16-byte-misaligned view gets its own entry; a
cleared plan cache and a switched path flag retire the remembered call (the next call takes the full path and the
new path); window attention replays."""

from __future__ import annotations

from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: relative errors against float64 and the bookkeeping of the remembered calls."""
    import oracle
    import torch

    import visattn
    from visattn import functional
    from visattn.kernels import ops

    gen = torch.Generator().manual_seed(5)
    res: dict = {}

    def rel(a, b) -> float:
        return (a.double() - b).abs().max().item() / b.abs().max().item()

    def fresh(shape=(2, 7, 7, 2, 16)):
        return [torch.randn(shape, generator=gen) for _ in range(3)]

    rpb = torch.randn(2, 9, 9, generator=gen)

    def na_ref(q, k, v, table, return_lse=False):
        return oracle.na_oracle(q.double(), k.double(), v.double(), (5, 5), (1, 1), (1, 1), (False, False),
                                scale=0.25, rpb=None if table is None else table.double(), return_lse=return_lse)

    # no gradients: first call (full path), then replays with new values, back to back
    with torch.no_grad():
        errs = []
        for _ in range(3):
            q, k, v = fresh()
            out = visattn.na2d(q, k, v, 5, scale=0.25, rpb=rpb, backend="triton")
            errs.append(rel(out, na_ref(q, k, v, rpb)))
        res["nograd_err"] = max(errs)
        (prepared,) = functional._VALIDATED.values()
        res["nograd_prepared"] = [type(prepared).__name__, prepared.autograd, prepared.scratch_lse is not None]
        # return_lse through a replay
        for _ in range(2):
            q, k, v = fresh()
            out, lse = visattn.na2d(q, k, v, 5, scale=0.25, rpb=rpb, backend="triton", return_lse=True)
        ref_out, ref_lse = na_ref(q, k, v, rpb, return_lse=True)
        res["lse_err"] = max(rel(out, ref_out), rel(lse, ref_lse))
        res["entries_after_lse"] = len(functional._VALIDATED)

        # a view whose data pointer is not 16-byte aligned: another entry, still exact
        flat = torch.randn(2 * 7 * 7 * 2 * 16 + 1, generator=gen)
        q_odd = flat[1:].view(2, 7, 7, 2, 16)
        q, k, v = fresh()
        out = visattn.na2d(q_odd, k, v, 5, scale=0.25, rpb=rpb, backend="triton")
        res["misaligned_err"] = rel(out, na_ref(q_odd, k, v, rpb))
        res["entries_after_misaligned"] = len(functional._VALIDATED)

        # a cleared plan cache retires every remembered call; so does switching the small-map path off
        key0 = next(iter(functional._VALIDATED))
        ops._PLANS.clear()
        q, k, v = fresh()
        out = visattn.na2d(q, k, v, 5, scale=0.25, rpb=rpb, backend="triton")
        res["after_clear_err"] = rel(out, na_ref(q, k, v, rpb))
        renewed = functional._VALIDATED[key0]
        res["retired_by_clear"] = renewed is not prepared and renewed.epoch == ops._PLANS.epoch
        ops.SMALL_MAP = False
        q, k, v = fresh()
        out = visattn.na2d(q, k, v, 5, scale=0.25, rpb=rpb, backend="triton")
        res["tiled_err"] = rel(out, na_ref(q, k, v, rpb))
        res["cells"] = [renewed.plan.cells, functional._VALIDATED[key0].plan.cells]
        ops.SMALL_MAP = True

    # gradients through replays (small-map and tiled paths), against float64
    grad_errs = {}
    for small_map in (True, False):
        ops.SMALL_MAP = small_map
        for i in range(3):
            q, k, v = (t.requires_grad_(True) for t in fresh())
            table = rpb.clone().requires_grad_(True)
            g = torch.randn(2, 7, 7, 2, 16, generator=gen)
            if i == 2:  # an output gradient of other strides: a second backward plan of the same call
                g = torch.randn(2, 7, 7, 16, 2, generator=gen).transpose(-1, -2)
            out = visattn.na2d(q, k, v, 5, scale=0.25, rpb=table, backend="triton")
            got = torch.autograd.grad(out, (q, k, v, table), g)
            refs = [t.detach().double().requires_grad_(True) for t in (q, k, v, table)]
            ref = na_ref(*refs)
            want = torch.autograd.grad(ref, refs, g.double())
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(got, want, strict=True)]
            grad_errs[f"small_map={small_map}"] = max(errs + [grad_errs.get(f"small_map={small_map}", 0.0)])
        res.setdefault("backward_plans", []).extend(
            len(p.backward_plans) for p in functional._VALIDATED.values() if p.autograd)
    ops.SMALL_MAP = True
    res["grad_err"] = grad_errs

    # window attention replays
    errs = []
    for _ in range(2):
        q, k, v = fresh((2, 8, 12, 2, 16))
        table = torch.randn(2, 7, 11, generator=gen)
        out = visattn.window_attention(q, k, v, (4, 6), shift=(2, 3), rpb=table, scale=0.25, backend="triton")
        ref = oracle.window_oracle(q.double(), k.double(), v.double(), (4, 6), (2, 3), rpb=table.double(),
                                   scale=0.25)
        errs.append(rel(out, ref))
    res["window_err"] = max(errs)
    return res


def test_replayed_calls_match_the_oracle_and_retire():
    res = run_case_interpreted(__file__)
    assert res["nograd_prepared"] == ["PreparedCall", False, True], res
    assert res["nograd_err"] < 1e-5 and res["lse_err"] < 1e-5, res
    assert res["entries_after_lse"] == 2, res  # return_lse is part of the key
    assert res["misaligned_err"] < 1e-5 and res["entries_after_misaligned"] == 3, res
    assert res["after_clear_err"] < 1e-5 and res["retired_by_clear"], res
    assert res["tiled_err"] < 1e-5 and res["cells"] == [True, False], res
    assert all(err < 1e-5 for err in res["grad_err"].values()), res
    assert res["backward_plans"] == [2, 2], res  # small-map and tiled: contiguous and strided output gradients
    assert res["window_err"] < 1e-5, res
