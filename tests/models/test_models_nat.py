"""NAT/DiNAT timm family: registration, shapes, training step, features_only, and checkpoint mapping checked
against transformers' own DinatForImageClassification (the code behind the shi-labs hub checkpoints), in float32
and end to end in float64 (logits and final features), without natten (see the ``hf_dinat`` fixture)."""

import importlib
import math
import re

import pytest
import timm
import torch
from family_checks import assert_gradient_matches_finite_differences

import visattn  # noqa: F401  (registers the models)
from visattn.models.nat import checkpoint_filter_fn

NAMES = ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small", "dinat_base",
         "dinat_large", "dinat_large_384", "dinat_large_11x11"]


def test_every_name_is_registered_with_hub_weights():
    assert set(timm.list_models(["nat_*", "dinat_*"])) >= set(NAMES)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.startswith("shi-labs/") and cfg.classifier == "head"


# Parameter counts of every name (meta device, within 2% of the papers): tests/models/test_models_timm_api.py


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in ("nat_mini", "nat_small", "dinat_large_11x11")
                                               else pytest.mark.slow) for n in NAMES])
def test_train_step_every_name_shallow(name):
    """Every name through timm.create_model (depth and width cut for CPU time), logits of batch 2, and the backward
    of every parameter checked against finite differences in float64 (the forward's values: the transformers
    comparisons below)."""
    first_heads = {"small": 3, "base": 4, "large": 6}.get(name.split("_")[1], 2)  # registered stage-1 heads
    model = timm.create_model(name, depths=(1, 1, 2, 1), embed_dim=8 * first_heads, num_classes=7,
                              drop_path_rate=0.0).double().eval()  # head_dim 8
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert model(x).shape == (2, 7)
    assert_gradient_matches_finite_differences(model, x)


def test_dinat_dilation_schedules():
    def dilations(m):
        return [[blk.attn.dilation[0] for blk in stage.blocks] for stage in m.levels]

    mini = timm.create_model("dinat_mini", embed_dim=16)
    assert dilations(mini) == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]  # dinat.py
    large_384 = timm.create_model("dinat_large_384", embed_dim=48, depths=(3, 4, 4, 2))
    assert dilations(large_384) == [[1, 13, 1], [1, 6, 1, 6], [1, 3, 1, 3], [1, 1]]
    assert all(d == 1 for stage in dilations(timm.create_model("nat_mini", embed_dim=16)) for d in stage)


@pytest.mark.slow
def test_dinat_mini_full_depth_train_step():
    model = timm.create_model("dinat_mini")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.levels[0].blocks[1].attn.rpb.grad.abs().sum() > 0


