"""Bad-input table for the public functional API and the module constructors (docs/SEMANTICS.md, "Errors").

Every row is one bad call. The test asserts the exception type and that the message names the offending argument
(word-bounded, so the argument ``k`` is not "found" inside ``kernel_size``), and for some rows the offending value.
"""

import math
import os
import re

import pytest
import torch

import visattn

F64 = torch.float64
VT = (ValueError, TypeError)  # where SEMANTICS.md allows either (e.g. a dtype is a value and a type at once)


def t(*shape, dtype=F64, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device) if device == "meta" else torch.randn(*shape).to(dtype)


# valid baselines: 1-D [B, L, h, D], 2-D [B, H, W, h, D], 3-D [B, T, H, W, h, D]
Q1 = t(1, 8, 2, 4)
Q2 = t(1, 6, 8, 2, 4)
Q3 = t(1, 4, 4, 4, 2, 4)
A2 = t(1, 3, 2, 4)  # agents for 2 heads, D=4


_FULL = {"q": "query", "k": "key", "v": "value"}


def _call(fn, base, kw):
    args = dict(base)
    args.update({_FULL.get(name, name): value for name, value in kw.items()})
    return lambda: fn(**args)


def na2(**kw):
    return _call(visattn.na2d, dict(query=Q2, key=Q2, value=Q2, kernel_size=3), kw)


def na1(**kw):
    return _call(visattn.na1d, dict(query=Q1, key=Q1, value=Q1, kernel_size=3), kw)


def win(**kw):
    return _call(visattn.window_attention, dict(query=Q2, key=Q2, value=Q2, window_size=(3, 4)), kw)


def agent(**kw):
    return _call(visattn.agent_attention, dict(query=Q2, key=Q2, value=Q2, agents=A2), kw)


def bra(**kw):
    return _call(visattn.bilevel_routing_attention, dict(query=Q2, key=Q2, value=Q2, regions=2, topk=2), kw)


