"""timm conventions shared by every visattn family (NAT/DiNAT, BiFormer, Agent-Swin), on shrunken configs of the
registered names: create by name, forward at two sizes, backward, features_only (hooks and getter),
forward_intermediates against features_only, pooling options, classifier reset, grad checkpointing, channels-last,
torch.compile, every family's own-layout checkpoint round trip and its filter's refusals,
parameter counts on the meta device, and a short real training run on scikit-learn's digits."""

from __future__ import annotations

import pytest
import timm
import torch
from family_checks import (
    assert_grad_checkpointing_matches,
    assert_gradient_matches_finite_differences,
    assert_learns_digits,
)

import visattn  # noqa: F401  (registers the models)
from visattn.models import agent, biformer, medvit, nat

# name -> (create kwargs for a small model of that family, input side that model runs at)
SMALL = {
    "nat_mini": (dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 4, 8), kernel_size=3), 32),
    "dinat_mini": (dict(depths=(1, 2, 2, 1), embed_dim=16, num_heads=(1, 2, 4, 8), kernel_size=3), 32),
    "biformer_tiny": (dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=4,
                           topks=(1, 2, 4, -2)), 32),
    "agent_swin_t": (dict(img_size=32, depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 4, 8),
                          agent_num=(4, 4, 1, 1)), 32),
    # kernel 3 so the stage-3 LFP fits its 4x4 map; GFP widths of 128 keep a 32-channel MHCA part
    "medvitv2_tiny": (dict(stem_chs=(16, 8, 16), depths=(1, 1, 3, 1), dims=(32, 128, 128, 128), head_dim=16,
                           attn_kernel=3), 64),
}
FAMILY_NAMES = {
    "nat": ["nat_mini", "nat_tiny", "nat_small", "nat_base"],
    "dinat": ["dinat_mini", "dinat_tiny", "dinat_small", "dinat_base", "dinat_large", "dinat_large_384",
              "dinat_large_11x11"],
    "biformer": ["biformer_tiny", "biformer_small", "biformer_base"],
    "agent": ["agent_swin_t", "agent_swin_s", "agent_swin_b"],
}
ALL_NAMES = [n for names in FAMILY_NAMES.values() for n in names]
# Parameter counts (millions) from the papers / official READMEs; a test asserts each within 2%.
PAPER_PARAMS_M = {
    "nat_mini": 20, "nat_tiny": 28, "nat_small": 51, "nat_base": 90, "dinat_mini": 20, "dinat_tiny": 28,
    "dinat_small": 51, "dinat_base": 90, "dinat_large": 200, "dinat_large_384": 200, "dinat_large_11x11": 200,
    "biformer_tiny": 13.1, "biformer_small": 25.5, "biformer_base": 56.8,
    "agent_swin_t": 29, "agent_swin_s": 50, "agent_swin_b": 88,
}


def small(name: str, **extra):
    kwargs, side = SMALL[name]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(kwargs, **extra)), side


def small_eval(name: str, batch: int = 2, **extra):
    """``small(name, **extra)`` in eval mode and ``batch`` random images ``[batch, 3, side, side]`` it runs at."""
    model, side = small(name, **extra)
    return model.eval(), torch.randn(batch, 3, side, side)


def test_every_name_is_registered_with_a_pretrained_cfg():
    assert set(timm.list_models(["nat_*", "dinat_*", "biformer_*", "agent_swin_*"])) == set(ALL_NAMES)
    for name in ALL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id or cfg.url, name
        assert cfg.mean and cfg.std and cfg.crop_pct and cfg.license and cfg.paper_ids and cfg.origin_url, name
        assert cfg.classifier == "head"
        assert timm.models.get_arch_name(name) in timm.list_models()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_name_builds_on_meta_with_paper_params(name):
    """Every registered name creates through timm (on the meta device: no memory, no init time) with the paper's
    parameter count within 2%."""
    with torch.device("meta"):
        model = timm.create_model(name)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - PAPER_PARAMS_M[name]) <= 0.02 * PAPER_PARAMS_M[name], (name, millions)


