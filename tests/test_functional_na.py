"""Neighborhood attention: visattn's reference backend vs the independent brute-force oracle (tests/oracle.py).

Forward and gradients (q, k, v, rpb, additional kv) in float64 over seeded sweeps of small 1-D/2-D/3-D problems,
plus hypothesis, low-precision smoke and backend="auto".
"""

import itertools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import as_tuple, assert_fwd_bwd_match, make_qkv, na_mask, na_mask_1d, na_oracle

import visattn

NA = {1: visattn.na1d, 2: visattn.na2d, 3: visattn.na3d}
MAX_LEN = {1: 10, 2: 9, 3: 6}


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def random_dim(rng, max_len, causal_p=0.35):
    """(L, kernel, dilation, stride, causal) for one dimension, satisfying the constraints."""
    L = rng.randint(2, max_len)
    d = rng.choice([1, 1, 1, 2, 3])
    if d > L // 1 or L // d < 1:
        d = 1
    k = rng.randint(1, L // d)
    s = rng.randint(1, k)
    return L, k, d, s, rng.random() < causal_p


def run_case(nd, shape, kernel, dilation, stride, causal, *, seed, batch=2, heads=2, head_dim=4, use_rpb=False,
             extra=0, fused=False, scale=None, head_dim_v=None):
    gen = _gen(seed)
    (q, k, v), fused_leaf = make_qkv(batch, shape, heads, head_dim, gen=gen, fused=fused, head_dim_v=head_dim_v)
    leaves = [fused_leaf] if fused else [q, k, v]
    kw = dict(kernel_size=kernel, dilation=dilation, stride=stride, is_causal=causal, scale=scale)
    if use_rpb:
        kt = as_tuple(kernel, nd)
        rpb = torch.randn(heads, *[2 * x - 1 for x in kt], generator=gen, dtype=torch.float64).requires_grad_(True)
        kw["rpb"] = rpb
        leaves.append(rpb)
    if extra:
        ak = torch.randn(batch, extra, heads, head_dim, generator=gen, dtype=torch.float64).requires_grad_(True)
        av = torch.randn(batch, extra, heads, head_dim_v or head_dim, generator=gen,
                         dtype=torch.float64).requires_grad_(True)
        kw.update(additional_keys=ak, additional_values=av)
        leaves += [ak, av]
    what = f"na{nd}d shape={tuple(shape)} {kw | {'rpb': use_rpb, 'additional_keys': extra}}"
    assert_fwd_bwd_match(
        lambda: NA[nd](q, k, v, backend="reference", **kw),
        lambda: na_oracle(q, k, v, **kw),
        leaves, gen=gen, what=what,
    )


# ------------------------------------------------------------------------------------------------------------
# Oracle self-checks (independent of visattn): hand-derived small cases and structural properties
# ------------------------------------------------------------------------------------------------------------


def _rows(mask):
    return [[j for j in range(mask.shape[1]) if mask[i, j]] for i in range(mask.shape[0])]


def test_oracle_hand_cases():
    # L=5, k=3: windows clamped inward at the borders.
    assert _rows(na_mask_1d(5, 3)) == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
    # even kernel k=4 on L=6: left=2, right=1.
    assert _rows(na_mask_1d(6, 4)) == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5], [2, 3, 4, 5]]
    # dilation 2 on L=7, k=2: groups {0,2,4,6} and {1,3,5}.
    assert _rows(na_mask_1d(7, 2, dilation=2)) == [[0, 2], [1, 3], [0, 2], [1, 3], [2, 4], [3, 5], [4, 6]]
    # causal k=3 on L=5.
    assert _rows(na_mask_1d(5, 3, causal=True)) == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    # stride 2, k=3 on L=6: groups {0,1},{2,3},{4,5}, leaders 1,3,5 -> centres 1,3,4.
    assert _rows(na_mask_1d(6, 3, stride=2)) == [[0, 1, 2]] * 2 + [[2, 3, 4]] * 2 + [[3, 4, 5]] * 2
    # stride = kernel = 3 on L=6 is blocked attention.
    assert _rows(na_mask_1d(6, 3, stride=3)) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3
    # causal, stride 2, k=2, L=5: leaders 1, 3, 4 (last group clipped); window ends at the query itself.
    assert _rows(na_mask_1d(5, 2, stride=2, causal=True)) == [[0], [0, 1], [2], [2, 3], [3, 4]]


@pytest.mark.parametrize("seed", range(6))
def test_oracle_structure(seed):
    rng = random.Random(seed)
    for _ in range(20):
        L, k, d, s, _ = random_dim(rng, 12)
        m = na_mask_1d(L, k, d, s, False)
        assert (m.sum(1) == k).all()  # every query sees exactly k keys
        for i in range(L):
            for j in range(L):
                if m[i, j]:
                    assert i % d == j % d
        mc = na_mask_1d(L, k, d, s, True)
        assert (mc.sum(1) <= k).all() and (mc.sum(1) >= 1).all()
        assert not torch.triu(mc, 1).any()  # never attends the future
    # the N-D mask is the product of the 1-D masks
    m2 = na_mask((4, 5), (3, 2), (1, 2), (2, 1), (False, True))
    a, b = na_mask_1d(4, 3, 1, 2, False), na_mask_1d(5, 2, 2, 1, True)
    assert torch.equal(m2, torch.kron(a.int(), b.int()).bool())


