"""NATTEN 0.21 code runs against visattn with the import swapped and gives NATTEN's numbers.

NATTEN-style calls (positional and keyword, ``return_lse``, NATTEN's performance arguments, module construction in
NATTEN's positional order, a state dict with NATTEN's keys) are judged by the independent float64 oracle of
NATTEN's semantics in tests/oracle.py. tests/test_functional_vs_natten.py compares against NATTEN itself where it
is installed.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
from oracle import na_oracle

import visattn
from visattn import nn as vnn

NA = {1: visattn.na1d, 2: visattn.na2d, 3: visattn.na3d}
# natten.na{1,2,3}d in NATTEN 0.21.x (src/natten/functional.py), every parameter in order.
NATTEN_NA_PARAMETERS = [
    "query", "key", "value", "kernel_size", "stride", "dilation", "is_causal", "scale", "additional_keys",
    "additional_values", "attention_kwargs", "backend", "q_tile_shape", "kv_tile_shape", "backward_q_tile_shape",
    "backward_kv_tile_shape", "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel",
    "kernel_schedule", "torch_compile", "return_lse",
]
# natten.NeighborhoodAttention{1,2,3}D in NATTEN 0.21.x (src/natten/modules.py).
NATTEN_MODULE_PARAMETERS = ["embed_dim", "num_heads", "kernel_size", "stride", "dilation", "is_causal", "qkv_bias",
                            "qk_scale", "proj_drop"]


def _qkv(shape, heads=2, dim=8, seed=0, dtype=torch.float64, extra=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, *shape, heads, dim, generator=gen, dtype=dtype) for _ in range(3))
    if not extra:
        return q, k, v, None, None
    ak, av = (torch.randn(2, extra, heads, dim, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v, ak, av


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_signature_is_nattens(rank):
    params = list(inspect.signature(NA[rank]).parameters.values())
    assert [p.name for p in params[:len(NATTEN_NA_PARAMETERS)]] == NATTEN_NA_PARAMETERS
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:len(NATTEN_NA_PARAMETERS)])
    extras = params[len(NATTEN_NA_PARAMETERS):]
    assert [p.name for p in extras] == ["rpb"] and extras[0].kind is inspect.Parameter.KEYWORD_ONLY
    defaults = {p.name: p.default for p in params}
    assert defaults["stride"] == 1 and defaults["dilation"] == 1 and defaults["is_causal"] is False
    assert defaults["backend"] is None and defaults["return_lse"] is False and defaults["scale"] is None


def test_positional_fifth_argument_is_stride():
    """``na2d(q, k, v, 7, 2)`` is kernel 7, stride 2 in NATTEN (it used to mean dilation 2 here)."""
    q, k, v, _, _ = _qkv((14, 15))
    out = visattn.na2d(q, k, v, 7, 2)
    torch.testing.assert_close(out, na_oracle(q, k, v, 7, stride=2), atol=1e-10, rtol=1e-8)
    assert (out - na_oracle(q, k, v, 7, dilation=2)).abs().max() > 0.1  # the two readings differ a lot here


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_every_natten_argument_positionally(rank):
    shape = {1: (13,), 2: (9, 10), 3: (5, 6, 7)}[rank]
    kernel = {1: 5, 2: (3, 4), 3: (2, 3, 3)}[rank]
    stride = {1: 2, 2: (1, 2), 3: (2, 1, 3)}[rank]
    dilation = {1: 2, 2: (2, 1), 3: (1, 2, 1)}[rank]
    causal = {1: True, 2: (False, True), 3: (True, False, False)}[rank]
    q, k, v, ak, av = _qkv(shape, seed=rank, extra=3)
    out = NA[rank](q, k, v, kernel, stride, dilation, causal, 0.3, ak, av, None, None)
    want = na_oracle(q, k, v, kernel, stride, dilation, causal, 0.3, ak, av)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8)
    by_name = NA[rank](query=q, key=k, value=v, kernel_size=kernel, stride=stride, dilation=dilation,
                       is_causal=causal, scale=0.3, additional_keys=ak, additional_values=av)
    torch.testing.assert_close(by_name, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_return_lse_forward_and_gradients(rank):
    """``return_lse=True`` gives ``(out, lse)``, lse natural-log ``[B, *spatial, heads]`` over the neighborhood and
    the extra tokens; gradients through both outputs match the oracle."""
    shape = {1: (11,), 2: (7, 8), 3: (4, 5, 6)}[rank]
    q, k, v, ak, av = _qkv(shape, seed=10 + rank, extra=2)
    leaves = [t.requires_grad_() for t in (q, k, v, ak, av)]
    rpb = torch.randn(2, *[5] * rank, dtype=torch.float64, requires_grad=True)
    kw = dict(dilation=(1,) * (rank - 1) + (2,), is_causal=(True,) + (False,) * (rank - 1), additional_keys=ak,
              additional_values=av, rpb=rpb, return_lse=True)
    out, lse = NA[rank](q, k, v, 3, **kw)
    want_out, want_lse = na_oracle(q, k, v, 3, **kw)
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float64
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-8)
    gen = torch.Generator().manual_seed(rank)
    g_out, g_lse = torch.randn(out.shape, generator=gen, dtype=out.dtype), torch.randn(lse.shape, generator=gen,
                                                                                        dtype=lse.dtype)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), [*leaves, rpb])
    want = torch.autograd.grad((want_out * g_out).sum() + (want_lse * g_lse).sum(), [*leaves, rpb])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_return_lse_float32_dtype():
    q, k, v, _, _ = _qkv((6, 7), dtype=torch.float32)
    out, lse = visattn.na2d(q, k, v, 3, return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (2, 6, 7, 2)
    torch.testing.assert_close(lse.double(), na_oracle(q, k, v, 3, return_lse=True)[1], atol=1e-5, rtol=1e-5)


def test_natten_performance_arguments_are_accepted_and_ignored():
    q, k, v, ak, av = _qkv((8, 9), extra=2)
    plain = visattn.na2d(q, k, v, 3, additional_keys=ak, additional_values=av)
    tuned = visattn.na2d(q, k, v, 3, additional_keys=ak, additional_values=av,
                         attention_kwargs={"backend": "cutlass-fmha", "q_tile_size": 64, "torch_compile": False},
                         q_tile_shape=(4, 8), kv_tile_shape=(4, 8), backward_q_tile_shape=(4, 8),
                         backward_kv_tile_shape=(4, 8), backward_kv_splits=(1, 1), backward_use_pt_reduction=True,
                         run_persistent_kernel=False, kernel_schedule="coop", torch_compile=True)
    torch.testing.assert_close(tuned, plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="attention_kwargs"):
        visattn.na2d(q, k, v, 3, attention_kwargs={"is_causal": True})
    with pytest.raises(ValueError, match="q_tile_shape"):
        visattn.na2d(q, k, v, 3, q_tile_shape=(4, 8, 2))


def test_natten_none_defaults_and_backend_names():
    q, k, v, _, _ = _qkv((7, 7))
    torch.testing.assert_close(visattn.na2d(q, k, v, 3, None, None, None), na_oracle(q, k, v, 3), atol=1e-10,
                               rtol=1e-8)
    for name in ("cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna"):
        with pytest.raises(ValueError, match="NATTEN backend name"):
            visattn.na2d(q, k, v, 3, backend=name)


# ------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("cls", [vnn.NeighborhoodAttention1D, vnn.NeighborhoodAttention2D,
                                 vnn.NeighborhoodAttention3D])
def test_module_signature_is_nattens(cls):
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params[:len(NATTEN_MODULE_PARAMETERS)]] == NATTEN_MODULE_PARAMETERS
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(NATTEN_MODULE_PARAMETERS):])


def test_old_names_are_the_natten_classes():
    assert vnn.NeighborhoodAttention1d is vnn.NeighborhoodAttention1D
    assert vnn.NeighborhoodAttention2d is vnn.NeighborhoodAttention2D
    assert vnn.NeighborhoodAttention3d is vnn.NeighborhoodAttention3D


def _natten_state_dict(embed_dim, seed):
    """What a NATTEN 0.21 NeighborhoodAttention*D holds: qkv (Linear C -> 3C) and proj (Linear C -> C)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"qkv.weight": (3 * embed_dim, embed_dim), "qkv.bias": (3 * embed_dim,),
              "proj.weight": (embed_dim, embed_dim), "proj.bias": (embed_dim,)}
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3 for name, shape in shapes.items()}