# (id, call, exception type(s), regexes that must all appear in the message)
CASES = [
    # ---- ranks and shapes
    ("na2d-rank-too-low", na2(q=Q1, k=Q1, v=Q1), ValueError, [r"\bquery\b"]),
    ("na1d-given-2d", na1(q=Q2, k=Q2, v=Q2), ValueError, [r"\bquery\b"]),
    ("na3d-given-2d", lambda: visattn.na3d(Q2, Q2, Q2, 3), ValueError, [r"\bquery\b"]),
    ("na2d-k-shape", na2(k=t(1, 6, 7, 2, 4)), ValueError, [r"\bkey\b"]),
    ("na2d-v-spatial-shape", na2(v=t(1, 5, 8, 2, 4)), ValueError, [r"\bvalue\b"]),
    ("na2d-v-heads", na2(v=t(1, 6, 8, 3, 4)), ValueError, [r"\bvalue\b"]),
    ("na2d-k-head-dim", na2(k=t(1, 6, 8, 2, 5)), ValueError, [r"\bkey\b"]),
    ("na2d-k-batch", na2(k=t(2, 6, 8, 2, 4)), ValueError, [r"\bkey\b"]),
    # ---- dtypes and devices
    ("na2d-k-dtype", na2(k=Q2.float()), VT, [r"\bkey\b", "float32"]),
    ("na2d-v-dtype", na2(v=Q2.half()), VT, [r"\bvalue\b"]),
    ("na2d-int-dtype", na2(q=Q2.long(), k=Q2.long(), v=Q2.long()), VT, [r"\bquery\b", "int64"]),
    ("na2d-bool-dtype", na2(q=Q2.bool(), k=Q2.bool(), v=Q2.bool()), VT, [r"\bquery\b"]),
    ("na2d-k-meta-device", na2(k=t(1, 6, 8, 2, 4, device="meta")), ValueError, [r"\bkey\b", "meta"]),
    ("na2d-q-not-tensor", na2(q=Q2.tolist()), TypeError, [r"\bquery\b"]),
    # ---- kernel / dilation / stride values
    ("na2d-kernel-zero", na2(kernel_size=0), ValueError, [r"kernel_size"]),
    ("na2d-kernel-negative", na2(kernel_size=(3, -1)), ValueError, [r"kernel_size", r"-1"]),
    ("na2d-dilation-zero", na2(dilation=0), ValueError, [r"dilation"]),
    ("na2d-dilation-negative", na2(dilation=(1, -2)), ValueError, [r"dilation"]),
    ("na2d-stride-zero", na2(stride=0), ValueError, [r"\bstride\b"]),
    ("na2d-kernel-times-dilation", na2(kernel_size=3, dilation=(1, 3)), ValueError, [r"kernel_size", r"dilation"]),
    ("na2d-kernel-larger-than-input", na2(kernel_size=(7, 3)), ValueError, [r"kernel_size", r"7"]),
    ("na1d-kernel-larger-than-input", na1(kernel_size=9), ValueError, [r"kernel_size", r"9"]),
    ("na2d-stride-greater-than-kernel", na2(kernel_size=3, stride=(1, 4)), ValueError, [r"\bstride\b", r"4"]),
    ("na2d-kernel-tuple-length", na2(kernel_size=(3, 3, 3)), ValueError, [r"kernel_size"]),
    ("na2d-dilation-tuple-length", na2(dilation=(1,)), ValueError, [r"dilation"]),
    ("na3d-stride-tuple-length", lambda: visattn.na3d(Q3, Q3, Q3, 3, stride=(1, 1)), ValueError, [r"\bstride\b"]),
    ("na2d-causal-tuple-length", na2(is_causal=(True, False, True)), ValueError, [r"is_causal"]),
    ("na2d-kernel-float", na2(kernel_size=3.0), TypeError, [r"kernel_size"]),
    ("na2d-kernel-string", na2(kernel_size="3"), VT, [r"kernel_size"]),
    # ---- rpb
    ("na2d-rpb-shape", na2(rpb=t(2, 5, 4)), ValueError, [r"\brpb\b"]),
    ("na2d-rpb-heads", na2(rpb=t(3, 5, 5)), ValueError, [r"\brpb\b"]),
    ("na2d-rpb-rank", na2(rpb=t(2, 25)), ValueError, [r"\brpb\b"]),
    ("na2d-rpb-with-stride", na2(rpb=t(2, 5, 5), stride=(2, 1)), ValueError, [r"\brpb\b", r"\bstride\b"]),
    # ---- additional kv
    ("na2d-extra-keys-without-values", na2(additional_keys=t(1, 3, 2, 4)), ValueError, [r"additional_values"]),
    ("na2d-extra-values-without-keys", na2(additional_values=t(1, 3, 2, 4)), ValueError, [r"additional_keys"]),
    ("na2d-extra-keys-head-dim", na2(additional_keys=t(1, 3, 2, 5), additional_values=t(1, 3, 2, 4)), ValueError,
     [r"additional_keys"]),
    ("na2d-extra-keys-rank", na2(additional_keys=t(3, 2, 4), additional_values=t(1, 3, 2, 4)), ValueError,
     [r"additional_keys"]),
    ("na2d-extra-values-count", na2(additional_keys=t(1, 3, 2, 4), additional_values=t(1, 2, 2, 4)), ValueError,
     [r"additional_values"]),
    ("na2d-extra-keys-batch", na2(additional_keys=t(2, 3, 2, 4), additional_values=t(2, 3, 2, 4)), ValueError,
     [r"additional_keys"]),
    # ---- scale and backend
    ("na2d-scale-string", na2(scale="0.5"), TypeError, [r"\bscale\b"]),
    ("na2d-scale-tensor-list", na2(scale=[0.5]), TypeError, [r"\bscale\b"]),
    ("agent-scale-nan", agent(scale=math.nan), VT, [r"\bscale\b"]),
    ("na2d-unknown-backend", na2(backend="cuda"), ValueError, [r"\bbackend\b", r"cuda"]),
    ("window-unknown-backend", win(backend="natten"), ValueError, [r"\bbackend\b", r"natten"]),
    ("bra-backend-int", bra(backend=3), ValueError, [r"\bbackend\b"]),
    ("na2d-natten-backend-name", na2(backend="cutlass-fna"), ValueError, [r"\bbackend\b", "NATTEN"]),
    ("window-sdpa-backend", win(backend="sdpa"), ValueError, [r"\bbackend\b", "sdpa"]),
    ("na2d-scale-zero", na2(scale=0.0), ValueError, [r"\bscale\b"]),
    ("na2d-scale-negative", na2(scale=-0.5), ValueError, [r"\bscale\b", r"-0.5"]),
    ("na2d-scale-inf", na2(scale=math.inf), ValueError, [r"\bscale\b"]),
    ("na2d-scale-bool", na2(scale=True), TypeError, [r"\bscale\b"]),
    ("na2d-return-lse-string", na2(return_lse="yes"), TypeError, [r"return_lse"]),
    ("na2d-attention-kwargs-key", na2(attention_kwargs={"scale": 1.0}), ValueError, [r"attention_kwargs"]),
    ("na2d-attention-kwargs-type", na2(attention_kwargs=[("backend", None)]), TypeError, [r"attention_kwargs"]),
    ("na2d-tile-shape-rank", na2(kv_tile_shape=(8,)), ValueError, [r"kv_tile_shape"]),
    ("na2d-torch-compile-type", na2(torch_compile="yes"), TypeError, [r"torch_compile"]),
    ("na2d-causal-int", na2(is_causal=1), TypeError, [r"is_causal"]),
    ("na2d-stride-float", na2(stride=1.0), TypeError, [r"\bstride\b"]),
    ("bra-return-routing-int", bra(return_routing=1), TypeError, [r"return_routing"]),
    # ---- window attention
    ("window-not-dividing", win(window_size=(4, 4)), ValueError, [r"window_size"]),
    ("window-shift-equals-window", win(shift=(3, 1)), ValueError, [r"\bshift\b"]),
    ("window-shift-greater", win(shift=(1, 5)), ValueError, [r"\bshift\b"]),
    ("window-shift-negative", win(shift=-1), ValueError, [r"\bshift\b", r"-1"]),
    ("window-rank-1", win(q=Q1, k=Q1, v=Q1, window_size=4), ValueError, [r"\bquery\b"]),
    ("window-rank-4", win(q=t(1, 2, 2, 2, 2, 2, 4), k=t(1, 2, 2, 2, 2, 2, 4), v=t(1, 2, 2, 2, 2, 2, 4),
                          window_size=2), ValueError, [r"\bquery\b"]),
    ("window-size-zero", win(window_size=0), ValueError, [r"window_size"]),
    ("window-size-tuple-length", win(window_size=(3, 4, 1)), ValueError, [r"window_size"]),
    ("window-rpb-shape", win(rpb=t(2, 7, 7)), ValueError, [r"\brpb\b"]),
    ("window-k-shape", win(k=t(1, 6, 4, 2, 4)), ValueError, [r"\bkey\b"]),
    # ---- agent attention
    ("agent-agents-head-dim", agent(agents=t(1, 3, 2, 5)), ValueError, [r"\bagents\b"]),
    ("agent-agents-heads", agent(agents=t(1, 3, 4, 4)), ValueError, [r"\bagents\b"]),
    ("agent-agents-batch", agent(agents=t(2, 3, 2, 4)), ValueError, [r"\bagents\b"]),
    ("agent-agents-rank", agent(agents=t(3, 2, 4)), ValueError, [r"\bagents\b"]),
    ("agent-agents-dtype", agent(agents=A2.float()), VT, [r"\bagents\b"]),
    ("agent-agent-bias-shape", agent(agent_bias=t(1, 2, 3, 47)), ValueError, [r"agent_bias"]),
    ("agent-agent-bias-transposed", agent(agent_bias=t(1, 2, 48, 3)), ValueError, [r"agent_bias"]),
    ("agent-query-bias-shape", agent(query_bias=t(1, 2, 3, 48)), ValueError, [r"query_bias"]),
    ("agent-k-shape", agent(k=t(1, 6, 7, 2, 4)), ValueError, [r"\bkey\b"]),
    # ---- bi-level routing attention
    ("bra-topk-too-large", bra(topk=5), ValueError, [r"\btopk\b", r"5"]),
    ("bra-topk-zero", bra(topk=0), ValueError, [r"\btopk\b"]),
    ("bra-topk-float", bra(topk=1.5), TypeError, [r"\btopk\b"]),
    ("bra-regions-zero", bra(regions=0), ValueError, [r"\bregions\b"]),
    ("bra-regions-negative", bra(regions=(2, -1)), ValueError, [r"\bregions\b"]),
    ("bra-regions-tuple-length", bra(regions=(2, 2, 2)), ValueError, [r"\bregions\b"]),
    ("bra-regions-exceed-map", bra(regions=(7, 2), topk=1), ValueError, [r"\bregions\b"]),
    ("bra-rank-3d", bra(q=Q3, k=Q3, v=Q3), ValueError, [r"\bquery\b"]),
    ("bra-v-shape", bra(v=t(1, 6, 6, 2, 4)), ValueError, [r"\bvalue\b"]),
]