# ------------------------------------------------------------------------------------------------------------
# Reference vs oracle
# ------------------------------------------------------------------------------------------------------------

SWEEP = 48


@pytest.mark.parametrize("case", range(SWEEP))
def test_na_random_sweep(case):
    rng = random.Random(1000 + case)
    nd = 1 + case % 3
    dims = [random_dim(rng, MAX_LEN[nd]) for _ in range(nd)]
    shape, kernel, dilation, stride, causal = (tuple(x) for x in zip(*dims, strict=False))
    use_rpb = all(s == 1 for s in stride) and rng.random() < 0.5
    run_case(
        nd, shape, kernel, dilation, stride, causal, seed=case,
        batch=rng.choice([1, 2]), heads=rng.choice([1, 2, 3]), head_dim=rng.choice([2, 4, 8]),
        use_rpb=use_rpb, extra=rng.choice([0, 0, 1, 3]), fused=rng.random() < 0.3,
        scale=rng.choice([None, None, 0.37]),
    )


@pytest.mark.parametrize("causal", list(itertools.product([False, True], repeat=2)))
def test_na2d_every_causal_combination(causal):
    for j, (kernel, dilation, stride) in enumerate([((3, 4), (2, 1), (1, 1)), ((3, 2), (1, 3), (3, 2))]):
        run_case(2, (7, 8), kernel, dilation, stride, causal, seed=j, use_rpb=stride == (1, 1), extra=2)


