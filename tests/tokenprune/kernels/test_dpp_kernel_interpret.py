"""CDPruner's one-launch greedy DPP MAP kernel under TRITON_INTERPRET=1: its kept indices equal the eager PyTorch
loop (``backends.use_backend("reference")``) and a plain float64 transcription of the incremental-Cholesky greedy
(``tp_oracles.greedy_map_loop``, run on the same float32 kernel widened to float64) on random PSD kernels,
CDPruner's conditional kernels with and without an instruction, exact ties (duplicate tokens: the first index
wins), near-ties (1e-5 apart), a NaN token (``torch.argmax`` semantics, eager oracle only), k = N and k = 0; column
and earlier-pick tiles smaller than the image exercise the chunked loops."""

from __future__ import annotations

import json
import os

import pytest


def _psd(g: int, n: int, d: int, seed: int, quality=None):
    import torch

    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(g, n, d, generator=gen)
    f = f / f.norm(dim=-1, keepdim=True)
    q = torch.rand(g, n, generator=gen) + 0.1 if quality is None else quality
    return f, q


def _cases():
    import torch

    from visattn.tokenprune.cdpruner import conditional_kernel

    cases = {}
    f, q = _psd(2, 24, 32, 0)
    cases["random"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 10)
    gen = torch.Generator().manual_seed(1)
    visual, text = torch.randn(2, 20, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    text_ok = torch.tensor([[True, True, True], [True, True, False]])
    cases["cdpruner-text"] = (conditional_kernel(visual, text, text_ok), 8)
    cases["cdpruner-theta"] = (conditional_kernel(visual, text, text_ok, theta=0.5), 8)
    cases["cdpruner-no-text"] = (conditional_kernel(visual, None, None), 8)  # diagonal 1 +- rounding: near-ties
    f, q = _psd(1, 16, 24, 2)
    f[0, 9], f[0, 3] = f[0, 2], f[0, 2]  # tokens 2, 3, 9 identical and the best: the first pick is 2
    q[0, 9], q[0, 3] = 2.0, 2.0
    q[0, 2] = 2.0
    cases["exact-ties"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 6)
    f, _ = _psd(1, 16, 24, 3)
    q = torch.linspace(1.0, 0.5, 16)[None].clone()
    q[0, 11] = 1.0 + 1e-5  # the largest by 1e-5: picked before token 0
    q[0, 6] = 1.0 - 1e-5
    cases["near-ties"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 6)
    f, q = _psd(1, 12, 16, 4)
    f[0, 5] = 0.0
    f = f / f.norm(dim=-1, keepdim=True)  # token 5: NaN similarities
    cases["nan"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 5)
    f, q = _psd(2, 6, 8, 5)
    cases["k=n"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 6)
    cases["k=0"] = (q[:, :, None] * (f @ f.transpose(1, 2)) * q[:, None, :], 0)
    return cases


def run_cases() -> dict:
    from tp_oracles import greedy_map_loop

    from visattn import backends
    from visattn.tokenprune.kernels.dpp import dpp_picks
    from visattn.tokenprune.selection import dpp_greedy_map

    results = {}
    for name, (kernel, k) in _cases().items():
        with backends.use_backend("reference", family="tokenprune"):
            eager = dpp_greedy_map(kernel, k).tolist()
        fused = dpp_greedy_map(kernel, k).tolist()  # auto: the kernel (interpreted)
        tiled = dpp_picks(kernel, k, block_n=8, block_t=4, num_stages=2).sort(-1).values.tolist()
        oracle = None if name == "nan" else [greedy_map_loop(m.double().tolist(), k) for m in kernel]
        results[name] = {"fused": fused, "tiled": tiled, "eager": eager, "oracle": oracle}
    return results


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["random", "cdpruner-text", "cdpruner-theta", "cdpruner-no-text", "exact-ties",
                                  "near-ties", "nan", "k=n", "k=0"])
def test_dpp_kernel_matches_eager_loop_and_float64_oracle(interpreted_results, name):
    got = interpreted_results["test_dpp_kernel_interpret"][name]
    assert got["fused"] == got["eager"]
    assert got["tiled"] == got["eager"]
    if got["oracle"] is not None:
        assert got["fused"] == got["oracle"]
    if name == "exact-ties":
        assert 2 in got["fused"][0] and 3 not in got["fused"][0] and 9 not in got["fused"][0]
    if name == "near-ties":
        assert 11 in got["fused"][0]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
