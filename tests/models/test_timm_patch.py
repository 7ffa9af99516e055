"""``patch_timm`` / ``unpatch_timm``: what is patched and reported, what is refused, exact restoration. Numerical
equality with stock timm is tested per family (test_swin_patch.py, test_maxvit_patch.py); here a mixed model checks
that one call reaches both families and that both still match timm."""

import pytest
import torch
from torch import nn

from visattn import backends

timm = pytest.importorskip("timm")

from visattn.models import PatchReport, patch_timm, unpatch_timm  # noqa: E402
from visattn.models.maxvit_patch import is_patched  # noqa: E402
from visattn.models.swin_patch import patch_swin, patched_block_count, unpatch_swin  # noqa: E402

MAXVIT = dict(embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=8, transformer_dim_head=8, num_classes=5,
              img_size=64)


def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=16,
                             depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=5)


class _Pair(nn.Module):
    """A model holding a timm Swin and a timm MaxViT (the two families in one module tree)."""

    def __init__(self):
        super().__init__()
        self.swin, self.maxvit = _swin(), timm.create_model("maxvit_tiny_tf_224", **MAXVIT)

    def forward(self, x):
        return self.swin(x) + self.maxvit(x)


def _snapshot(model):
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snapshot):
    modules, state = snapshot
    assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_mixed_model_report_counts_and_exact_unpatch():
    torch.manual_seed(0)
    model = _Pair().eval()
    x = torch.randn(1, 3, 64, 64)
    snap = _snapshot(model)
    with torch.no_grad():
        want = model(x)
        report = patch_timm(model)
        assert isinstance(report, PatchReport) and report.model == "_Pair"
        assert report.patched == {"SwinTransformerBlock": 8, "PartitionAttentionCl": 8} and report.total == 16
        assert report.skipped == {}
        assert "8 SwinTransformerBlock" in str(report) and "8 PartitionAttentionCl" in str(report)
        _same(model, snap)
        with backends.use_backend("reference"):
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        unpatch_timm(model)
        _same(model, snap)
        assert patched_block_count(model) == (0, 8) and not any(is_patched(m) for m in model.modules())
        assert not any({"_attn", "_partition_attn"} & set(vars(m)) for m in model.modules())
        with backends.use_backend("reference"):
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_families_select_and_patch_swin_is_the_swin_only_alias():
    model = _Pair()
    report = patch_timm(model, families=["maxvit"])
    assert report.patched == {"PartitionAttentionCl": 8} and patched_block_count(model) == (0, 8)
    assert patch_swin(model) is model and patched_block_count(model) == (8, 8)
    unpatch_swin(model)
    assert patched_block_count(model) == (0, 8) and sum(map(is_patched, model.modules())) == 8
    unpatch_timm(model)
    assert sum(map(is_patched, model.modules())) == 0


def test_coatnet_global_attention_is_reported_and_nothing_to_patch_refused():
    """CoAtNet's 'T' blocks attend the whole map (no window or grid): found, reported, never patched."""
    model = timm.create_model("coatnet_pico_rw_224", num_classes=5, img_size=64)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"MaxxVit has nothing to patch.*TransformerBlock2d: global attention"):
        patch_timm(model)
    _same(model, snap)


def test_skipped_module_is_reported_strict_refuses_and_nothing_changes():
    torch.manual_seed(0)
    model = timm.create_model("maxvit_tiny_tf_224", **MAXVIT)
    odd = model.stages[0].blocks[0].attn_grid
    odd.attn.rel_pos = nn.Identity()  # a bias module this patch does not know
    with pytest.raises(ValueError, match=r"patch_timm cannot accelerate 1 of 8 modules of MaxxVit; "
                                         r"stages\.0\.blocks\.0\.attn_grid: .*Identity is not supported"):
        patch_timm(model, strict=True)
    assert not any(is_patched(m) for m in model.modules())
    report = patch_timm(model)
    assert report.patched == {"PartitionAttentionCl": 7} and not is_patched(odd)
    assert list(report.skipped) == ["stages.0.blocks.0.attn_grid"]
    assert "PartitionAttentionCl: relative position module Identity" in report.skipped["stages.0.blocks.0.attn_grid"]


@pytest.mark.parametrize("model,match", [(nn.Linear(2, 2), "Linear has nothing to patch"),
                                         (nn.Sequential(nn.Conv2d(3, 3, 1)), "Sequential has nothing to patch")])
def test_models_without_supported_modules_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        patch_timm(model)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_timm("swin")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        unpatch_timm(None)
    with pytest.raises(ValueError, match="families must name some of"):
        patch_timm(_swin(), families=["lambda"])
    with pytest.raises(ValueError, match="families must name some of"):
        patch_timm(_swin(), families=[])
    with pytest.raises(TypeError, match="families must be an iterable"):
        patch_timm(_swin(), families="swin")


def test_features_only_backbone_is_patched_and_matches_timm():
    torch.manual_seed(0)
    model = timm.create_model("maxvit_rmlp_nano_rw_256", features_only=True, **{**MAXVIT, "num_classes": 0}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        assert patch_timm(model).patched == {"PartitionAttentionCl": 8}
        with backends.use_backend("reference"):
            got = model(x)
    assert len(got) == len(want) == 5  # stem + 4 stages
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
