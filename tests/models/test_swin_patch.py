"""timm's Swin on visattn.window_attention equals timm's own roll + partition + mask path, values and gradients."""

import pytest
import torch

from visattn import backends
from visattn.models.swin_patch import patch_swin, unpatch_swin

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformer  # noqa: E402


def _tiny_swin(seed=0):
    torch.manual_seed(seed)
    model = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                            num_heads=(2, 4), num_classes=5).double()
    for blk in model.modules():  # non-zero bias tables so a wrong rpb layout cannot hide
        if hasattr(blk, "relative_position_bias_table"):
            torch.nn.init.normal_(blk.relative_position_bias_table, std=0.5)
    return model.eval()


def _forward_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _spy_window_calls(monkeypatch) -> list:
    """The shifts of the window-attention calls visattn runs (``functional._window``: what ``window_attention`` and
    the packed-qkv path of Swin v1 blocks both reach; dry runs of the backend choice not counted)."""
    from visattn import functional

    calls = []
    real = functional._window

    def spy(*args, dry_run=False):
        if not dry_run:
            calls.append(args[4])
        return real(*args, dry_run=dry_run)

    monkeypatch.setattr(functional, "_window", spy)
    return calls


def test_patched_swin_matches_timm_values_and_grads(monkeypatch):

    calls = _spy_window_calls(monkeypatch)
    model = _tiny_swin()
    assert any(any(b.shift_size) for b in model.modules() if hasattr(b, "shift_size"))  # shifted blocks exist
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want, want_grads = _forward_and_grads(model, x)
    patch_swin(model)
    with backends.use_backend("reference"):  # on the CPU "auto" keeps timm's path (test below)
        got, got_grads = _forward_and_grads(model, x)
    assert len(calls) == 4 and any(any(shift) for shift in calls)  # every block went through visattn
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-8, atol=1e-10, msg=name)
    unpatch_swin(model)
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_patch_does_not_touch_state_dict_and_is_idempotent():
    model = _tiny_swin()
    keys = list(model.state_dict())
    patch_swin(patch_swin(model))
    assert list(model.state_dict()) == keys


def test_patch_rejects_models_without_swin_blocks():
    with pytest.raises(ValueError, match="SwinTransformerBlock"):
        patch_swin(torch.nn.Linear(2, 2))


def _randomise_position_params(model):
    for name, p in model.named_parameters():  # O(1) biases / scales so a wrong layout or scale cannot hide
        if any(s in name for s in ("relative_position_bias_table", "logit_scale", "cpb_mlp", "q_bias", "v_bias")):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("name,img_size,window", [
    ("swin_tiny_patch4_window7_224", 64, 7),    # stage maps 16, 8, 4, 2: 16 and 8 are not multiples of 7 (padding)
    ("swinv2_tiny_window8_256", 64, 6),         # SwinV2: cosine attention + continuous position bias, padded
    ("swinv2_tiny_window8_256", 96, 4),         # SwinV2, window divides every map
])
def test_every_block_accelerated_and_equal_to_timm(name, img_size, window, monkeypatch):
    """Maps the window does not divide (swin_tiny at 256 has 64 = 9*7 + 1) and SwinV2 run on visattn and match
    stock timm in float64, values and gradients."""
    from visattn.models.swin_patch import patched_block_count

    calls = _spy_window_calls(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, window_size=window, embed_dim=16, depths=(2, 2, 2, 2),
                              num_heads=(1, 2, 2, 4), num_classes=5).double().eval()
    _randomise_position_params(model)
    x = torch.randn(2, 3, img_size, img_size, dtype=torch.float64)
    want, want_grads = _forward_and_grads(model, x)
    patch_swin(model)
    assert patched_block_count(model) == (8, 8)
    with backends.use_backend("reference"):
        got, got_grads = _forward_and_grads(model, x)
    assert len(calls) == 8
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-7, atol=1e-9, msg=key)


def test_attention_dropout_in_training_warns_and_uses_timm():
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(2,), num_heads=(2,),
                            attn_drop_rate=0.1, num_classes=3)
    patch_swin(model).train()
    with backends.use_backend("reference"), pytest.warns(UserWarning, match="attn_drop"):
        model(torch.randn(1, 3, 32, 32))


def test_cpu_auto_runs_timms_path_and_forced_backend_runs_visattn(monkeypatch):
    """On CPU tensors under "auto" the patched blocks take timm's own path (faster there); a forced backend runs
    visattn.window_attention; both equal stock timm."""

    calls = _spy_window_calls(monkeypatch)
    model = _tiny_swin()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        patch_swin(model)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)
        assert calls == []
        with backends.use_backend("reference"):
            torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-10)
        assert len(calls) == 4
