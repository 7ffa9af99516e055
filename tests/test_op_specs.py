"""The op spec records (``visattn.functional.OP_SPECS``, issue 20): one record per op that dispatch,
``which_backend``, ``visattn info`` and ``visattn smoke`` read. The expectations below are written out by hand from
the public API (docs/ARCHITECTURE.md, "The functional API"), not read back from the records."""

from __future__ import annotations

import pytest
import torch

import visattn
from visattn import functional, kernels
from visattn.bench import dense, smoke

# key -> (public functions, spatial ranks, kernel entry, predicate, backends), as the docs describe each op
EXPECTED = {
    "na": (("na1d", "na2d", "na3d"), (1, 2, 3), "na", "na_why_not", ("reference", "triton")),
    "window": (("window_attention",), (2, 3), "window", "window_why_not", ("reference", "triton")),
    "agent": (("agent_attention",), (1, 2, 3), "agent", "agent_why_not", ("reference", "triton", "sdpa")),
    "bilevel_routing": (("bilevel_routing_attention",), (2,), "bilevel_routing", "bilevel_routing_why_not",
                        ("reference", "triton")),
    # STA is GNA (stride = tile): it runs on the neighborhood engine
    "halo": (("halo_attention",), (2,), "halo", "halo_why_not", ("reference", "triton")),
    "sliding_tile": (("sliding_tile_attention",), (3,), "na", "na_why_not", ("reference", "triton")),
    "radial": (("radial_attention",), (3,), "radial", "radial_why_not", ("reference", "triton")),
    "vmoba": (("vmoba_attention",), (3,), "vmoba", "vmoba_why_not", ("reference", "triton")),
}


def test_one_record_per_op_with_its_kernel_and_predicate():
    assert [spec.key for spec in functional.OP_SPECS] == list(EXPECTED)
    for spec in functional.OP_SPECS:
        public, ranks, kernel, predicate, backends = EXPECTED[spec.key]
        assert spec.public == public and spec.ranks == ranks and spec.backends == backends
        assert spec.kernel is getattr(kernels, kernel)
        assert spec.why_not is getattr(kernels, predicate)
        for name in public:
            assert callable(getattr(visattn, name)) and name in functional.__all__


def _qkv(rank: int) -> torch.Tensor:
    return torch.randn(1, *([4] * rank), 1, 8)


def _call(name: str, rank: int) -> str:
    q = _qkv(rank)
    if name.startswith("na"):
        return functional.which_backend(name, q, q, q, 3)
    if name == "window_attention":
        return functional.which_backend(name, q, q, q, 2)
    if name == "agent_attention":
        return functional.which_backend(name, q, q, q, torch.randn(1, 2, 1, 8))
    if name == "sliding_tile_attention":
        return functional.which_backend(name, q, q, q, 2, 1)
    if name == "radial_attention":
        return functional.which_backend(name, q, q, q, 4)
    if name == "vmoba_attention":
        return functional.which_backend(name, q, q, q, 2)
    if name == "halo_attention":
        return functional.which_backend(name, q, q, q, 2, 1)
    return functional.which_backend(name, q, q, q, 2, 1)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_ranks_match_what_the_argument_checks_accept(key):
    public, ranks, *_ = EXPECTED[key]
    if key == "na":  # na1d/na2d/na3d take one rank each
        for name, rank in zip(public, ranks, strict=True):
            assert _call(name, rank) == "reference"
            with pytest.raises(ValueError):
                _call(name, rank % 3 + 1)
        return
    for rank in (1, 2, 3, 4):
        if rank in ranks:
            assert _call(public[0], rank) == "reference"
        else:
            with pytest.raises(ValueError):
                _call(public[0], rank)


def test_one_alias_table_and_canonical_names():
    assert functional.op_spec("bra").key == "bilevel_routing"
    assert functional.op_spec("BRA") is functional.op_spec("routing") is functional.op_spec("bilevel_routing_attention")
    assert functional.op_spec("na2d").key == "na"
    q = _qkv(2)
    for name in ("bra", "BRA", "routing", "bilevel_routing", "bilevel_routing_attention"):
        assert functional.which_backend(name, q, q, q, 2, 1) == "reference"
    assert functional.which_backend("window", q, q, q, 2) == "reference"
    assert functional.op_spec("sta") is functional.op_spec("STA") is functional.op_spec("sliding_tile_attention")
    assert functional.op_spec("radial").key == "radial"
    with pytest.raises(ValueError, match="op must be one of"):  # "na" names three public functions: ambiguous
        functional.which_backend("na", q, q, q, 3)
    with pytest.raises(ValueError, match="op must be one of"):
        functional.which_backend("swin", q, q, q, 2)
    with pytest.raises(ValueError, match="op must be one of"):
        functional.op_spec("swin")
    with pytest.raises(TypeError, match="op must be a str"):
        functional.op_spec(3)


def test_a_bad_call_through_an_alias_raises_the_ops_error():
    q = _qkv(2)
    with pytest.raises(ValueError, match="topk"):
        functional.which_backend("bra", q, q, q, 2, 9)


def test_info_lists_every_record_with_its_backends():
    report = functional.available_backends("cpu")
    assert list(report) == list(EXPECTED)
    for key, choices in report.items():
        assert tuple(choices) == EXPECTED[key][4]
        assert choices["reference"] is None
    assert report["agent"]["sdpa"] is None
    registered = {entry.name for entry, _ in visattn.backends.list_kernels("cpu") if entry.family == "attention"}
    assert registered == {f"attention.{key}" for key in EXPECTED}


def test_unknown_op_has_no_triton_kernel():
    assert functional._triton_why_not("swin") == "no Triton kernel for swin attention"


def test_smoke_covers_every_record_with_its_dense_peer():
    assert set(dense.PEERS) == set(EXPECTED)
    assert dense.PEERS["bilevel_routing"] is dense.bilevel_routing and dense.PEERS["na"] is dense.na
    keys = {case[0] for case in smoke.cases(torch.randn(24, 24, 48), torch.device("cpu"), torch.float32)}
    assert keys == set(EXPECTED)


def test_bench_attn_suite_ops_name_records():
    from visattn.bench import suites

    assert {functional.op_spec(op).key for op in suites.OPS} == {"na", "window", "bilevel_routing"}
