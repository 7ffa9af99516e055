"""Adversarial inputs to the public ops on the CPU (issue 19, "Robustness"): a nan/inf in one key or value, ops run
under FakeTensorMode before a compiled call, double backward, channels-first query views, a float64 rpb with
float32 inputs, and NATTEN's old heads-first layout. Judged against tests/oracle.py (float64 brute force)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from interpreted import child_env
from oracle import na_mask, na_oracle, window_mask, window_oracle

import visattn
from visattn import functional

# ------------------------------------------------------------------------------------------------ nan / inf
# (op, spatial, parameters, backend): the dense-with-mask schedule (one masked SDPA call: a 5x5 window covers
# 39% of an 8x8 map), the shifted-window partition path, their forced references, and causal + stride (whose
# neighbour table holds clamped, invalid slots)
NONFINITE_CASES = [
    ("na", (8, 8), dict(kernel_size=5), None),
    ("na", (8, 8), dict(kernel_size=5), "reference"),
    ("na", (8, 8), dict(kernel_size=(5, 3), dilation=(1, 2)), None),
    ("na", (9, 8), dict(kernel_size=4, stride=2, is_causal=True), None),
    ("na", (9, 8), dict(kernel_size=4, stride=2, is_causal=True), "reference"),
    ("window", (8, 8), dict(window_size=4, shift=2), None),
    ("window", (8, 8), dict(window_size=4, shift=(2, 1)), "reference"),
]


def _allowed(op: str, spatial, params) -> torch.Tensor:
    """Bool [N, N] of the oracle: which query (row) attends which key (column)."""
    if op == "na":
        return na_mask(spatial, params["kernel_size"], params.get("dilation", 1), params.get("stride", 1),
                       params.get("is_causal", False))
    return window_mask(spatial, params["window_size"], params.get("shift", 0))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("target", ["key", "value"])
@pytest.mark.parametrize("op,spatial,params,backend", NONFINITE_CASES)
def test_a_nonfinite_key_or_value_reaches_only_the_queries_that_attend_it(op, spatial, params, backend, target,
                                                                          poison):
    gen = torch.Generator().manual_seed(0)
    heads, dim = 2, 8
    q, k, v = (torch.randn(1, *spatial, heads, dim, generator=gen) for _ in range(3))
    oracle = (na_oracle if op == "na" else window_oracle)(q.double(), k.double(), v.double(), **params)
    # an inner position for neighbourhoods; for windows one in a wrapped (partial) border window, where the
    # partition path's rolled windows mix pieces of several windows under one mask
    token = (3, 5) if op == "na" else (7, 1)
    poisoned = {"key": k.clone(), "value": v.clone()}
    poisoned[target][(0, *token, 1, 2)] = poison  # head 1, channel 2
    run = visattn.na2d if op == "na" else visattn.window_attention
    out = run(q, poisoned["key"], poisoned["value"], **params, backend=backend)

    flat = token[0] * spatial[1] + token[1]
    attends = _allowed(op, spatial, params)[:, flat].reshape(spatial)
    assert 0 < int(attends.sum()) < attends.numel()
    others = out[0][~attends]  # [queries that never attend the token, heads, dim]
    assert torch.isfinite(others).all()
    torch.testing.assert_close(others.double(), oracle[0][~attends], atol=1e-5, rtol=1e-5)
    # the head that holds the poison is untouched elsewhere, and the queries that attend it see it
    assert not torch.isfinite(out[0][attends][:, 1]).all()
    torch.testing.assert_close(out[0][attends][:, 0].double(), oracle[0][attends][:, 0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ fake tensors
def _ops():
    """One small call per op and CPU path, on a [1, 8, 8, 2, 8] map (dense schedules, partition, gather)."""
    torch.manual_seed(0)
    module = visattn.nn.AgentAttention(16, (8, 8), 2, agent_num=4)

    def agent_module(q):
        return module(q.reshape(1, 8, 8, 16))

    return {
        "na1d": lambda q: visattn.na1d(q[:, 0], q[:, 0], q[:, 0], 5),
        "na2d-dense": lambda q: visattn.na2d(q, q, q, 5),
        "na2d-dense-rpb": lambda q: visattn.na2d(q, q, q, 5, rpb=torch.linspace(-1, 1, 162).reshape(2, 9, 9)),
        "na2d-reference": lambda q: visattn.na2d(q, q, q, 3, backend="reference"),
        "na3d": lambda q: visattn.na3d(q.reshape(1, 2, 4, 8, 2, 8), q.reshape(1, 2, 4, 8, 2, 8),
                                       q.reshape(1, 2, 4, 8, 2, 8), (2, 3, 3)),
        "window-shifted": lambda q: visattn.window_attention(q, q, q, 4, 2),
        "window-rpb": lambda q: visattn.window_attention(q, q, q, 4, rpb=torch.linspace(-1, 1, 98).reshape(2, 7, 7)),
        "bilevel-routing": lambda q: visattn.bilevel_routing_attention(q, q, q, 2, 2),
        "halo": lambda q: visattn.halo_attention(q, q, q, 4, 1, torch.linspace(-1, 1, 88).reshape(11, 8),
                                                 torch.linspace(1, -1, 88).reshape(11, 8)),
        "agent": lambda q: visattn.agent_attention(q, q, q, q[:, 0, :4].contiguous()),
        "agent-module": agent_module,
    }


def _clear_caches() -> tuple[dict, ...]:
    """Empty every tensor cache of the CPU paths, so the next call is the first for its key in this process."""
    from visattn import dense_schedule
    from visattn.kernels import tables
    from visattn.nn import agent

    stores = (dense_schedule._CACHE, agent._POOL_CACHE, tables._DEVICE_TABLES)
    for store in stores:
        store.clear()
    return stores


@pytest.mark.parametrize("name", list(_ops()))
def test_an_op_run_under_fake_tensor_mode_leaves_no_fake_tensor_behind(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call = _ops()[name]
    _clear_caches()
    q = torch.randn(1, 8, 8, 2, 8, generator=torch.Generator().manual_seed(1))
    # real parameters (the agent module's) meet fake activations, as in a meta-device shape pass
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = call(mode.from_tensor(q))
    assert fake.shape[-1] in (8, 16)
    eager = call(q)  # a real call after the fake one
    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager")(q)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # an inference-mode call must not poison a later autograd call either
        call(q)
    leaf = q.clone().requires_grad_(True)
    call(leaf).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_caches_never_hold_fake_or_inference_tensors():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    stores = _clear_caches()
    ops = _ops()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for call in ops.values():
            call(mode.from_tensor(torch.randn(1, 8, 8, 2, 8)))
    assert not any(stores), "nothing may be cached under FakeTensorMode"
    q = torch.randn(1, 8, 8, 2, 8)
    with torch.inference_mode():
        for call in ops.values():
            call(q)
    stored = [t for store in stores
              for value in store.values() for t in (value if isinstance(value, (tuple, list)) else (value,))]
    assert stored, "the real calls above must have filled the caches"
    assert not any(isinstance(t, FakeTensor) or t.is_inference() for t in stored)


def test_fake_calls_never_read_a_data_pointer_nor_prepare_a_replay():
    """The eager fast path keys a call by its tensors' pointer alignment; a fake tensor has no data pointer (torch
    warns that reading it will become an error) and must take the full checks, and ``ops.prepare`` must not build a
    replayed call (with its scratch buffer) from fake tensors."""
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    from visattn import functional
    from visattn.kernels import ops as engine_ops

    calls = _ops()
    functional._VALIDATED.clear()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        fake = mode.from_tensor(torch.randn(1, 8, 8, 2, 8))
        for call in calls.values():
            call(fake)
        assert engine_ops.prepare(fake, fake, fake, None, None, None, False, (3, 3), (1, 1), (1, 1),
                                  (False, False), (0, 0), 8 ** -0.5) is None
    assert not functional._VALIDATED, "a fake call was remembered"


# ------------------------------------------------------------------------------------------------ double backward
GRADGRAD = {  # [1, 6, 1, 2] inputs (gradgradcheck's cost grows with the square of the element count)
    "na1d": lambda q, k, v: visattn.na1d(q, k, v, 3),
    "na1d-causal": lambda q, k, v: visattn.na1d(q, k, v, 3, is_causal=True),
    "na2d": lambda q, k, v: visattn.na2d(q.view(1, 3, 2, 1, 2), k.view(1, 3, 2, 1, 2), v.view(1, 3, 2, 1, 2), 2),
    "window": lambda q, k, v: visattn.window_attention(q.view(1, 2, 3, 1, 2), k.view(1, 2, 3, 1, 2),
                                                       v.view(1, 2, 3, 1, 2), (2, 3), (1, 1)),
}


@pytest.mark.parametrize("name", list(GRADGRAD))
def test_double_backward_on_the_cpu_path(name):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 6, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(GRADGRAD[name], (q, k, v))


def test_double_backward_of_the_dense_schedule_matches_the_oracle():
    """The dense schedule itself (one masked SDPA call) takes the second derivative: compare d/dq of a gradient
    norm with the float64 oracle's."""
    gen = torch.Generator().manual_seed(3)
    leaves = [torch.randn(1, 6, 6, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def second(run):
        out = run(*leaves)
        (gq,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gq.square().sum(), leaves)

    ours = second(lambda q, k, v: visattn.na2d(q, k, v, 5))
    assert functional.last_backend() == "reference"
    for a, b in zip(ours, second(lambda q, k, v: na_oracle(q, k, v, 5)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------------------------------------ contiguity
def _channels_first(shape_spatial, heads, dim, gen):
    """A heads-last view of a channels-first ``[B, heads, dim, *spatial]`` tensor (no copy)."""
    rank = len(shape_spatial)
    base = torch.randn(1, heads, dim, *shape_spatial, generator=gen)
    return base.permute(0, *range(3, 3 + rank), 1, 2)


CONTIGUITY_CALLS = {
    "na2d-dense": lambda q, k, v, b: visattn.na2d(q, k, v, 5, backend=b),
    "na2d": lambda q, k, v, b: visattn.na2d(q, k, v, 3, backend=b),
    "na2d-lse": lambda q, k, v, b: visattn.na2d(q, k, v, 3, backend=b, return_lse=True),
    "window": lambda q, k, v, b: visattn.window_attention(q, k, v, 4, backend=b),
    "window-shifted": lambda q, k, v, b: visattn.window_attention(q, k, v, 4, 2, backend=b),
    "bilevel-routing": lambda q, k, v, b: visattn.bilevel_routing_attention(q, k, v, 2, 2, backend=b),
    "halo": lambda q, k, v, b: visattn.halo_attention(q, k, v, 4, 2, backend=b),
    "agent": lambda q, k, v, b: visattn.agent_attention(q, k, v, k[:, 0, :4], backend=b),
    "agent-sdpa": lambda q, k, v, b: visattn.agent_attention(q, k, v, k[:, 0, :4], backend="sdpa"),
}


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", list(CONTIGUITY_CALLS))
def test_outputs_are_contiguous_for_channels_first_views(name, backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_channels_first((8, 8), 2, 8, gen) for _ in range(3))
    assert not q.is_contiguous()
    result = CONTIGUITY_CALLS[name](q, k, v, backend)
    for t in result if isinstance(result, tuple) else (result,):
        assert t.is_contiguous()
    expected = CONTIGUITY_CALLS[name](q.contiguous(), k.contiguous(), v.contiguous(), backend)
    for a, b in zip(result if isinstance(result, tuple) else (result,),
                    expected if isinstance(expected, tuple) else (expected,), strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ rpb dtype
@pytest.mark.parametrize("backend", [None, "reference"])
def test_a_float64_rpb_with_float32_inputs_equals_its_float32_copy(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8, 8, 2, 8, generator=gen) for _ in range(3))
    for kernel in (3, 5):
        rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, generator=gen, dtype=torch.float64)
        assert torch.equal(visattn.na2d(q, k, v, kernel, rpb=rpb, backend=backend),
                           visattn.na2d(q, k, v, kernel, rpb=rpb.float(), backend=backend))
        out = visattn.na2d(q, k, v, kernel, rpb=rpb, backend=backend)
        torch.testing.assert_close(out.double(), na_oracle(q.double(), k.double(), v.double(), kernel,
                                                           rpb=rpb.float().double()), atol=1e-5, rtol=1e-5)
    rpb = torch.randn(2, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    out = visattn.window_attention(q, k, v, 4, 2, rpb=rpb, backend=backend)
    assert torch.equal(out, visattn.window_attention(q, k, v, 4, 2, rpb=rpb.detach().float(), backend=backend))
    out.sum().backward()
    assert rpb.grad.dtype == torch.float64


_TRITON_RPB_CHILD = r"""
import json, torch, visattn
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 6, 6, 2, 16, generator=gen) for _ in range(3))
rpb = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
a = visattn.na2d(q, k, v, 3, rpb=rpb, backend="triton")
b = visattn.na2d(q, k, v, 3, rpb=rpb.float(), backend="triton")
w = visattn.window_attention(q, k, v, 3, 1, rpb=rpb[:, :5, :5], backend="triton")
x = visattn.window_attention(q, k, v, 3, 1, rpb=rpb[:, :5, :5].float(), backend="triton")
print(json.dumps({"na": bool(torch.equal(a, b)), "window": bool(torch.equal(w, x))}))
"""


@pytest.mark.slow
@pytest.mark.interpret
def test_a_float64_rpb_runs_the_triton_kernel_like_its_float32_copy():
    """The Triton kernels take float16/bfloat16/float32 tables; a float64 one used to be refused by
    backend="triton" (and sent "auto" to the reference), so its result differed from rpb.float()'s."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", _TRITON_RPB_CHILD], env=child_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == '{"na": true, "window": true}'


# ------------------------------------------------------------------------------------------------ heads-first
def test_a_heads_first_query_with_an_rpb_is_refused_naming_the_layout():
    q = torch.randn(1, 4, 8, 8, 16)  # NATTEN's old [B, heads, H, W, head_dim]
    rpb = torch.zeros(4, 5, 5)
    with pytest.raises(ValueError, match=r"rpb must have shape .*looks heads-first.*heads-last"):
        visattn.na2d(q, q, q, 3, rpb=rpb)
    heads_last = q.movedim(1, -2)
    assert visattn.na2d(heads_last, heads_last, heads_last, 3, rpb=rpb).shape == heads_last.shape


def test_heads_first_extra_tokens_are_refused_naming_the_layout():
    q = torch.randn(1, 8, 8, 4, 16)
    extra = torch.randn(1, 4, 3, 16)  # [B, heads, n, head_dim]
    with pytest.raises(ValueError, match=r"additional_keys looks heads-first .*transpose\(1, 2\)"):
        visattn.na2d(q, q, q, 3, additional_keys=extra, additional_values=extra)
    t = extra.transpose(1, 2)
    assert visattn.na2d(q, q, q, 3, additional_keys=t, additional_values=t).shape == q.shape


def test_meta_tensors_run_the_cpu_schedules():
    """timm builds and runs models on the meta device (timm's test_model_default_cfgs): the dense schedule's
    finiteness check must not read data that meta tensors do not have."""
    q = torch.empty(1, 7, 7, 2, 16, device="meta")
    assert visattn.na2d(q, q, q, 7).shape == q.shape  # one masked SDPA call (small map, window covers it)
    assert visattn.window_attention(q, q, q, 7, shift=3).shape == q.shape