def _gradients_exist(model: torch.nn.Module, x: torch.Tensor) -> None:
    leaves = [x.requires_grad_(True), *model.parameters()]
    grads = torch.autograd.grad(model(x).logsumexp(-1).sum(), leaves, allow_unused=True)
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("name", list(SMALL))
def test_forward_two_sizes_and_backward(name):
    """Logits at the model's size and at another one (agent models are rebuilt for it: their biases are sized by
    img_size), and at both the backward checked against finite differences in float64. The logits' values are
    checked against each family's official forward in test_models_nat.py (transformers' Dinat),
    test_models_biformer_official.py and test_models_agent_swin_official.py."""
    model, side = small(name, num_classes=7, drop_path_rate=0.0)
    model = model.double().eval()
    # MedViTV2 is ReLU / h-swish all through (kinks the 1e-6 finite-difference step crosses): its gradients are
    # checked against the autograd of its official arithmetic instead (test_models_medvit.py); here they must exist
    check = _gradients_exist if name.startswith("medvitv2") else assert_gradient_matches_finite_differences
    out = model(torch.randn(2, 3, side, side, dtype=torch.float64))
    assert out.shape == (2, 7)
    check(model, torch.randn(2, 3, side, side, dtype=torch.float64))
    other = 64
    if name.startswith("agent"):  # agent biases are sized by img_size: rebuild at the other size
        model = small(name, num_classes=7, drop_path_rate=0.0, img_size=other)[0]
        model = model.double().eval()
    check(model, torch.randn(1, 3, other, other, dtype=torch.float64))


