"""Cross-check na1d/na2d/na3d (forward, LSE) and the NA modules against NATTEN itself, and validate the test oracle
against NATTEN.

Runs only where ``natten`` imports. On a CPU-only machine NATTEN's "flex-fna" backend (PyTorch FlexAttention,
eager) runs in float32; NATTEN requires kernel_size >= 2 in every dimension. NATTEN 0.21 installs on a CPU machine
without its CUDA library (its flex path is pure PyTorch):
``pip install --no-build-isolation --no-deps natten==0.21.6`` (tests/README-style note in docs/NATTEN.md).
"""

import random
import warnings

import pytest
import torch

natten = pytest.importorskip("natten")

from oracle import na_oracle  # noqa: E402

import visattn  # noqa: E402
import visattn.nn  # noqa: E402

NATTEN_FN = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}
VISATTN_FN = {1: visattn.na1d, 2: visattn.na2d, 3: visattn.na3d}
MAX_LEN = {1: 12, 2: 9, 3: 6}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# on a GPU both libraries may use TF32 tensor cores for float32 matmuls
TOL = dict(atol=2e-5, rtol=2e-5) if DEVICE == "cpu" else dict(atol=5e-3, rtol=5e-3)


def natten_forward(q, k, v, kernel, dilation, stride, causal, scale=None, ak=None, av=None):
    nd = q.dim() - 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is not compiled
        try:
            return NATTEN_FN[nd](q, k, v, kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal,
                                 scale=scale, additional_keys=ak, additional_values=av,
                                 backend=None if DEVICE == "cuda" else "flex-fna")
        except (NotImplementedError, ValueError) as err:
            if "backend" in str(err) or "Flex" in str(err):
                pytest.skip(f"NATTEN {natten.__version__} cannot run this case here: {str(err)[:120]}")
            raise


def random_problem(rng, nd):
    while True:
        dims = []
        for _ in range(nd):
            L = rng.randint(2, MAX_LEN[nd])
            d = rng.choice([1, 1, 2, 3]) if L >= 4 else 1
            d = min(d, L // 2)
            k = rng.randint(2, L // d)
            s = rng.randint(1, k)
            dims.append((L, k, d, s, rng.random() < 0.35))
        shape, kernel, dilation, stride, causal = (tuple(x) for x in zip(*dims, strict=False))
        # kernel == input everywhere is self-attention: NATTEN hands it to its FMHA path (no causal on CPU)
        if all(kk == L for kk, L in zip(kernel, shape, strict=False)) and any(causal):
            continue
        return shape, kernel, dilation, stride, causal


def _inputs(seed, shape, heads=2, head_dim=8, extra=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, *shape, heads, head_dim, generator=g).to(DEVICE) for _ in range(3))
    ak = av = None
    if extra:
        ak, av = (torch.randn(2, extra, heads, head_dim, generator=g).to(DEVICE) for _ in range(2))
    return q, k, v, ak, av


CASES = 33


@pytest.mark.parametrize("case", range(CASES))
def test_visattn_and_oracle_match_natten(case):
    rng = random.Random(5000 + case)
    nd = 1 + case % 3
    shape, kernel, dilation, stride, causal = random_problem(rng, nd)
    extra = 3 if case % 5 == 4 else 0
    q, k, v, ak, av = _inputs(case, shape, heads=rng.choice([1, 2, 4]), extra=extra)
    scale = 0.4 if case % 4 == 1 else None
    want = natten_forward(q, k, v, kernel, dilation, stride, causal, scale, ak, av)
    got = VISATTN_FN[nd](q, k, v, kernel, dilation=dilation, stride=stride, is_causal=causal, scale=scale,
                         additional_keys=ak, additional_values=av)
    what = f"na{nd}d shape={shape} kernel={kernel} dilation={dilation} stride={stride} causal={causal} extra={extra}"
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"visattn vs NATTEN, {what}: {m}")
    oracle = na_oracle(q.cpu(), k.cpu(), v.cpu(), kernel, stride, dilation, causal, scale=scale,
                       additional_keys=None if ak is None else ak.cpu(),
                       additional_values=None if av is None else av.cpu())
    torch.testing.assert_close(oracle.float(), want.cpu(), **TOL,
                               msg=lambda m: f"oracle vs NATTEN, {what}: {m}")


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_borders_stride_dilation_against_natten(nd, causal):
    """Hand-picked corner cases: even kernels, stride = kernel, dilation with non-divisible lengths."""
    shape = {1: (11,), 2: (7, 9), 3: (5, 6, 6)}[nd]
    settings = {
        1: [((4,), (2,), (4,)), ((5,), (2,), (2,)), ((2,), (5,), (1,))],
        2: [((2, 4), (3, 2), (2, 4)), ((3, 3), (2, 3), (3, 1)), ((7, 2), (1, 4), (7, 2))],
        3: [((2, 2, 3), (2, 3, 2), (2, 2, 3)), ((5, 3, 2), (1, 2, 3), (3, 3, 1))],
    }[nd]
    for i, (kernel, dilation, stride) in enumerate(settings):
        if all(kk == L for kk, L in zip(kernel, shape, strict=False)) and causal:
            continue
        cz = (causal,) + (False,) * (nd - 1) if nd > 1 and i % 2 else (causal,) * nd
        q, k, v, _, _ = _inputs(100 * nd + i, shape)
        want = natten_forward(q, k, v, kernel, dilation, stride, cz)
        got = VISATTN_FN[nd](q, k, v, kernel, dilation=dilation, stride=stride, is_causal=cz)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(na_oracle(q.cpu(), k.cpu(), v.cpu(), kernel, stride, dilation, cz).float(),
                                   want.cpu(), **TOL)


