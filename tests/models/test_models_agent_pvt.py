"""Agent-PVT: every registered name against the official README's parameter counts, the timm API (features,
intermediates, pooling, checkpointing, channels-last), and the official model re-derived in float64 from
LeapLabTHU/Agent-Attention ``agent_transformer/models/agent_pvt.py`` (``AgentAttention.forward``,
``Attention.forward``, ``PatchEmbed``, ``PyramidVisionTransformer.forward_features``; configs from
``cfgs/agent_pvt_{t,s,m,b}.yaml``, ``config.py`` and ``models/build.py``): official-layout state dicts (key names and
shapes written from that file) load strictly through ``checkpoint_filter_fn`` and give the official logits."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import assert_cuda_auto_matches_reference, assert_grad_checkpointing_matches, assert_learns_digits
from offline_hub import agent_pvt_official_shapes as official_state_shapes

import visattn  # noqa: F401  (registers the models)
from visattn.models.agent_pvt import PvtAgentAttention, SpatialReductionAttention, checkpoint_filter_fn

NAMES = ["agent_pvt_t", "agent_pvt_s", "agent_pvt_m", "agent_pvt_l"]
# agent_transformer/README.md: params (M) and GFLOPs at 224 (the 256 row: agent_pvt_m.in1k_256)
PAPER_PARAMS_M = {"agent_pvt_t": 11.6, "agent_pvt_s": 20.6, "agent_pvt_m": 35.9, "agent_pvt_l": 48.7}
DEPTHS = {"agent_pvt_t": (2, 2, 2, 2), "agent_pvt_s": (3, 4, 6, 3), "agent_pvt_m": (3, 4, 18, 3),
          "agent_pvt_l": (3, 8, 27, 3)}
# A shrunken config on 32x32 inputs (maps 8, 4, 2, 1); TINY_MIXED adds 'B' blocks and key/value reduction.
TINY = dict(img_size=32, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
            depths=(1, 1, 2, 1), agent_num=(4, 4, 1, 1))
TINY_MIXED = dict(TINY, attn_type="ABAB", sr_ratios=(4, 2, 2, 1), agent_sr_ratios="2111")


def tiny(seed: int = 0, **extra):
    torch.manual_seed(seed)
    return timm.create_model("agent_pvt_t", **dict(TINY, **extra))


# ----------------------------------------------------------------------------------------------- the official model
TINY_OFFICIAL = dict(embed_dims=(16, 32, 48, 64), heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1),
                     agent_num=(4, 4, 1, 1), img_size=32)
TINY_MIXED_OFFICIAL = dict(TINY_OFFICIAL, attn_type="ABAB", sr_ratios=(4, 2, 2, 1), agent_sr_ratios="2111")


def random_official(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for k, s in shapes.items()}


def official_agent_attention(sd, p, x, hw, heads, agent_num, sr):
    """AgentAttention.forward of agent_pvt.py on [B, N, C] tokens of a square hw x hw map, from the official
    state dict ``sd`` (prefix ``p``), written out step by step."""
    b, n, c = x.shape
    hd, pool = c // heads, int(agent_num**0.5)
    q = F.linear(x, sd[p + "q.weight"], sd[p + "q.bias"])
    if sr > 1:
        x_ = F.conv2d(x.permute(0, 2, 1).reshape(b, c, hw, hw), sd[p + "sr.weight"], sd[p + "sr.bias"], stride=sr)
        x_ = F.layer_norm(x_.reshape(b, c, -1).permute(0, 2, 1), (c,), sd[p + "norm.weight"], sd[p + "norm.bias"])
    else:
        x_ = x
    k, v = F.linear(x_, sd[p + "kv.weight"], sd[p + "kv.bias"]).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q.reshape(b, hw, hw, c).permute(0, 3, 1, 2), pool).reshape(b, c, -1)
    agents = agents.permute(0, 2, 1).reshape(b, agent_num, heads, hd).permute(0, 2, 1, 3)
    q = q.reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    k = k.reshape(b, n // sr**2, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(b, n // sr**2, heads, hd).permute(0, 2, 1, 3)
    scale = hd**-0.5
    kv_size = (hw // sr, hw // sr)
    bias1 = F.interpolate(sd[p + "an_bias"], size=kv_size, mode="bilinear").reshape(1, heads, agent_num, -1)
    bias2 = (sd[p + "ah_bias"] + sd[p + "aw_bias"]).reshape(1, heads, agent_num, -1)
    agent_v = torch.softmax((agents * scale) @ k.transpose(-2, -1) + bias1 + bias2, dim=-1) @ v
    bias3 = F.interpolate(sd[p + "na_bias"], size=(hw, hw), mode="bilinear").reshape(1, heads, agent_num, -1)
    bias4 = (sd[p + "ha_bias"] + sd[p + "wa_bias"]).reshape(1, heads, -1, agent_num)
    out = torch.softmax((q * scale) @ agents.transpose(-2, -1) + bias3.permute(0, 1, 3, 2) + bias4, dim=-1) @ agent_v
    out = out.transpose(1, 2).reshape(b, n, c)
    v = v.transpose(1, 2).reshape(b, hw // sr, hw // sr, c).permute(0, 3, 1, 2)
    if sr > 1:
        v = F.interpolate(v, size=(hw, hw), mode="bilinear")
    out = out + F.conv2d(v, sd[p + "dwc.weight"], sd[p + "dwc.bias"], padding=1, groups=c).permute(0, 2, 3, 1).reshape(
        b, n, c)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_sr_attention(sd, p, x, hw, heads, sr):
    """Attention.forward of agent_pvt.py (PVT's spatial-reduction attention), as a dense softmax."""
    b, n, c = x.shape
    hd = c // heads
    q = F.linear(x, sd[p + "q.weight"], sd[p + "q.bias"]).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    x_ = x
    if sr > 1:
        x_ = F.conv2d(x.permute(0, 2, 1).reshape(b, c, hw, hw), sd[p + "sr.weight"], sd[p + "sr.bias"], stride=sr)
        x_ = F.layer_norm(x_.reshape(b, c, -1).permute(0, 2, 1), (c,), sd[p + "norm.weight"], sd[p + "norm.bias"])
    k, v = F.linear(x_, sd[p + "kv.weight"], sd[p + "kv.bias"]).reshape(b, -1, 2, heads, hd).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_forward(sd, x, embed_dims, heads, depths, agent_num, attn_type="AAAA", sr_ratios=(8, 4, 2, 1),
                     agent_sr_ratios="1111", **_):
    """PyramidVisionTransformer.forward of agent_pvt.py (at the size it was built for) from its state dict."""
    b = x.shape[0]
    for i, depth in enumerate(depths):
        e = f"patch_embed{i + 1}."
        x = F.conv2d(x, sd[e + "proj.weight"], sd[e + "proj.bias"], stride=sd[e + "proj.weight"].shape[-1])
        hw = x.shape[-1]
        x = F.layer_norm(x.flatten(2).transpose(1, 2), (embed_dims[i],), sd[e + "norm.weight"], sd[e + "norm.bias"])
        x = x + sd[f"pos_embed{i + 1}"]
        for j in range(depth):
            p = f"block{i + 1}.{j}."
            c = embed_dims[i]

            def ln(t, name, p=p, c=c):
                return F.layer_norm(t, (c,), sd[p + name + ".weight"], sd[p + name + ".bias"], eps=1e-6)

            if attn_type[i] == "A":
                x = x + official_agent_attention(sd, p + "attn.", ln(x, "norm1"), hw, heads[i], agent_num[i],
                                                 int(agent_sr_ratios[i]))
            else:
                x = x + official_sr_attention(sd, p + "attn.", ln(x, "norm1"), hw, heads[i], sr_ratios[i])
            hidden = F.gelu(F.linear(ln(x, "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            x = x + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        if i != len(depths) - 1:
            x = x.reshape(b, hw, hw, -1).permute(0, 3, 1, 2)
    return F.linear(x.mean(dim=1), sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("sr,backend", [(1, "reference"), (2, "reference"), (2, "sdpa")])
def test_agent_attention_matches_official_forward(sr, backend):
    """Values and gradients (input and every parameter) against the official formula, biases O(1)."""
    torch.manual_seed(0)
    hw, heads, agents = 8, 2, 4
    module = PvtAgentAttention(24, heads, (hw, hw), agents, sr_ratio=sr, backend=backend).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # so a transposed or misplaced bias cannot hide
    sd = {k: (v.unsqueeze(0) if k in ("ah_bias", "aw_bias", "ha_bias", "wa_bias") else v)
          for k, v in module.named_parameters()}  # the official 5-D biases are views of ours
    x = torch.randn(2, hw, hw, 24, dtype=torch.float64, requires_grad=True)
    got = module(x)
    want = official_agent_attention(sd, "", x.reshape(2, hw * hw, 24), hw, heads, agents, sr).reshape(got.shape)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    params = [x, *module.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_spatial_reduction_attention_matches_official_forward():
    torch.manual_seed(0)
    module = SpatialReductionAttention(24, 3, sr_ratio=2).double()
    x = torch.randn(2, 8, 8, 24, dtype=torch.float64)
    want = official_sr_attention(dict(module.named_parameters()), "", x.reshape(2, 64, 24), 8, 3, 2)
    torch.testing.assert_close(module(x), want.reshape(2, 8, 8, 24), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("config,official_config", [(TINY, TINY_OFFICIAL), (TINY_MIXED, TINY_MIXED_OFFICIAL)],
                         ids=["AAAA", "ABAB-sr"])
def test_official_checkpoint_gives_the_official_logits(config, official_config):
    """A random official-layout state dict (names and shapes from agent_pvt.py) loads strictly through the filter
    and the model gives the logits of the official forward computed straight from that state dict."""
    sd = random_official(official_state_shapes(**official_config, num_classes=10))
    model = timm.create_model("agent_pvt_t", num_classes=10, drop_path_rate=0.0, backend="reference",
                              **config).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd, "epoch": 3}, model), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, **official_config), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------- registry
def test_every_name_is_registered_with_a_pretrained_cfg():
    assert set(timm.list_models("agent_pvt_*")) == set(NAMES)
    for tag in [*NAMES, "agent_pvt_m.in1k_256"]:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url and cfg.mean and cfg.std and cfg.crop_pct and cfg.license and cfg.paper_ids, tag
        assert cfg.origin_url and cfg.classifier == "head" and cfg.first_conv == "stages.0.patch_embed.proj"
    assert timm.models.get_pretrained_cfg("agent_pvt_m.in1k_256").input_size == (3, 256, 256)


@pytest.mark.parametrize("tag,img_size,paper", [*[(n, 224, PAPER_PARAMS_M[n]) for n in NAMES],
                                                ("agent_pvt_m", 256, 36.1)])
def test_every_name_builds_on_meta_with_paper_params_and_loads_official_layout(tag, img_size, paper):
    """Parameter counts within 2% of the README, and the official state-dict layout of that config (names and
    shapes) maps onto the model exactly."""
    with torch.device("meta"):
        model = timm.create_model(tag, img_size=img_size)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - paper) <= 0.02 * paper, (tag, millions)
    official = {k: torch.empty(s) for k, s in official_state_shapes(depths=DEPTHS[tag], img_size=img_size).items()}
    mapped = checkpoint_filter_fn({"model": official}, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("img_size,num_classes", [(128, 7), pytest.param(224, 1000, marks=pytest.mark.slow)])
def test_registered_config_gives_the_official_logits(img_size, num_classes):
    """The registered agent_pvt_t (its own config, not a shrunken one) at 224 (slow) and built at 128: a random
    official-layout state dict of PVT-T's released shapes loads strictly and the logits equal the official forward's
    in float64 (this replaced a shape-and-finiteness check)."""
    official = dict(embed_dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), agent_num=(9, 16, 49, 49))
    sd = random_official(official_state_shapes(**official, img_size=img_size, num_classes=num_classes))
    model = timm.create_model("agent_pvt_t", img_size=img_size, num_classes=num_classes, drop_path_rate=0.0,
                              backend="reference").double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    x = torch.randn(1, 3, img_size, img_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, **official), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("config", [TINY, TINY_MIXED], ids=["AAAA", "ABAB-sr"])
def test_backward_reaches_every_parameter(config):
    torch.manual_seed(0)
    model = timm.create_model("agent_pvt_t", num_classes=7, **config)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------- timm API
def test_features_only_and_forward_intermediates_agree():
    model = tiny().eval()
    hooked = tiny(features_only=True).eval()  # same seed, same construction order: same weights
    getter = tiny(features_only=True, feature_cls="getter").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps_hooked, maps_getter = hooked(x), getter(x)
        inter = model.forward_intermediates(x, intermediates_only=True)
        final, inter2 = model.forward_intermediates(x)
        features = model.forward_features(x)
    assert hooked.feature_info.reduction() == [4, 8, 16, 32]
    assert hooked.feature_info.channels() == [16, 32, 48, 64]
    assert len(maps_hooked) == len(maps_getter) == len(inter) == 4
    for i, (h, g, t, t2) in enumerate(zip(maps_hooked, maps_getter, inter, inter2, strict=True)):
        nchw = h.permute(0, 3, 1, 2)  # hooks give the stages' NHWC maps
        assert nchw.shape == (2, 16 * (1, 2, 3, 4)[i], 8 // 2**i, 8 // 2**i)
        torch.testing.assert_close(g, nchw)
        torch.testing.assert_close(t, nchw)
        torch.testing.assert_close(t2, nchw)
    torch.testing.assert_close(final, features)
    with torch.no_grad():
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_classes == 0
    for a, b, c in zip(inter[:2], early, pruned, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_pooling_reset_classifier_pre_logits_and_no_final_norm():
    model = tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        torch.testing.assert_close(fmap.permute(0, 3, 1, 2), last)  # no final norm, as released
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), fmap.mean((1, 2)))
        torch.testing.assert_close(model(x), model.head(fmap.mean((1, 2))))  # the official head: token mean
        model.reset_classifier(3, global_pool="max")
        torch.testing.assert_close(model.forward_head(fmap, pre_logits=True), fmap.amax((1, 2)))
        assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


def test_grad_checkpointing_layer_decay_groups_and_channels_last():
    model = tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    assert_grad_checkpointing_matches(model, x)
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.no_weight_decay() == set()  # as released
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    """One agent block through torch.compile (aot_eager: dynamo + AOTAutograd tracing, no C++ build)."""
    block = tiny().stages[0].blocks[0].eval()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(block, backend="aot_eager")(x), block(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_own_layout_round_trip(tmp_path):
    """visattn's own state dict goes through the filter untouched and reloads through timm's pretrained path."""
    model = tiny(num_classes=10).eval()
    own = model.state_dict()
    mapped = checkpoint_filter_fn(own, model)
    assert list(mapped) == list(own) and all(mapped[k] is own[k] for k in own)
    torch.save(own, tmp_path / "own.pth")
    reloaded = timm.create_model("agent_pvt_t", pretrained=True, num_classes=10, **TINY,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "own.pth"), num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_official_file_loads_through_timms_pretrained_path(tmp_path):
    """An official-layout ``{"model": ...}`` file through ``pretrained=True`` (timm calls checkpoint_filter_fn)."""
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10))
    torch.save({"model": {k: v.float() for k, v in sd.items()}, "epoch": 300}, tmp_path / "official.pth")
    model = timm.create_model("agent_pvt_t", pretrained=True, num_classes=10, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth"), num_classes=10))
    torch.testing.assert_close(model.stages[3].blocks[0].attn.ah_bias, sd["block4.0.attn.ah_bias"][0].float())


def test_official_values_land_where_the_names_say():
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10), seed=1)
    model = timm.create_model("agent_pvt_t", num_classes=10, **TINY).double()
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    torch.testing.assert_close(model.stages[2].blocks[1].attn.kv.weight, sd["block3.1.attn.kv.weight"])
    torch.testing.assert_close(model.stages[1].pos_embed, sd["pos_embed2"])
    torch.testing.assert_close(model.stages[3].patch_embed.norm.bias, sd["patch_embed4.norm.bias"])
    torch.testing.assert_close(model.stages[0].blocks[0].attn.wa_bias, sd["block1.0.attn.wa_bias"][0])


def test_official_checkpoint_resizes_to_another_img_size():
    """A 32-pixel official checkpoint onto the model built at 64: position embeddings and separable biases
    resized (a ramp stays a ramp along its axis, constant tensors stay constant), loadable strictly, finite
    logits."""
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10))
    sd = {k: (torch.full_like(v, 0.25) if k.endswith(("aw_bias", "pos_embed2")) else v) for k, v in sd.items()}
    sd["pos_embed1"] = torch.arange(8, dtype=torch.float64).repeat(8)[None, :, None].expand(1, 64, 16)  # ramp in x
    model = timm.create_model("agent_pvt_t", num_classes=10, **dict(TINY, img_size=64)).double().eval()
    mapped = checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(mapped, strict=True)
    assert mapped["stages.0.pos_embed"].shape == (1, 256, 16) and mapped["stages.0.blocks.0.attn.ha_bias"].shape == (
        1, 16, 1, 4)
    assert torch.allclose(mapped["stages.1.pos_embed"], torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(mapped["stages.1.blocks.0.attn.aw_bias"], torch.tensor(0.25, dtype=torch.float64))
    ramp = mapped["stages.0.pos_embed"][0, :, 0].reshape(16, 16)  # still a ramp along x, constant along y
    assert torch.equal(ramp, ramp[:1].expand(16, 16)) and (ramp[0, 1:] >= ramp[0, :-1]).all() and ramp[0, -1] > 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64, dtype=torch.float64))).all()