# (rank, NATTEN-order positional arguments, input shape, what NATTEN reads them as)
MODULE_CASES = [
    (1, (24, 3, 5, 2, 2, True), (17,), dict(kernel=5, stride=2, dilation=2, causal=True, bias=True, scale=None)),
    (2, (24, 4, 7, 1, 2), (15, 16), dict(kernel=7, stride=1, dilation=2, causal=False, bias=True, scale=None)),
    (2, (24, 2, (3, 5), (3, 1), (1, 2), (False, True), False, 0.25), (9, 11),
     dict(kernel=(3, 5), stride=(3, 1), dilation=(1, 2), causal=(False, True), bias=False, scale=0.25)),
    (3, (24, 3, 3, 1, (1, 2, 1)), (4, 7, 5), dict(kernel=3, stride=1, dilation=(1, 2, 1), causal=False, bias=True,
                                                  scale=None)),
]


@pytest.mark.parametrize("rank,args,shape,meaning", MODULE_CASES)
def test_module_by_natten_positional_order_and_state_dict(rank, args, shape, meaning):
    """The second case is issue 10's ``NeighborhoodAttention2d(64, 4, 7, 1, 2)``: NATTEN reads stride 1, dilation 2."""
    cls = {1: vnn.NeighborhoodAttention1D, 2: vnn.NeighborhoodAttention2D, 3: vnn.NeighborhoodAttention3D}[rank]
    module = cls(*args).double()
    state = _natten_state_dict(24, seed=rank)
    if not meaning["bias"]:
        state.pop("qkv.bias")
    assert set(module.state_dict()) == set(state)
    module.load_state_dict(state)  # strict: exactly NATTEN's keys
    x = torch.randn(2, *shape, 24, dtype=torch.float64)
    heads = args[1]
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).unflatten(-1, (3, heads, 24 // heads)).unbind(-3)
    attn = na_oracle(q, k, v, meaning["kernel"], meaning["stride"], meaning["dilation"], meaning["causal"],
                     meaning["scale"])
    want = F.linear(attn.flatten(-2), state["proj.weight"], state["proj.bias"])
    torch.testing.assert_close(module(x), want, atol=1e-10, rtol=1e-8)


def test_module_extra_tokens_and_rpb():
    module = vnn.NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True, backend="reference").double()
    assert set(module.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb"}
    x = torch.randn(1, 6, 7, 16, dtype=torch.float64)
    ak, av = (torch.randn(1, 3, 2, 8, dtype=torch.float64) for _ in range(2))
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).unflatten(-1, (3, 2, 8)).unbind(-3)
    attn = na_oracle(q, k, v, 3, additional_keys=ak, additional_values=av, rpb=module.rpb)
    want = F.linear(attn.flatten(-2), module.proj.weight, module.proj.bias)
    torch.testing.assert_close(module(x, ak, av), want, atol=1e-10, rtol=1e-8)
