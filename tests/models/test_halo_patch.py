"""timm's HaloNet attention (``HaloAttn``) on ``visattn.halo_attention`` (``patch_timm``'s "halonet" family). The
oracle is stock timm (the unpatched model / module on its own unfold + matmul path): outputs and gradients (input
and every parameter), random init with the relative tables randomised to O(1) so a wrong index, scale or layout
cannot hide; float64 per module for every HaloAttn option, float32 for whole tiny ByobNet models at their default
and another image size."""

import pytest
import torch
from family_checks import assert_close_to_scale, forward_and_grads

from visattn import backends, functional

timm = pytest.importorskip("timm")
from timm.layers.halo_attn import HaloAttn  # noqa: E402
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg  # noqa: E402

from visattn.models import halo_patch, patch_timm, unpatch_timm  # noqa: E402


def _randomise(model):
    for name, p in model.named_parameters():
        if name.endswith(("height_rel", "width_rel")):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture
def op_calls(monkeypatch):
    """Records (query map, key map, block, halo) of every halo_attention call the patched modules make."""
    calls = []
    real = functional.halo_attention

    def halo_attention(q, k, v, block_size, halo_size, *args, **kwargs):
        calls.append((tuple(q.shape[1:3]), tuple(k.shape[1:3]), block_size, halo_size))
        return real(q, k, v, block_size, halo_size, *args, **kwargs)

    monkeypatch.setattr(functional, "halo_attention", halo_attention)
    return calls


# HaloAttn options: (kwargs, input map); dim 16, stride 1 unless given
MODULES = [
    (dict(num_heads=2, block_size=4, halo_size=1), 8),
    (dict(num_heads=2, block_size=4, halo_size=2, stride=2), 8),                  # strided query blocks (2x2 / block)
    (dict(num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True), 8),   # full-res attention, then avg pool
    (dict(num_heads=2, block_size=3, halo_size=1, stride=2), 6),                  # block % stride != 0: avg pool
    (dict(num_heads=2, block_size=4, halo_size=1, scale_pos_embed=True), 8),      # relative logits scaled too
    (dict(num_heads=4, block_size=2, halo_size=3, dim_head=6, dim_out=8), 4),     # qk dim != v dim, wide halo
    (dict(num_heads=2, block_size=4, halo_size=1, qk_ratio=0.5, qkv_bias=True), 8),
]


@pytest.mark.parametrize("kwargs, size", MODULES)
def test_halo_module_equals_timm_float64(kwargs, size, op_calls):
    torch.manual_seed(0)
    module = _randomise(HaloAttn(16, **kwargs)).double().eval()
    for p in module.parameters():  # qkv biases too
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 16, size, size, dtype=torch.float64)
    want, want_grads = forward_and_grads(module, x)
    halo_patch.patch_module(module)
    with backends.use_backend("reference"):
        got, got_grads = forward_and_grads(module, x)
    assert len(op_calls) == 1
    qmap, kmap, block, halo = op_calls[0]
    assert kmap == (size, size) and block == kwargs["block_size"] and halo == kwargs["halo_size"]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-9, atol=1e-10, msg=key)


def _tiny_halonet(img_size):
    """halonet26t's structure shrunk: bottleneck stage, a halo stage that downsamples with strided query blocks,
    an avg-pool-downsampling halo stage with scaled relative logits, interleaved blocks, 4x4 blocks, halo 1 / 2."""
    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=2, c=32, s=2, gs=0, br=0.5),
            ByoBlockCfg(type="self_attn", d=1, c=64, s=2, gs=0, br=0.5,
                        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2, avg_down=True,
                                              scale_pos_embed=True)),
        ),
        stem_chs=16,
        stem_type="tiered",
        stem_pool="",
        self_attn_layer="halo",
        self_attn_kwargs=dict(block_size=4, halo_size=2, num_heads=2),
    )
    return _randomise(ByobNet(cfg, num_classes=5, img_size=img_size))


@pytest.mark.parametrize("img_size, x_size", [(64, 64), (64, 96)])
def test_patched_model_equals_timm(img_size, x_size, op_calls):
    torch.manual_seed(1)
    model = _tiny_halonet(img_size).eval()
    x = torch.randn(2, 3, x_size, x_size)
    want, want_grads = forward_and_grads(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = patch_timm(model)
    assert report.patched == {"HaloAttn": 3} and not report.skipped
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with backends.use_backend("reference"):
        got, got_grads = forward_and_grads(model, x)
    s = x_size // 4  # the tiered stem (no pool) has stride 4
    assert op_calls == [((s // 2, s // 2), (s, s), 4, 2), ((s // 2, s // 2), (s // 2, s // 2), 4, 2),
                        ((s // 2, s // 2), (s // 2, s // 2), 4, 1)]
    assert_close_to_scale(got, want)
    assert got_grads.keys() == want_grads.keys()
    for key in want_grads:
        assert_close_to_scale(got_grads[key], want_grads[key], key)


def test_unpatch_restores_exactly_and_cpu_auto_keeps_timms_path(op_calls):
    torch.manual_seed(2)
    model = _tiny_halonet(64).eval()
    x = torch.randn(1, 3, 64, 64)
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        patch_timm(model)
        assert patch_timm(model, families=["halonet"]).total == 3  # idempotent
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # CPU + "auto": timm's own path, bit for bit
        assert op_calls == []
        with backends.use_backend("reference"):
            model(x)
        assert len(op_calls) == 3
        assert unpatch_timm(model) is model
        assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
        assert not any(halo_patch.is_patched(m) or "forward" in vars(m) for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        with backends.use_backend("reference"):
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # timm's path even when forced
    assert len(op_calls) == 3


def test_map_the_blocks_do_not_divide_raises_timms_error(op_calls):
    module = HaloAttn(16, num_heads=2, block_size=4, halo_size=1)
    halo_patch.patch_module(module)
    with backends.use_backend("reference"), pytest.raises(AssertionError):
        module(torch.randn(1, 16, 6, 8))
    assert op_calls == []


@pytest.mark.parametrize("name, count", [("halonet26t", 3), ("sehalonet33ts", 4), ("halo2botnet50ts_256", 5),
                                         ("haloregnetz_b", 5), ("lamhalobotnet50ts_256", 3)])
def test_timm_models_report_their_halo_modules(name, count):
    """Every HaloAttn of timm's halo models is patched (creation only: no forward). Counts from timm's configs:
    ``interleave_blocks`` puts self-attention at blocks ``every, 2*every+1, ...`` (every=1: every second block)."""
    model = timm.create_model(name)
    report = patch_timm(model)
    assert report.patched == {"HaloAttn": count} and report.skipped == {}
    unpatch_timm(model)
    assert not any(halo_patch.is_patched(m) for m in model.modules())


def test_patched_module_compiles_without_graph_breaks(op_calls):
    """torch.compile(fullgraph=True) of a patched HaloAttn (reference formulation inside the graph) equals timm."""
    torch.manual_seed(3)
    module = _randomise(HaloAttn(16, num_heads=2, block_size=4, halo_size=1, stride=2)).eval()
    x = torch.randn(1, 16, 8, 8)
    want = module(x)
    halo_patch.patch_module(module)
    with backends.use_backend("reference"):
        got = torch.compile(module, backend="eager", fullgraph=True)(x)
    assert len(op_calls) == 1
    assert_close_to_scale(got, want)