@pytest.mark.parametrize("name", list(SMALL))
def test_features_only_and_forward_intermediates_agree(name):
    model, x = small_eval(name)
    side = x.shape[-1]
    feats = small(name, features_only=True)[0].eval()  # same seed, same construction order: same weights
    getter = small(name, features_only=True, feature_cls="getter")[0].eval()
    with torch.no_grad():
        hooked = feats(x)
        got = getter(x)
        inter = model.forward_intermediates(x, intermediates_only=True)
        final, inter2 = model.forward_intermediates(x)
    assert len(hooked) == len(got) == len(inter) == 4
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    channels = feats.feature_info.channels()
    for i, (h, g, t) in enumerate(zip(hooked, got, inter, strict=True)):
        nchw = h if model.output_fmt == "NCHW" else h.permute(0, 3, 1, 2)
        assert nchw.shape == (2, channels[i], side // 2 ** (i + 2), side // 2 ** (i + 2))
        torch.testing.assert_close(g, nchw)  # the getter gives NCHW maps
        torch.testing.assert_close(t, nchw)
    for a, b in zip(inter, inter2, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(x))
        last = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    want = final if model.output_fmt == "NCHW" else final.permute(0, 3, 1, 2)
    torch.testing.assert_close(last, want)


@pytest.mark.parametrize("name", list(SMALL))
def test_prune_intermediate_layers_and_stop_early(name):
    model, x = small_eval(name, batch=1)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert kept == [0, 1] and model.num_classes == 0
    for a, b, c in zip(want, early, pruned, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    with pytest.raises(AssertionError):  # timm's feature_take_indices rejects an index past the pruned stages
        model.forward_intermediates(x, indices=[3])


@pytest.mark.parametrize("name", list(SMALL))
def test_global_pool_options_reset_classifier_and_pre_logits(name):
    model, x = small_eval(name, num_classes=5)
    with torch.no_grad():
        fmap = model.forward_features(x)
        dims = (2, 3) if model.output_fmt == "NCHW" else (1, 2)
        pooled = {"avg": fmap.mean(dims), "max": fmap.amax(dims)}
        pooled["avgmax"] = 0.5 * (pooled["avg"] + pooled["max"])
        pooled["catavgmax"] = torch.cat([pooled["avg"], pooled["max"]], 1)
        for pool, want in pooled.items():
            model.reset_classifier(3, global_pool=pool)
            torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), want)
            assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")
        torch.testing.assert_close(model(x), fmap)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    assert timm.create_model(name, num_classes=0, **SMALL[name][0])(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", list(SMALL))
def test_grad_checkpointing_group_matcher_and_no_weight_decay(name):
    """Checkpointed stages give the same outputs and gradients (train mode, batch statistics, no drop path)."""
    model, side = small(name, drop_path_rate=0.0)
    model.train()
    assert_grad_checkpointing_matches(model, torch.randn(2, 3, side, side))
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


@pytest.mark.parametrize("name", list(SMALL))
def test_channels_last_and_reference_backend(name):
    model, x = small_eval(name)
    with torch.no_grad():
        want = model(x)
        for module in model.modules():
            if isinstance(getattr(module, "backend", None), str):
                module.backend = "reference"
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_matches_eager():
    """Agent and window attention blocks of Agent-Swin through torch.compile on the CPU (reference backend).

    backend="aot_eager": dynamo + AOTAutograd tracing of the visattn ops (what breaks on a graph break or a wrong
    fake implementation) without inductor's C++ build, which takes minutes on a 2-core CPU."""
    model, side = small("agent_swin_t")
    blocks = torch.nn.Sequential(model.layers[0].blocks[0], model.layers[3].blocks[0]).eval()  # 'A' and 'B'
    x = torch.randn(2, side // 4, side // 4, 16)
    with torch.no_grad():
        stage1 = blocks[0]
        want = stage1(x)
        got = torch.compile(stage1, backend="aot_eager")(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        y = torch.randn(2, side // 32, side // 32, 128)
        torch.testing.assert_close(torch.compile(blocks[1], backend="aot_eager")(y), blocks[1](y), rtol=1e-5,
                                   atol=1e-5)


# ----------------------------------------------------------------------------------------------- checkpoints
FAMILY_MODULE = {"nat_mini": nat, "dinat_mini": nat, "biformer_tiny": biformer, "agent_swin_t": agent,
                 "medvitv2_tiny": medvit}


@pytest.mark.parametrize("name", list(SMALL))
def test_own_layout_round_trips_through_pretrained_cfg_overlay(name, tmp_path):
    """A state dict saved from the model passes its family's checkpoint_filter_fn unchanged (NAT's filter once
    shifted its own downsample keys a second time) and reloads by file through timm with the same outputs."""
    model, x = small_eval(name, batch=1, num_classes=10)
    own = model.state_dict()
    mapped = FAMILY_MODULE[name].checkpoint_filter_fn(own, model)
    assert list(mapped) == list(own) and all(mapped[k] is own[k] for k in own)
    torch.save(own, tmp_path / "own.pth")
    reloaded = timm.create_model(name, pretrained=True, num_classes=10, **SMALL[name][0],
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "own.pth"), num_classes=10)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


@pytest.mark.parametrize("family", [nat, biformer, agent, medvit],
                         ids=lambda module: module.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("bad,match", [(None, "None"), (torch.zeros(2, 2), "bare tensor"), ({0: 1}, "strings"),
                                       ({3: torch.zeros(1)}, "strings"), ([("a", 1)], "dict"), ("levels.0", "dict")])
def test_filter_rejects_non_state_dicts(family, bad, match):
    with pytest.raises(TypeError, match=match):
        family.checkpoint_filter_fn(bad, None)


# ----------------------------------------------------------------------------------------------- real data
DIGITS = {  # shrunken configs of each family for 32x32 digits (16 -> 8 -> 4 -> 2 -> 1 maps)
    "nat_mini": dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 4, 8), kernel_size=3),
    "biformer_tiny": dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=2,
                          topks=(1, 2, 2, -2)),
    "agent_swin_t": dict(img_size=32, depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 4, 8),
                         agent_num=(4, 4, 1, 1)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIGITS))
def test_short_training_on_digits_reduces_loss(name):
    """A real data set (scikit-learn's 8x8 digits, upsampled): 60 AdamW steps of a shrunken model of the family
    must cut the held-out cross-entropy clearly below chance (log 10 = 2.30) and reach > 50% accuracy."""
    torch.manual_seed(0)
    assert_learns_digits(timm.create_model(name, num_classes=10, drop_path_rate=0.0, **DIGITS[name]))
