"""Autograd extras of the fused engine under TRITON_INTERPRET=1, against the float64 oracle: the atomic-free rpb
gradient (2-D: offset bins summed in registers, bitwise repeatable run to run; 1-D: the per-pair dS buffer, also
split into batch chunks; in float32 and from float16 inputs — bfloat16 is left to the GPU tests because the
interpreter's bf16 ``tl.dot`` is wrong), and the gradient through the returned log-sum-exp, eager and traced (the
custom ops' fake and autograd registrations), with bias tiles."""

from __future__ import annotations

from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body."""
    import warnings

    import oracle
    import torch

    from visattn import kernels
    from visattn.kernels import ops

    ops.SMALL_MAP = False  # the tiled kernels' bias gradient (bins, dS buffer); the small-map path has its own test
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 7, 1, 16, generator=gen) for _ in range(3))
    rpb = torch.randn(1, 5, 5, generator=gen)
    grad = torch.randn(2, 6, 7, 1, 16, generator=gen)

    def drpb(chunk_bytes, q, k, v, rpb, grad, kernel, dilation, causal):
        ops._DSN_BYTES = chunk_bytes
        table = rpb.clone().requires_grad_(True)
        rank = len(kernel)
        out = kernels.na(q, k, v, kernel, dilation, (1,) * rank, causal, table, 0.25, None, None)
        return torch.autograd.grad(out, table, grad)[0]

    def modes():
        return {plan.rpb_mode for key, plan in ops._PLANS.items() if key[0] == "bwd"}

    def want(q, k, v, rpb, grad, kernel, dilation, causal):
        table64 = rpb.double().requires_grad_(True)
        ref = oracle.na_oracle(q.double(), k.double(), v.double(), kernel, 1, dilation, causal, scale=0.25,
                               rpb=table64)
        return torch.autograd.grad(ref, table64, grad.double())[0]

    # 2-D: the dQ pass sums the bias gradient in registers ("bins"; bias tiles have their own test)
    ops.BIAS_TILES = False
    case2d = (q, k, v, rpb, grad, (3, 3), (1, 2), (False, True))
    whole, again = drpb(1 << 30, *case2d), drpb(1 << 30, *case2d)
    ref2d = want(*case2d)
    result = {"err": (whole.double() - ref2d).abs().max().item() / ref2d.abs().max().item(),
              "repeat_equal": bool(torch.equal(whole, again)), "modes_2d": sorted(modes())}
    # 1-D: the per-pair dS buffer, whole and in batch chunks (one batch item per dQ launch)
    ops._PLANS.clear()
    q1, k1, v1, grad1 = (torch.randn(3, 13, 2, 16, generator=gen) for _ in range(4))
    case1d = (q1, k1, v1, torch.randn(2, 9, generator=gen), grad1, (5,), (2,), (False,))
    ref1d = want(*case1d)
    errs = [(drpb(chunk, *case1d).double() - ref1d).abs().max().item() / ref1d.abs().max().item()
            for chunk in (1 << 30, 1)]
    result.update(err_1d=errs[0], chunk_err=errs[1], modes_1d=sorted(modes()))

    # the same 2-D rpb gradient from float16 inputs (the dS-buffer chunk size must not matter), against the float64
    # oracle of the float16-rounded inputs: the atomic-free reduction in half precision
    def drpb_half(chunk_bytes):
        ops._DSN_BYTES = chunk_bytes
        table = rpb.half().requires_grad_(True)
        out = kernels.na(q.half(), k.half(), v.half(), (3, 3), (1, 2), (1, 1), (False, True), table, 0.25, None,
                         None)
        return torch.autograd.grad(out, table, grad.half())[0]

    half_whole, half_again, half_chunked = drpb_half(1 << 30), drpb_half(1 << 30), drpb_half(1)
    table64 = rpb.half().double().requires_grad_(True)
    ref = oracle.na_oracle(q.half().double(), k.half().double(), v.half().double(), (3, 3), 1, (1, 2),
                           (False, True), scale=0.25, rpb=table64)
    want = torch.autograd.grad(ref, table64, grad.half().double())[0]
    scale = want.abs().max().item()
    result.update(fp16_dtype=str(half_whole.dtype), fp16_err=(half_whole.double() - want).abs().max().item() / scale,
                  fp16_chunk_err=(half_chunked.double() - want).abs().max().item() / scale,
                  fp16_repeat_equal=bool(torch.equal(half_whole, half_again)))

    # out and lse both in the loss: dq, dk, dv, drpb against the oracle's, with bias tiles
    ops._DSN_BYTES = 1 << 30
    ops.BIAS_TILES = True
    ops._PLANS.clear()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    out, lse = kernels.na(*leaves[:3], (3, 3), (1, 2), (1, 1), (False, True), leaves[3], 0.25, None, None,
                          return_lse=True)
    weight = torch.randn(lse.shape, generator=gen)
    got = torch.autograd.grad((out * grad).sum() + (lse * weight).sum(), leaves)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, rpb)]
    ref_out, ref_lse = oracle.na_oracle(*ref_leaves[:3], (3, 3), 1, (1, 2), (False, True), scale=0.25,
                                        rpb=ref_leaves[3], return_lse=True)
    want = torch.autograd.grad((ref_out * grad.double()).sum() + (ref_lse * weight.double()).sum(), ref_leaves)
    result["lse_err"] = (lse.double() - ref_lse).abs().max().item()

    # the same call traced (aot_eager, fullgraph): the custom ops' fake and autograd registrations, grad_lse included
    def traced(q_, k_, v_, table_):
        out_, lse_ = kernels.na(q_, k_, v_, (3, 3), (1, 2), (1, 1), (False, True), table_, 0.25, None, None,
                                return_lse=True)
        return (out_ * grad).sum() + (lse_ * weight).sum()

    compiled_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]
    with warnings.catch_warnings(record=True) as caught:  # dynamo warns on lru_cache wrappers it traces through
        warnings.simplefilter("always")
        loss = torch.compile(traced, backend="aot_eager", fullgraph=True)(*compiled_leaves)
    result["trace_warnings"] = [str(w.message)[:120] for w in caught if "lru_cache" in str(w.message)]
    compiled = torch.autograd.grad(loss, compiled_leaves)
    result["compiled_grad_err"] = max((a - b).abs().max().item() for a, b in zip(compiled, got, strict=True))
    result["modes_lse"] = sorted(modes())
    result["lse_grad_err"] = max((a.double() - b).abs().max().item() / b.abs().max().item()
                                 for a, b in zip(got, want, strict=True))
    return result


def test_rpb_gradient_chunked_deterministic_and_lse_gradient():
    result = run_case_interpreted(__file__)
    assert result["err"] < 1e-5 and result["err_1d"] < 1e-5 and result["chunk_err"] < 1e-5, result
    assert result["repeat_equal"], result
    assert result["modes_2d"] == ["bins"] and result["modes_1d"] == ["dsn"], result
    assert result["lse_err"] < 1e-5 and result["lse_grad_err"] < 1e-5, result
    assert result["trace_warnings"] == [], result["trace_warnings"]
    assert result["compiled_grad_err"] < 1e-6 and result["modes_lse"] == ["tiles-dsn"], result
    assert result["fp16_dtype"] == "torch.float16", result  # the gradient comes back in the table's dtype
    assert result["fp16_err"] < 3e-3 and result["fp16_chunk_err"] < 3e-3 and result["fp16_repeat_equal"], result