@pytest.mark.parametrize("call,exc,patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, patterns):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} does not match {pat!r}"


def test_table_is_large_and_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 35


# ---- forced Triton backend on a CPU tensor: must raise and say why (not crash inside a kernel)
FORCED = [
    ("na2d", lambda: visattn.na2d(Q2, Q2, Q2, 3, backend="triton")),
    ("na3d", lambda: visattn.na3d(Q3, Q3, Q3, 3, backend="triton")),
    ("window", lambda: visattn.window_attention(Q2, Q2, Q2, (3, 4), backend="triton")),
    ("agent", lambda: visattn.agent_attention(Q2, Q2, Q2, A2, backend="triton")),
    ("bra", lambda: visattn.bilevel_routing_attention(Q2, Q2, Q2, 2, 2, backend="triton")),
]


@pytest.mark.parametrize("call", [c[1] for c in FORCED], ids=[c[0] for c in FORCED])
def test_forced_triton_on_cpu_says_why(call, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: Triton may legitimately run on the CPU")
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert "triton" in msg.lower()
    assert re.search(r"cuda|gpu|cpu|device|interpret|not available|could not|no triton|import", msg, re.I), msg


def test_valid_baselines_run():
    """Guard for the table: the unmodified baseline calls are valid, so each failure above is the bad argument's."""
    visattn.na1d(Q1, Q1, Q1, 3, backend="reference")
    visattn.na2d(Q2, Q2, Q2, 3, rpb=t(2, 5, 5), additional_keys=t(1, 3, 2, 4), additional_values=t(1, 3, 2, 4),
                 backend="reference")
    visattn.na3d(Q3, Q3, Q3, 3, stride=(1, 1, 2), backend="reference")
    visattn.na2d(Q2, Q2, Q2, 3, None, None, None, backend=None)  # NATTEN's None defaults
    visattn.window_attention(Q2, Q2, Q2, (3, 4), shift=(2, 3), rpb=t(2, 5, 7), backend="reference")
    visattn.agent_attention(Q2, Q2, Q2, A2, agent_bias=t(1, 2, 3, 48), query_bias=t(1, 2, 48, 3), scale=0.5,
                            backend="reference")
    visattn.bilevel_routing_attention(Q2, Q2, Q2, 2, 4, backend="reference")