# ------------------------------------------------------------------------------------------------ drop-in
def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _natten_backend():
    return None if DEVICE == "cuda" else "flex-fna"


def test_natten_positional_calls_run_unchanged():
    """The same positional call through both libraries: ``na2d(q, k, v, 7, 2)`` is kernel 7, stride 2 in both."""
    q, k, v, _, _ = _inputs(7, (14, 15))
    want = _quiet(natten.na2d, q, k, v, 7, 2, backend=_natten_backend())
    torch.testing.assert_close(visattn.na2d(q, k, v, 7, 2), want, **TOL)
    q1, k1, v1, _, _ = _inputs(8, (20,))
    want = _quiet(natten.na1d, q1, k1, v1, 5, 1, 3, True, 0.3, backend=_natten_backend())
    torch.testing.assert_close(visattn.na1d(q1, k1, v1, 5, 1, 3, True, 0.3), want, **TOL)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_return_lse_matches_natten(nd):
    shape = {1: (16,), 2: (9, 11), 3: (5, 6, 7)}[nd]
    q, k, v, ak, av = _inputs(20 + nd, shape, extra=3 if nd == 2 else 0)
    kw = dict(stride=2, is_causal=(nd == 1), additional_keys=ak, additional_values=av, return_lse=True)
    want_out, want_lse = _quiet(NATTEN_FN[nd], q, k, v, 3, backend=_natten_backend(), **kw)
    out, lse = VISATTN_FN[nd](q, k, v, 3, **kw)
    assert lse.shape == want_lse.shape and lse.dtype == want_lse.dtype
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_module_state_dict_from_natten(nd):
    """A NATTEN module, built by NATTEN's positional order; its state dict loads strictly into visattn's module
    built by the same arguments, and both give the same output."""
    shape = {1: (19,), 2: (10, 12), 3: (5, 6, 6)}[nd]
    args = {1: (32, 4, 5, 2, 2, True), 2: (32, 4, 3, 1, 3), 3: (32, 2, (2, 3, 3), 1, (1, 2, 1), (True, False, False))}
    natten_cls = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D,
                  3: natten.NeighborhoodAttention3D}[nd]
    ours_cls = {1: visattn.nn.NeighborhoodAttention1D, 2: visattn.nn.NeighborhoodAttention2D,
                3: visattn.nn.NeighborhoodAttention3D}[nd]
    torch.manual_seed(nd)
    reference_module = natten_cls(*args[nd]).to(DEVICE).eval()
    ours = ours_cls(*args[nd]).to(DEVICE).eval()
    ours.load_state_dict(reference_module.state_dict())
    x = torch.randn(2, *shape, 32, generator=torch.Generator().manual_seed(nd)).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _quiet(reference_module, x), **TOL)