@pytest.mark.parametrize("causal", list(itertools.product([False, True], repeat=3)))
def test_na3d_every_causal_combination(causal):
    run_case(3, (5, 6, 4), (3, 2, 4), (1, 2, 1), (1, 1, 1), causal, seed=7, heads=2, use_rpb=True)
    run_case(3, (6, 5, 5), (2, 3, 2), (2, 1, 1), (2, 3, 1), causal, seed=8, heads=1, extra=2)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_equals_input(nd, causal):
    shape = {1: (9,), 2: (5, 6), 3: (3, 4, 3)}[nd]
    run_case(nd, shape, shape, 1, 1, causal, seed=nd, use_rpb=True)
    # with kernel = input and no causal mask the result is plain dense attention
    if not causal:
        assert na_mask(shape, shape).all()


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_stride_equals_kernel_blocked(nd):
    shape = {1: (9,), 2: (6, 8), 3: (4, 6, 4)}[nd]
    kernel = {1: (3,), 2: (3, 4), 3: (2, 3, 2)}[nd]
    run_case(nd, shape, kernel, 1, kernel, False, seed=11 + nd, extra=1)
    run_case(nd, shape, kernel, 1, kernel, True, seed=21 + nd)
    # blocked attention: the oracle's mask is block-diagonal when the kernel divides the length
    m = na_mask(shape, kernel, 1, kernel)
    coords = list(itertools.product(*[range(n) for n in shape]))
    blocks = torch.tensor([[c[d] // kernel[d] for d in range(nd)] for c in coords])
    assert torch.equal(m, (blocks[:, None, :] == blocks[None, :, :]).all(-1))


@pytest.mark.parametrize("kernel", range(1, 11))
def test_na1d_odd_and_even_kernels(kernel):
    run_case(1, (10,), kernel, 1, 1, False, seed=kernel, use_rpb=True)
    if 2 * kernel <= 10:
        run_case(1, (10,), kernel, 2, 1, False, seed=kernel + 50, use_rpb=True)
    run_case(1, (10,), kernel, 1, max(1, kernel // 2), True, seed=kernel + 100)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_fused_qkv_views(nd):
    shape = {1: (8,), 2: (6, 7), 3: (4, 5, 4)}[nd]
    run_case(nd, shape, 3, 1, 1, False, seed=31, heads=3, fused=True, use_rpb=True)
    run_case(nd, shape, 2, 2 if nd < 3 else 1, 2, (True,) + (False,) * (nd - 1), seed=32, heads=2, fused=True,
             extra=2)


def test_na2d_rpb_with_causal_and_dilation():
    run_case(2, (9, 8), (3, 3), (3, 2), 1, (True, True), seed=41, heads=3, use_rpb=True, extra=1)
    run_case(2, (9, 8), (4, 2), (2, 2), 1, (False, True), seed=42, heads=2, use_rpb=True)


def test_na2d_value_head_dim_differs():
    """SEMANTICS.md: the output has head_dim_v (v's last dim), which may differ from q/k's head_dim."""
    run_case(2, (6, 6), 3, 1, 1, False, seed=51, head_dim=4, head_dim_v=6, extra=2)


def test_na_batch_and_heads_are_independent():
    """Each (batch, head) slice must equal the op run on that slice alone (no mixing across them)."""
    gen = _gen(61)
    (q, k, v), _ = make_qkv(3, (6, 7), 4, 4, gen=gen)
    out = visattn.na2d(q, k, v, (3, 3), dilation=(1, 2), backend="reference")
    for b in range(3):
        for h in range(4):
            sl = (slice(b, b + 1), slice(None), slice(None), slice(h, h + 1))
            one = na_oracle(q[sl], k[sl], v[sl], (3, 3), dilation=(1, 2))
            torch.testing.assert_close(out[sl].double(), one, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------------------
# Low precision, backend="auto"
# ------------------------------------------------------------------------------------------------------------

LOW_TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2),
           torch.float32: dict(atol=1e-5, rtol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_low_precision_smoke(dtype, nd):
    gen = _gen(70 + nd)
    shape = {1: (10,), 2: (7, 9), 3: (6, 4, 5)}[nd]
    q, k, v = (torch.randn(2, *shape, 2, 8, generator=gen).to(dtype) for _ in range(3))
    rpb = torch.randn(2, *[5] * nd, generator=gen).to(dtype)
    ak, av = (torch.randn(2, 3, 2, 8, generator=gen).to(dtype) for _ in range(2))
    kw = dict(kernel_size=3, dilation=(2,) + (1,) * (nd - 1), is_causal=(False,) * (nd - 1) + (True,), rpb=rpb,
              additional_keys=ak, additional_values=av)
    out = NA[nd](q, k, v, backend="reference", **kw)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    want = na_oracle(q, k, v, **kw)  # oracle upcasts the same (rounded) inputs to float64
    torch.testing.assert_close(out.double(), want, **LOW_TOL[dtype])


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_auto_backend_matches_reference_on_cpu(nd):
    gen = _gen(80 + nd)
    shape = {1: (10,), 2: (7, 8), 3: (4, 5, 6)}[nd]
    for dtype in (torch.float32, torch.float64):
        q, k, v = (torch.randn(1, *shape, 2, 4, generator=gen, dtype=dtype) for _ in range(3))
        kw = dict(kernel_size=3, dilation=1, stride=(2,) + (1,) * (nd - 1), is_causal=(True,) + (False,) * (nd - 1))
        auto = NA[nd](q, k, v, **kw)
        ref = NA[nd](q, k, v, backend="reference", **kw)
        torch.testing.assert_close(auto, ref, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=1e-6)
        torch.testing.assert_close(auto.double(), na_oracle(q, k, v, **kw),
                                   atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Hypothesis
# ------------------------------------------------------------------------------------------------------------


@st.composite
def na_problems(draw):
    nd = draw(st.integers(1, 3))
    dims = []
    for _ in range(nd):
        L = draw(st.integers(1, MAX_LEN[nd]))
        d = draw(st.integers(1, max(1, min(3, L))))
        k = draw(st.integers(1, L // d))
        s = draw(st.integers(1, k))
        dims.append((L, k, d, s, draw(st.booleans())))
    shape, kernel, dilation, stride, causal = (tuple(x) for x in zip(*dims, strict=False))
    use_rpb = all(s == 1 for s in stride) and draw(st.booleans())
    return dict(nd=nd, shape=shape, kernel=kernel, dilation=dilation, stride=stride, causal=causal,
                use_rpb=use_rpb, extra=draw(st.sampled_from([0, 2])), fused=draw(st.booleans()),
                heads=draw(st.integers(1, 2)), head_dim=draw(st.sampled_from([1, 3, 8])),
                seed=draw(st.integers(0, 2**16)))


@settings(deadline=None, max_examples=60, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(na_problems())
def test_na_hypothesis(p):
    run_case(p["nd"], p["shape"], p["kernel"], p["dilation"], p["stride"], p["causal"], seed=p["seed"],
             batch=1, heads=p["heads"], head_dim=p["head_dim"], use_rpb=p["use_rpb"], extra=p["extra"],
             fused=p["fused"])


# ------------------------------------------------------------------------------------------------------------
# The reference's chunked path (tiny problems never chunk under the default budget: force it)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [700, 3000])
def test_reference_chunked_path(budget, monkeypatch):
    import visattn.reference as reference

    if not hasattr(reference, "CHUNK_ELEMENTS"):
        pytest.skip("visattn.reference has no CHUNK_ELEMENTS budget to shrink")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    run_case(2, (7, 9), (3, 4), (2, 1), 1, (False, True), seed=90 + budget, use_rpb=True, extra=2, fused=True)
    run_case(3, (4, 5, 6), (2, 3, 3), (1, 1, 2), (2, 1, 2), (True, False, False), seed=91, extra=1)
    run_case(1, (10,), 4, 2, 3, False, seed=92, heads=3)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)  # one query per chunk
    run_case(1, (7,), 3, 1, 1, True, seed=93, use_rpb=True, extra=1)


def test_scalar_arguments_broadcast_to_every_dimension():
    """An int/bool argument means the same value in every dimension."""
    run_case(3, (6, 5, 6), 2, 2, 2, True, seed=95, extra=1)
    run_case(2, (8, 9), 4, 2, 1, True, seed=96, use_rpb=True)
    run_case(2, (8, 9), 3, 1, 3, False, seed=97)