def test_features_only_nhwc_maps_match_transformers(hf_dinat, tmp_path):
    """features_only gives NHWC stage maps (shapes, reductions, channels) whose values equal transformers' Dinat
    stage outputs before downsampling (``output_hidden_states_before_downsampling``), float64, on nat_tiny's own
    widths and a 32x64 input (padding path at every stage)."""
    from transformers.models.dinat.configuration_dinat import DinatConfig

    config = DinatConfig(embed_dim=64, depths=[1, 1, 2, 1], num_heads=[2, 4, 8, 16], kernel_size=7, mlp_ratio=3.0,
                         dilations=[[1], [1], [1, 1], [1]], layer_scale_init_value=0.0)
    hf = hf_dinat.DinatModel(config).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prm in hf.parameters():
            value = torch.randn(prm.shape, generator=gen) * 0.2 + (1.0 if prm.dim() == 1 and prm.shape[0] > 1 else 0.0)
            prm.copy_(value)  # float32 values: timm's pretrained path builds the model in float32 before .double()
    torch.save({"dinat." + k: v for k, v in hf.state_dict().items()}, tmp_path / "hf.pth")
    model = timm.create_model("nat_tiny", features_only=True, depths=(1, 1, 2, 1), pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "hf.pth"))).double().eval()
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    with torch.no_grad():
        feats = model(x)
        embedded = hf.embeddings(x)
        stages = hf.encoder(embedded, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 64), (2, 4, 8, 128), (2, 2, 4, 256), (2, 1, 2, 512)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for got, want in zip(feats, stages.hidden_states[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    subset = timm.create_model("dinat_mini", features_only=True, out_indices=(1, 3))
    assert subset.feature_info.channels() == [128, 512]


def test_headless_pooling_and_reset_classifier():
    model = timm.create_model("nat_mini", num_classes=0, depths=(1, 1, 2, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model(x)
        features = model.forward_features(x)
    assert pooled.shape == (2, 512) and features.shape == (2, 1, 1, 512)
    torch.testing.assert_close(pooled, features.mean((1, 2)))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 1, 1, 512)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


def test_grad_checkpointing_same_result_and_no_weight_decay():
    torch.manual_seed(0)
    model = timm.create_model("nat_mini", depths=(1, 1, 2, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    torch.testing.assert_close(model.eval()(x), plain)
    decay_free = model.no_weight_decay()
    assert decay_free == {n for n, _ in model.named_parameters() if n.endswith("attn.rpb")} and decay_free


def test_bad_model_args():
    with pytest.raises(ValueError, match="dilations"):
        timm.create_model("nat_mini", dilations=[[1, 2]])
    with pytest.raises(ValueError, match="num_heads"):
        timm.create_model("nat_mini", num_heads=(2, 4))


# ----------------------------------------------------------------------------------------------- checkpoints
def _window_start(i, length, kernel, dilation):
    """NATTEN 0.17 ``get_window_start`` (non-causal), from csrc/include/natten/cpu/naive/natten_cpu_commons.h."""
    half = kernel // 2
    group, idx = i % dilation, i // dilation
    group_len = (length + dilation - 1) // dilation
    if group >= dilation - (group_len * dilation - length):
        group_len -= 1
    start = max(idx - half, 0) + (idx + half >= group_len) * (group_len - idx - half - 1)
    return start * dilation + group


def _pb_start(i, length, kernel, dilation):
    """NATTEN 0.17 ``get_pb_start``: first rpb row of query i's window."""
    half = kernel // 2
    if dilation <= 1:
        return half + (i < half) * (half - i) + (i + half >= length) * (length - i - 1 - half)
    if i - half * dilation < 0:
        return kernel - 1 - i // dilation
    if i + half * dilation >= length:
        return (length - i - 1) // dilation
    return half


def _tables(length, kernel, dilation):
    keys = torch.tensor([[_window_start(i, length, kernel, dilation) + a * dilation for a in range(kernel)]
                         for i in range(length)])
    rows = torch.tensor([[_pb_start(i, length, kernel, dilation) + a for a in range(kernel)] for i in range(length)])
    return keys, rows


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    """Legacy NATTEN op as transformers calls it: [B, h, H, W, D] -> logits [B, h, H, W, k*k] (+ rpb)."""
    height, width = query.shape[2:4]
    ki, ri = _tables(height, kernel_size, dilation)
    kj, rj = _tables(width, kernel_size, dilation)
    gathered = key[:, :, ki[:, None, :, None], kj[None, :, None, :]]  # [B, h, H, W, k, k, D]
    logits = (query[:, :, :, :, None, None, :] * gathered).sum(-1)
    logits = logits + rpb[:, ri[:, None, :, None], rj[None, :, None, :]]
    return logits.flatten(-2)


def natten2dav(attn, value, kernel_size, dilation):
    height, width = value.shape[2:4]
    ki, _ = _tables(height, kernel_size, dilation)
    kj, _ = _tables(width, kernel_size, dilation)
    gathered = value[:, :, ki[:, None, :, None], kj[None, :, None, :]]
    weights = attn.unflatten(-1, (kernel_size, kernel_size))[..., None]
    return (weights * gathered).sum((-3, -2))


SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), kernel_size=3, mlp_ratio=2.0)


@pytest.fixture
def hf_dinat(monkeypatch):
    """transformers' Dinat modeling module, runnable without natten.

    transformers needs natten for two things only: the legacy ops ``natten2dqkrpb`` / ``natten2dav`` (its
    ``NeighborhoodAttention.forward``) and a ``requires_backends(self, ["natten"])`` gate in the models' constructors.
    The gate is bypassed (``requires_backends`` replaced by a no-op in that one module) and the forward is replaced
    by ``_heads_first_attention``, which computes neighborhood attention with the brute-force gathers above, written
    from NATTEN 0.17's CPU window/rpb-start formulas (independent of visattn). Everything else — embeddings,
    layers, layer scale, downsamplers, norms, head — is transformers' own code, so the test needs no natten and
    runs in CI."""
    module = importlib.import_module("transformers.models.dinat.modeling_dinat")
    monkeypatch.setattr(module, "requires_backends", lambda *args, **kwargs: None)
    monkeypatch.setattr(module.NeighborhoodAttention, "forward", _heads_first_attention)
    return module


def _heads_first_attention(self, hidden_states, output_attentions=False):
    """transformers 4.x NeighborhoodAttention.forward layout. transformers 5.x feeds the legacy ops
    ``view(B, H, W, heads, d).transpose(1, 2)`` = [B, W, H, heads, d] instead of [B, heads, H, W, d]; that path
    cannot have run since NATTEN dropped the ops, so the 4.x layout (the one the hub weights came from) is used."""
    def to_heads(t):
        return t.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).permute(0, 3, 1, 2, 4)

    query = to_heads(self.query(hidden_states)) / math.sqrt(self.attention_head_size)
    key, value = to_heads(self.key(hidden_states)), to_heads(self.value(hidden_states))
    probs = natten2dqkrpb(query, key, self.rpb, self.kernel_size, self.dilation).softmax(-1)
    context = natten2dav(self.dropout(probs), value, self.kernel_size, self.dilation).permute(0, 2, 3, 1, 4)
    return (context.flatten(-2),)


def _hf_model(hf_dinat, dilations, layer_scale):
    from transformers.models.dinat.configuration_dinat import DinatConfig

    config = DinatConfig(embed_dim=SMALL["embed_dim"], depths=list(SMALL["depths"]), num_heads=list(SMALL["num_heads"]),
                         kernel_size=SMALL["kernel_size"], mlp_ratio=SMALL["mlp_ratio"], dilations=dilations,
                         layer_scale_init_value=layer_scale, num_labels=10)
    model = hf_dinat.DinatForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # rpb and layer scale are zeros/constants at init: randomise everything
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model


def _to_original_layout(hf_state: dict) -> dict:
    """transformers keys -> SHI-Labs classification/nat.py keys (names read from both sources)."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        key = re.sub(r"^(nat|dinat)\.", "", key)
        key = key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = key.replace("embeddings.norm", "patch_embed.norm").replace("encoder.levels", "levels")
        key = re.sub(r"^layernorm\.", "norm.", key).replace("classifier.", "head.").replace(".layers.", ".blocks.")
        for old, new in [("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                         ("attention.self.rpb", "attn.rpb"), ("attention.output.dense", "attn.proj"),
                         ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]:
            key = key.replace(old, new)
        part = re.match(r"(.*)\.attention\.self\.(query|key|value)\.(weight|bias)$", key)
        if part:
            qkv.setdefault(f"{part[1]}.attn.qkv.{part[3]}", {})[part[2]] = value
        elif key.endswith("layer_scale_parameters"):
            out[key.replace("layer_scale_parameters", "gamma1")] = value[0]
            out[key.replace("layer_scale_parameters", "gamma2")] = value[1]
        else:
            out[key] = value
    for key, parts in qkv.items():  # NATTEN's fused qkv Linear: output rows are [q; k; v]
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


@pytest.mark.parametrize("family", ["dinat", "nat"])
def test_transformers_checkpoint_matches_transformers_forward(hf_dinat, family):
    """A transformers-format state dict loads strictly after checkpoint_filter_fn and gives transformers' logits,
    through the padding path (64x64 input: stage maps smaller than kernel*dilation)."""
    ours = timm.create_model(f"{family}_mini", num_classes=10, layer_scale=1e-5, **SMALL).eval()
    dilations = [[blk.attn.dilation[0] for blk in stage.blocks] for stage in ours.levels]
    hf = _hf_model(hf_dinat, dilations, 1e-5)
    state = hf.state_dict()
    if family == "nat":  # NatForImageClassification: same names under the "nat." prefix (modeling_nat.py)
        state = {re.sub(r"^dinat\.", "nat.", k): v for k, v in state.items()}
    ours.load_state_dict(checkpoint_filter_fn(state, ours), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,layer_scale,size", [("dinat", 0.5, (64, 48)), ("nat", None, (32, 96))])
def test_float64_logits_and_features_match_transformers(hf_dinat, family, layer_scale, size):
    """End to end in float64 against transformers' Dinat (the hub checkpoints' code) on a randomised transformers
    state dict: logits and the final normalised NHWC feature map (``last_hidden_state``) to 1e-9, through the
    dilations, the layer scales (gamma1 on attention, gamma2 on the MLP), every rpb table, the downsamplers and the
    padding path (maps smaller than kernel*dilation)."""
    ours = timm.create_model(f"{family}_mini", num_classes=10, layer_scale=layer_scale, backend="reference",
                             **SMALL).double().eval()
    dilations = [[blk.attn.dilation[0] for blk in stage.blocks] for stage in ours.levels]
    hf = _hf_model(hf_dinat, dilations, 0.0 if layer_scale is None else layer_scale).double()
    ours.load_state_dict(checkpoint_filter_fn(hf.state_dict(), ours), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want_features = hf.dinat(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), want_features, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=1e-9, atol=1e-9)


def test_original_layout_and_file_loading(hf_dinat, tmp_path):
    """The SHI-Labs .pth layout maps too; files load with weights_only=True / safetensors and via timm."""
    from safetensors.torch import load_file, save_file

    ours = timm.create_model("dinat_mini", num_classes=10, **SMALL).eval()
    dilations = [[blk.attn.dilation[0] for blk in stage.blocks] for stage in ours.levels]
    hf = _hf_model(hf_dinat, dilations, 0.0)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    original = _to_original_layout(hf.state_dict())
    assert "levels.0.downsample.reduction.weight" in original and "levels.3.blocks.1.attn.qkv.weight" in original
    torch.save({"model": original}, tmp_path / "orig.pth")
    loaded = torch.load(tmp_path / "orig.pth", weights_only=True)
    ours.load_state_dict(checkpoint_filter_fn(loaded, ours), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    fresh = timm.create_model("dinat_mini", num_classes=10, **SMALL).eval()
    fresh.load_state_dict(checkpoint_filter_fn(load_file(tmp_path / "model.safetensors"), fresh), strict=True)
    overlay = dict(file=str(tmp_path / "model.safetensors"), num_classes=10)
    via_timm = timm.create_model("dinat_mini", pretrained=True, num_classes=10, **SMALL,
                                 pretrained_cfg_overlay=overlay).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(via_timm(x), want, rtol=1e-4, atol=1e-4)


def test_filter_rejects_incomplete_qkv():
    model = timm.create_model("nat_mini", depths=(1, 1, 2, 1))
    with pytest.raises(ValueError, match="query/key/value"):
        checkpoint_filter_fn({"nat.encoder.levels.0.layers.0.attention.self.query.weight": torch.zeros(64, 64)},
                             model)


def test_own_layout_opens_stages_with_downsamplers():
    """visattn's NAT puts stage i's downsampler at the start of stage i+1 (the sources end stage i with it), which
    is how checkpoint_filter_fn tells the layouts apart. The own-layout round trip through timm and the filter's
    refusals: tests/models/test_models_timm_api.py."""
    own = timm.create_model("dinat_mini", num_classes=10, **SMALL).state_dict()
    assert "levels.1.downsample.reduction.weight" in own and "levels.0.downsample.reduction.weight" not in own


def test_meta_device_img_size_and_11x11_config():
    """Builds on the meta device (no tensor ops at construction); img_size= is accepted; dinat_large_11x11 is
    SHI-Labs' dinat_large_384_11x11 (kernel 11, dilations 8/4/2/1, 384 input)."""
    with torch.device("meta"):
        model = timm.create_model("dinat_large_11x11")
    assert model.levels[0].blocks[1].attn.kernel_size == (11, 11)
    assert [blk.attn.dilation[0] for blk in model.levels[0].blocks] == [1, 8, 1]
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)
    assert timm.create_model("nat_mini", img_size=96, depths=(1, 1, 1, 1), embed_dim=16,
                             num_heads=(1, 2, 4, 8)).img_size == (96, 96)
    with pytest.raises(ValueError, match="output_fmt"):
        timm.create_model("nat_mini", output_fmt="NCHW")