@pytest.mark.parametrize("bad,match", [(None, "None"), (torch.zeros(2, 2), "bare tensor"), ({0: 1}, "strings"),
                                       ([("a", 1)], "dict")])
def test_filter_rejects_non_state_dicts(bad, match):
    with pytest.raises(TypeError, match=match):
        checkpoint_filter_fn(bad, None)


def test_wrong_input_size_and_bad_config_raise():
    model = tiny()
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        timm.create_model("agent_pvt_t", img_size=100)
    with pytest.raises(ValueError, match="perfect square"):
        timm.create_model("agent_pvt_t", **dict(TINY, agent_num=(5, 4, 1, 1)))
    with pytest.raises(ValueError, match="attn_type"):
        timm.create_model("agent_pvt_t", **dict(TINY, attn_type="AAXA"))
    with pytest.raises(ValueError, match="Triton agent kernel takes keys of the query's shape"):
        PvtAgentAttention(16, 2, (4, 4), 4, sr_ratio=2, backend="triton")(torch.randn(1, 4, 4, 16))
    with pytest.raises(ValueError, match="sr_ratio=8 must divide"):
        timm.create_model("agent_pvt_t", **dict(TINY, agent_sr_ratios="1181"))


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_short_training_on_digits_reduces_loss():
    """scikit-learn's digits upsampled to 32x32: 60 AdamW steps of a shrunken agent_pvt_t learn clearly."""
    assert_learns_digits(tiny(num_classes=10, drop_path_rate=0.0, depths=(1, 1, 1, 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_backend_matches_reference(dtype):
    assert_cuda_auto_matches_reference("agent_pvt_t", dtype)
