"""timm's MaxViT partition modules on visattn's fused Triton kernels (TRITON_INTERPRET=1, tiny shapes), against
stock timm: block = window attention with a bias table, grid = neighborhood attention with dilation H/G, a kernel
covering the whole dilation group, and a trained rpb (forward and backward: input and every parameter)."""

from __future__ import annotations

import pytest
from interpreted import run_case_interpreted


def run_case() -> dict:
    """Child-process body: max error relative to each tensor's scale, per case."""
    import torch
    from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl

    from visattn import backends, functional
    from visattn.models import maxvit_patch

    def run(module, x):
        module.zero_grad()
        x = x.clone().requires_grad_(True)
        out = module(x)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out.detach(), x.grad] + [p.grad for p in module.parameters()]

    result = {}
    for rel_pos_type in ("bias_tf", "mlp"):
        for partition in ("block", "grid"):
            torch.manual_seed(0)
            cfg = MaxxVitTransformerCfg(dim_head=16, window_size=(2, 4), rel_pos_type=rel_pos_type, rel_pos_dim=16,
                                        head_first=rel_pos_type != "bias_tf")
            module = PartitionAttentionCl(32, partition_type=partition, cfg=cfg).eval()
            for name, p in module.named_parameters():
                if "rel_pos" in name:
                    torch.nn.init.normal_(p, std=0.5)
            x = torch.randn(1, 4, 8, 32)
            want = run(module, x)
            maxvit_patch.patch_module(module)
            with backends.use_backend("triton"):
                got = run(module, x)
                chosen = functional.last_backend()
            err = max((g - w).abs().max().item() / max(1.0, w.abs().max().item())
                      for g, w in zip(got, want, strict=True))
            result[f"{rel_pos_type}-{partition}"] = {"err": err, "backend": chosen}
    return result


@pytest.mark.slow
def test_partition_modules_on_the_fused_kernels_match_timm():
    result = run_case_interpreted(__file__)
    assert set(result) == {"bias_tf-block", "bias_tf-grid", "mlp-block", "mlp-grid"}
    for case, got in result.items():
        assert got["backend"] == "triton", case
        assert got["err"] <= 1e-5, (case, got)  # float32 through the interpreter: ~2e-6 measured
