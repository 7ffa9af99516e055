"""Agent-DeiT: every registered name against the official README's parameter counts, the timm API (getter features
as timm's ViT, intermediates, pooling, checkpointing), and the official model re-derived in float64 from
LeapLabTHU/Agent-Attention ``agent_transformer/models/agent_deit.py`` (``AgentAttention.forward``, ``AgentBlock``,
``VisionTransformer.forward_features`` with its agent/plain block rule) and ``models/deit.py`` (``Attention``,
``Block``); configs from ``cfgs/agent_deit_{t,s,b,s_448}.yaml`` and ``models/build.py``: official-layout state dicts
(key names and shapes written from those files) load strictly through ``checkpoint_filter_fn`` and give the
official logits."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from family_checks import assert_cuda_auto_matches_reference, assert_grad_checkpointing_matches, assert_learns_digits
from offline_hub import agent_deit_official_shapes as official_state_shapes

import visattn  # noqa: F401  (registers the models)
from visattn.models.agent_deit import DeitAgentAttention, checkpoint_filter_fn

NAMES = ["agent_deit_t", "agent_deit_s", "agent_deit_b"]
# agent_transformer/README.md (the 448 row: agent_deit_s.in1k_448)
PAPER_PARAMS_M = {"agent_deit_t": 6.0, "agent_deit_s": 22.7, "agent_deit_b": 87.2}
CONFIGS = {  # name -> (width, heads, agents, agent_layer): entrypoints in agent_deit.py + cfgs/agent_deit_*.yaml
    "agent_deit_t": (192, 3, 49, 12), "agent_deit_s": (384, 6, 49, 12), "agent_deit_b": (768, 12, 81, 4),
}
# A shrunken config on 32x32 inputs: 8x8 patches -> a 4x4 grid, two agent blocks then two plain ones (as DeiT-B)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, agent_num=4, agent_layer=2)
TINY_OFFICIAL = dict(dim=32, heads=2, agents=4, agent_layer=2, depth=4, patch=8, img_size=32)


def tiny(seed: int = 0, **extra):
    torch.manual_seed(seed)
    return timm.create_model("agent_deit_t", **dict(TINY, **extra))


# ----------------------------------------------------------------------------------------------- the official model
def random_official(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) * 0.5 for k, s in shapes.items()}


def official_agent_attention(sd, p, x, heads, agent_num):
    """AgentAttention.forward of agent_deit.py on [B, 1 + n*n, C] tokens (class token first), from the official
    state dict ``sd`` (prefix ``p``), written out step by step."""
    b, n, c = x.shape
    h = w = int(n**0.5)
    hd, pool = c // heads, int(agent_num**0.5)
    q, k, v = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agents = F.adaptive_avg_pool2d(q[:, 1:, :].reshape(b, h, w, c).permute(0, 3, 1, 2), pool).reshape(b, c, -1)
    agents = agents.permute(0, 2, 1).reshape(b, agent_num, heads, hd).permute(0, 2, 1, 3)
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    scale = hd**-0.5
    bias1 = F.interpolate(sd[p + "an_bias"], size=(h, w), mode="bilinear").reshape(1, heads, agent_num, -1)
    bias2 = (sd[p + "ah_bias"] + sd[p + "aw_bias"]).reshape(1, heads, agent_num, -1)
    position_bias = torch.cat([sd[p + "ac_bias"].repeat(b, 1, 1, 1), (bias1 + bias2).repeat(b, 1, 1, 1)], dim=-1)
    agent_v = torch.softmax((agents * scale) @ k.transpose(-2, -1) + position_bias, dim=-1) @ v
    bias3 = F.interpolate(sd[p + "na_bias"], size=(h, w), mode="bilinear").reshape(1, heads, agent_num, -1)
    bias4 = (sd[p + "ha_bias"] + sd[p + "wa_bias"]).reshape(1, heads, -1, agent_num)
    agent_bias = torch.cat([sd[p + "ca_bias"].repeat(b, 1, 1, 1), (bias3.permute(0, 1, 3, 2) + bias4).repeat(
        b, 1, 1, 1)], dim=-2)
    out = (torch.softmax((q * scale) @ agents.transpose(-2, -1) + agent_bias, dim=-1) @ agent_v)
    out = out.transpose(1, 2).reshape(b, n, c).clone()
    v_ = v[:, :, 1:, :].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    conv = F.conv2d(v_, sd[p + "dwc.weight"], sd[p + "dwc.bias"], padding=1, groups=c)
    out[:, 1:, :] = out[:, 1:, :] + conv.permute(0, 2, 3, 1).reshape(b, n - 1, c)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_plain_attention(sd, p, x, heads):
    """Attention.forward of deit.py: dense softmax attention over all tokens."""
    b, n, c = x.shape
    q, k, v = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(b, n, 3, heads, c // heads).permute(
        2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5, dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_forward(sd, x, dim, heads, agents, agent_layer, depth, patch, **_):
    """VisionTransformer.forward of agent_deit.py (not distilled) from its state dict."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x.transpose(1, 2)], dim=1) + sd["pos_embed"]

    def ln(t, name):
        return F.layer_norm(t, (dim,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        if i < agent_layer:
            x = x + official_agent_attention(sd, p + "attn.", ln(x, p + "norm1"), heads, agents)
        else:
            x = x + official_plain_attention(sd, p + "attn.", ln(x, p + "norm1"), heads)
        hidden = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.linear(ln(x, "norm")[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("side,agents", [(4, 4), (7, 9), (5, 16)])
def test_agent_attention_matches_official_forward(side, agents):
    """Values and gradients (input and every parameter) against the official formula, class token included."""
    torch.manual_seed(0)
    module = DeitAgentAttention(24, 3, (side, side), agents, backend="reference").double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # so a transposed or misplaced bias (class token's included) cannot hide
    sd = {k: (v.unsqueeze(0) if k in ("ah_bias", "aw_bias", "ha_bias", "wa_bias") else v)
          for k, v in module.named_parameters()}  # the official 5-D biases are views of ours
    x = torch.randn(2, 1 + side * side, 24, dtype=torch.float64, requires_grad=True)
    got = module(x)
    want = official_agent_attention(sd, "", x, 3, agents)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    params = [x, *module.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_official_checkpoint_gives_the_official_logits():
    """A random official-layout state dict (agent blocks then plain blocks, as Agent-DeiT-B) loads strictly through
    the filter and the model gives the logits of the official forward computed straight from that state dict."""
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10))
    model = timm.create_model("agent_deit_t", num_classes=10, backend="reference", **TINY).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd, "epoch": 3}, model), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(sd, x, **TINY_OFFICIAL), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------- registry
def test_every_name_is_registered_with_a_pretrained_cfg():
    assert set(timm.list_models("agent_deit_*")) == set(NAMES)
    for tag in [*NAMES, "agent_deit_s.in1k_448"]:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url and cfg.mean and cfg.std and cfg.crop_pct and cfg.license and cfg.paper_ids, tag
        assert cfg.origin_url and cfg.classifier == "head" and cfg.first_conv == "patch_embed.proj"
    assert timm.models.get_pretrained_cfg("agent_deit_s.in1k_448").input_size == (3, 448, 448)


@pytest.mark.parametrize("tag,img_size,paper", [*[(n, 224, PAPER_PARAMS_M[n]) for n in NAMES],
                                                ("agent_deit_s", 448, 23.1)])
def test_every_name_builds_on_meta_with_paper_params_and_loads_official_layout(tag, img_size, paper):
    """Parameter counts within 2% of the README, and the official state-dict layout of that config (names and
    shapes) maps onto the model exactly."""
    with torch.device("meta"):
        model = timm.create_model(tag, img_size=img_size)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - paper) <= 0.02 * paper, (tag, millions)
    official = {k: torch.empty(s) for k, s in official_state_shapes(*CONFIGS[tag], img_size=img_size).items()}
    mapped = checkpoint_filter_fn({"model": official}, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("img_size,num_classes", [(112, 7), pytest.param(224, 1000, marks=pytest.mark.slow)])
def test_registered_config_gives_the_official_logits(img_size, num_classes):
    """The registered agent_deit_t (its own config: 12 agent blocks of width 192, 49 agents) at 224 (slow) and
    built at 112: a random official-layout state dict loads strictly and the logits equal the official forward's
    in float64 (this replaced a shape-and-finiteness check)."""
    dim, heads, agents, agent_layer = CONFIGS["agent_deit_t"]
    sd = random_official(official_state_shapes(dim, heads, agents, agent_layer, img_size=img_size,
                                               num_classes=num_classes))
    model = timm.create_model("agent_deit_t", img_size=img_size, num_classes=num_classes, drop_path_rate=0.0,
                              backend="reference").double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    x = torch.randn(1, 3, img_size, img_size, dtype=torch.float64)
    with torch.no_grad():
        want = official_forward(sd, x, dim, heads, agents, agent_layer, depth=12, patch=16)
        torch.testing.assert_close(model(x), want, rtol=1e-8, atol=1e-8)


def test_backward_reaches_every_parameter():
    model = tiny(num_classes=7)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------- timm API
def test_features_only_getter_and_forward_intermediates_agree():
    """features_only is timm's ViT getter: 4 NCHW patch grids (default blocks evenly spaced), equal to
    forward_intermediates' maps and to the blocks' patch tokens."""
    model = tiny().eval()
    feats = tiny(features_only=True).eval()  # same seed, same construction order: same weights
    assert type(feats).__name__ == "FeatureGetterNet"
    assert feats.feature_info.reduction() == [8] * 4 and feats.feature_info.channels() == [32] * 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = feats(x)
        inter = model.forward_intermediates(x, intermediates_only=True)
        final, nlc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
        pairs = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        tokens = x
        tokens = model._tokens(tokens)
        per_block = []
        for block in model.blocks:
            tokens = block(tokens)
            per_block.append(tokens)
        features = model.forward_features(x)
    assert len(maps) == len(inter) == 4
    for i, (m, t) in enumerate(zip(maps, inter, strict=True)):
        assert m.shape == (2, 32, 4, 4)
        torch.testing.assert_close(m, t)
        torch.testing.assert_close(m.flatten(2).transpose(1, 2), per_block[i][:, 1:])
    torch.testing.assert_close(nlc[1], per_block[3][:, 1:])
    torch.testing.assert_close(pairs[0][1], per_block[1][:, :1])
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(normed.flatten(2).transpose(1, 2), features[:, 1:])
    picked = tiny(features_only=True, out_indices=(1, 2)).eval()
    with torch.no_grad():
        got = picked(x)
    assert len(got) == 2 and len(picked.model.blocks) == 3  # pruned after the last wanted block
    torch.testing.assert_close(got[1], maps[2])


def test_pooling_reset_classifier_and_pre_logits():
    model = tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])  # as released
        torch.testing.assert_close(model(x), model.head(tokens[:, 0]))
        for pool, want in (("avg", tokens[:, 1:].mean(1)), ("max", tokens[:, 1:].amax(1))):
            model.reset_classifier(3, global_pool=pool)
            torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), want)
            assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")
        torch.testing.assert_close(model(x), tokens)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="catavgmax")


