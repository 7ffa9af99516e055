"""timm's MaxViT / MaxxViT on visattn (``patch_timm``): block attention = window attention, grid attention = 2-D
neighborhood attention with kernel G and dilation H/G. The oracle is stock timm (the unpatched model / module on
its own partition + SDPA path): outputs and gradients (input and every parameter), float32, random init, with the
position-bias parameters and layer scales randomised to O(1) so a wrong layout, offset direction or scale cannot
hide."""

import pytest
import torch
from family_checks import assert_close_to_scale, forward_and_grads

from visattn import backends, functional

timm = pytest.importorskip("timm")
from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttention2d, PartitionAttentionCl  # noqa: E402

from visattn.models import maxvit_patch, patch_timm, unpatch_timm  # noqa: E402

# shrunken configs (timm's kwargs overlay onto the model cfg): 4 stages, one block each, 8-channel heads
TINY = dict(embed_dim=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_width=8, transformer_dim_head=8, num_classes=5)


def _randomise(model):
    for name, p in model.named_parameters():  # O(1) biases, MLP weights and layer scales (timm inits them ~0)
        if "rel_pos" in name or name.endswith("gamma"):
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture
def op_calls(monkeypatch):
    """Records (op, window/kernel, dilation) of every visattn call the patched modules make."""
    calls = []
    real_window, real_na2d = functional.window_attention, functional.na2d

    def window(q, k, v, window_size, *args, **kwargs):
        calls.append(("window", tuple(window_size), (1, 1), tuple(q.shape[1:3])))
        return real_window(q, k, v, window_size, *args, **kwargs)

    def na2d(q, k, v, kernel_size, *args, **kwargs):
        calls.append(("na2d", tuple(kernel_size), tuple(kwargs["dilation"]), tuple(q.shape[1:3])))
        return real_na2d(q, k, v, kernel_size, *args, **kwargs)

    monkeypatch.setattr(functional, "window_attention", window)
    monkeypatch.setattr(functional, "na2d", na2d)
    return calls


def _check_equal(model, x, op_calls, expected_modules):
    want, want_grads = forward_and_grads(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = patch_timm(model)
    assert report.total == expected_modules and not report.skipped
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with backends.use_backend("reference"):  # on the CPU "auto" keeps timm's path (tested below)
        got, got_grads = forward_and_grads(model, x)
    assert op_calls, "no module ran on visattn"
    for op, window, dilation, (height, width) in op_calls:  # grid = dilated NA whose kernel covers the map
        if op == "na2d":
            assert (window[0] * dilation[0], window[1] * dilation[1]) == (height, width)
        else:
            assert dilation == (1, 1) and height % window[0] == 0 and width % window[1] == 0
    assert_close_to_scale(got, want)
    assert got_grads.keys() == want_grads.keys()
    for key in want_grads:
        assert_close_to_scale(got_grads[key], want_grads[key], key)
    return report


# (name, extra kwargs, image size (None: the model's default), modules patched)
MODELS = [
    ("maxvit_tiny_tf_224", {}, None, 8),                    # TF layout: RelPosBiasTf, head_first=False
    ("maxvit_tiny_tf_224", {}, (128, 96), 8),               # non-square partitions (4, 3), dilations (8, 8) .. (1, 1)
    ("maxvit_rmlp_nano_rw_256", {}, None, 8),               # RelPosMlp (log-coordinate MLP bias)
    ("maxvit_rmlp_nano_rw_256", {}, 192, 8),                # window 6
    ("maxxvit_rmlp_nano_rw_256", {}, None, 8),              # ConvNeXt conv blocks, layer scale, RelPosMlp
    ("maxxvit_rmlp_nano_rw_256", {}, (96, 160), 8),
    ("maxvit_tiny_rw_224", dict(transformer_use_nchw_attn=True), 160, 8),   # PartitionAttention2d, RelPosBias
    ("maxvit_tiny_pm_256", {}, 128, 4),                     # ParallelPartitionAttention (block | grid concatenated)
    ("maxxvitv2_nano_rw_256", {}, 128, 4),                  # grid attention only (no_block_attn)
]


@pytest.mark.parametrize("name,extra,img_size,modules", MODELS)
def test_patched_model_equals_timm(name, extra, img_size, modules, op_calls):
    torch.manual_seed(0)
    kwargs = {**TINY, **extra} if img_size is None else {**TINY, **extra, "img_size": img_size}
    model = _randomise(timm.create_model(name, **kwargs)).eval()
    side = model.img_size
    x = torch.randn(1, 3, *side)  # batch 2 in the module tests below
    _check_equal(model, x, op_calls, modules)
    assert {op for op, *_ in op_calls} == ({"na2d"} if name.startswith("maxxvitv2") else {"na2d", "window"})


def test_patched_model_runs_at_another_input_size_than_built(op_calls):
    """Partition sizes are fixed at creation; a larger input the partitions divide changes the grid dilations."""
    torch.manual_seed(1)
    model = _randomise(timm.create_model("maxvit_tiny_tf_224", **TINY, img_size=128)).eval()
    _check_equal(model, torch.randn(1, 3, 256, 128), op_calls, 8)
    assert ("na2d", (4, 4), (16, 8), (64, 32)) in op_calls


@pytest.mark.parametrize("rel_pos_type", ["bias", "bias_tf", "mlp"])
@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("layout", [PartitionAttentionCl, PartitionAttention2d])
def test_partition_module_equals_timm_float64(rel_pos_type, partition, layout, op_calls):
    """One timm partition module on its own, in float64 (where float32 rounding cannot hide a wrong term): a
    non-square partition (3, 4) of a 12 x 16 map, so grid attention is na2d with kernel (3, 4), dilation (4, 4)."""
    torch.manual_seed(2)
    cfg = MaxxVitTransformerCfg(dim_head=4, window_size=(3, 4), rel_pos_type=rel_pos_type, rel_pos_dim=16,
                                head_first=rel_pos_type != "bias_tf")
    module = _randomise(layout(12, partition_type=partition, cfg=cfg)).double().eval()
    x = torch.randn(2, 12, 16, 12, dtype=torch.float64)
    if layout is PartitionAttention2d:
        x = x.permute(0, 3, 1, 2).contiguous()
    want, want_grads = forward_and_grads(module, x)
    maxvit_patch.patch_module(module)
    with backends.use_backend("reference"):
        got, got_grads = forward_and_grads(module, x)
    expect = ("window", (3, 4), (1, 1), (12, 16)) if partition == "block" else ("na2d", (3, 4), (4, 4), (12, 16))
    assert op_calls == [expect]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-9, atol=1e-10, msg=key)


