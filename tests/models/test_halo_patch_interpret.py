"""timm's HaloAttn modules patched onto the fused Triton kernels (TRITON_INTERPRET=1, tiny shapes) against stock
timm in float32: output, input gradient and every parameter's gradient, for each HaloAttn option of
test_halo_patch.py (strided query blocks, avg-pool downsample, scaled relative logits, qk dim != v dim)."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: max error relative to each tensor's scale, per module option."""
    import torch
    from family_checks import forward_and_grads
    from test_halo_patch import MODULES, _randomise
    from timm.layers.halo_attn import HaloAttn

    from visattn import backends
    from visattn.models import halo_patch

    result = {}
    for i, (kwargs, size) in enumerate(MODULES):
        torch.manual_seed(i)
        module = _randomise(HaloAttn(16, **kwargs)).eval()
        x = torch.randn(2, 16, size, size)
        want, want_grads = forward_and_grads(module, x)
        halo_patch.patch_module(module)
        with backends.use_backend("triton"):
            got, got_grads = forward_and_grads(module, x)
        errs = {"<output>": (got - want).abs().max().item() / max(1.0, want.abs().max().item())}
        for key, value in want_grads.items():
            errs[key] = (got_grads[key] - value).abs().max().item() / max(1.0, value.abs().max().item())
        result[str(kwargs)] = errs
    return result


@pytest.mark.slow
def test_halo_modules_on_the_fused_kernels_match_timm():
    from test_halo_patch import MODULES

    result = run_case_interpreted(__file__)
    assert len(result) == len(MODULES)
    for case, errs in result.items():
        assert len(errs) >= 4, case  # output, input, q and kv weights at least
        bad = {k: e for k, e in errs.items() if not e <= 1e-5}
        assert not bad, f"{case}: {bad}"