def test_grad_checkpointing_layer_decay_groups_and_no_weight_decay():
    model = tiny(drop_path_rate=0.0).train()
    assert_grad_checkpointing_matches(model, torch.randn(2, 3, 32, 32))
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}  # the official set


def test_torch_compile_matches_eager():
    """One agent block through torch.compile (aot_eager: dynamo + AOTAutograd tracing, no C++ build)."""
    block = tiny().blocks[0].eval()
    x = torch.randn(2, 17, 32)
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
    reloaded = timm.create_model("agent_deit_t", pretrained=True, num_classes=10, **TINY,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "own.pth"), num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_official_file_loads_through_timms_pretrained_path(tmp_path):
    """An official-layout ``{"model": ...}`` file through ``pretrained=True`` (timm calls checkpoint_filter_fn)."""
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10))
    torch.save({"model": {k: v.float() for k, v in sd.items()}, "epoch": 300}, tmp_path / "official.pth")
    model = timm.create_model("agent_deit_t", pretrained=True, num_classes=10, **TINY,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "official.pth"), num_classes=10))
    torch.testing.assert_close(model.blocks[1].attn.wa_bias, sd["blocks.1.attn.wa_bias"][0].float())
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"].float())


def test_official_checkpoint_resizes_to_another_img_size():
    """A 32-pixel official checkpoint onto the model built at 64: the position embedding's grid and the separable
    biases resized (the class token's embedding kept, a ramp stays a ramp along its axis, constant tensors stay
    constant), strictly loadable."""
    sd = random_official(official_state_shapes(**TINY_OFFICIAL, num_classes=10))
    sd["pos_embed"][0, 1:] = torch.arange(4, dtype=torch.float64).repeat(4)[:, None]  # a ramp along x
    sd["blocks.1.attn.ha_bias"].fill_(-0.5)
    model = timm.create_model("agent_deit_t", num_classes=10, **dict(TINY, img_size=64)).double().eval()
    mapped = checkpoint_filter_fn({"model": sd}, model)
    model.load_state_dict(mapped, strict=True)
    assert mapped["pos_embed"].shape == (1, 65, 32) and mapped["blocks.0.attn.aw_bias"].shape == (2, 4, 1, 8)
    torch.testing.assert_close(mapped["pos_embed"][:, :1], sd["pos_embed"][:, :1])
    ramp = mapped["pos_embed"][0, 1:, 0].reshape(8, 8)  # still a ramp along x, constant along y
    assert torch.equal(ramp, ramp[:1].expand(8, 8)) and (ramp[0, 1:] >= ramp[0, :-1]).all() and ramp[0, -1] > 2
    assert torch.allclose(mapped["blocks.1.attn.ha_bias"], torch.tensor(-0.5, dtype=torch.float64))
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
    with pytest.raises(ValueError, match="multiple of patch_size"):
        timm.create_model("agent_deit_t", img_size=100)
    with pytest.raises(ValueError, match="perfect square"):
        tiny(agent_num=5)
    with pytest.raises(ValueError, match="agent_num"):
        tiny(agent_num=(4, 4))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_short_training_on_digits_reduces_loss():
    """scikit-learn's digits upsampled to 32x32: 150 AdamW steps of a shrunken agent_deit_t (64 wide, two agent
    blocks, class-token head; a ViT learns slower than the pyramids, hence more steps) learn clearly."""
    assert_learns_digits(tiny(num_classes=10, embed_dim=64, num_heads=4, depth=2, agent_layer=None), steps=150)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_backend_matches_reference(dtype):
    assert_cuda_auto_matches_reference("agent_deit_t", dtype)