def test_rmlp_training_mode_dropout_matches_timm():
    """RelPosMlp's MLP has dropout (0.125) after its hidden layer: timm evaluates the MLP once per forward on the
    (2P-1)^2 offsets and gathers; the patch evaluates the same MLP on the same table, so with one seed the training
    forward (and its dropout masks) is timm's."""
    torch.manual_seed(3)
    model = _randomise(timm.create_model("maxvit_rmlp_nano_rw_256", **TINY, img_size=128)).train()
    x = torch.randn(2, 3, 128, 128)
    torch.manual_seed(4)
    want = model(x)
    patch_timm(model)
    torch.manual_seed(4)
    with backends.use_backend("reference"):
        got = model(x)
    assert_close_to_scale(got, want)
    torch.manual_seed(5)
    with backends.use_backend("reference"):
        assert (model(x) - want).abs().max() > 1e-3  # the dropout really acts (another seed, another output)


def test_unpatch_restores_exactly_and_cpu_auto_keeps_timms_path(op_calls):
    torch.manual_seed(6)
    model = _randomise(timm.create_model("maxvit_rmlp_nano_rw_256", **TINY, img_size=128)).eval()
    x = torch.randn(1, 3, 128, 128)
    modules = [(n, id(m), type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x)
        patch_timm(model)
        assert patch_timm(model).total == 8  # idempotent
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # CPU + "auto": timm's own path, bit for bit
        assert op_calls == []
        with backends.use_backend("reference"):
            model(x)
        assert len(op_calls) == 8
        assert unpatch_timm(model) is model
        assert [(n, id(m), type(m)) for n, m in model.named_modules()] == modules
        assert not any(maxvit_patch.is_patched(m) for m in model.modules())
        assert not any("_partition_attn" in vars(m) for m in model.modules())
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        with backends.use_backend("reference"):
            torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # timm's path even when forced
    assert len(op_calls) == 8


def test_attention_dropout_in_training_warns_and_uses_timm(op_calls):
    model = timm.create_model("maxvit_tiny_tf_224", **TINY, img_size=64, transformer_attn_drop=0.1).train()
    patch_timm(model)
    with backends.use_backend("reference"), pytest.warns(UserWarning, match="attn_drop"):
        model(torch.randn(1, 3, 64, 64))
    assert op_calls == []


@pytest.mark.parametrize("partition", ["block", "grid"])
def test_patched_module_traces_without_graph_breaks(partition, op_calls):
    """torch.compile(fullgraph=True) of a patched module (RelPosMlp: the bias MLP runs inside the graph) equals
    stock timm: the patched path has no graph break (the ops are custom ops; the backend is chosen at trace time)."""
    torch.manual_seed(7)
    cfg = MaxxVitTransformerCfg(dim_head=4, window_size=(2, 4), rel_pos_type="mlp", rel_pos_dim=16)
    module = _randomise(PartitionAttentionCl(8, partition_type=partition, cfg=cfg)).eval()
    x = torch.randn(1, 4, 8, 8)
    want = module(x)
    maxvit_patch.patch_module(module)
    with backends.use_backend("reference"):
        got = torch.compile(module, backend="eager", fullgraph=True)(x)
    assert [call[0] for call in op_calls] == ["window" if partition == "block" else "na2d"]  # traced visattn's op
    assert_close_to_scale(got, want)
