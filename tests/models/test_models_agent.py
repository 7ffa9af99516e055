"""Agent-Swin: agent attention against the official eager formula (re-derived in float64 from LeapLabTHU/Agent-Attention
agent_transformer/models/agent_swin.py, AgentAttention.forward), window blocks against timm's own Swin block,
official-layout state dicts (names and shapes written from agent_swin.py and cfgs/agent_swin_{t,s,b}.yaml) loading
strictly and resizing to another img_size. The own-layout round trip and the filter's refusals, shared by every
family: tests/models/test_models_timm_api.py."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from offline_hub import agent_swin_official_shapes as official_state_shapes

import visattn  # noqa: F401
from visattn.models.agent import AgentAttention, AgentSwinBlock, checkpoint_filter_fn, parse_attn_types

TINY = dict(img_size=32, depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 4, 8), agent_num=(4, 4, 1, 1))


def official_agent_forward(module, x):
    """AgentAttention.forward of agent_swin.py on [B, N, C] tokens of a square map, in the module's dtype."""
    b, n, c = x.shape
    h = w = int(n**0.5)
    heads, hd, agents = module.num_heads, c // module.num_heads, module.agent_num
    q, k, v = module.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    agent_tokens = module.pool(q.reshape(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, c, -1).permute(0, 2, 1)
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    agent_tokens = agent_tokens.reshape(b, agents, heads, hd).permute(0, 2, 1, 3)
    # official 5-D separable biases: [1, heads, A, H, 1] etc.
    ah, aw, ha, wa = (p.unsqueeze(0) for p in (module.ah_bias, module.aw_bias, module.ha_bias, module.wa_bias))
    bias1 = F.interpolate(module.an_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
    position_bias = bias1 + (ah + aw).reshape(1, heads, agents, -1)
    agent_attn = torch.softmax((agent_tokens * module.scale) @ k.transpose(-2, -1) + position_bias, dim=-1)
    agent_v = agent_attn @ v
    bias2 = F.interpolate(module.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
    bias2 = bias2.permute(0, 1, 3, 2)
    agent_bias = bias2 + (ha + wa).reshape(1, heads, -1, agents)
    q_attn = torch.softmax((q * module.scale) @ agent_tokens.transpose(-2, -1) + agent_bias, dim=-1)
    out = (q_attn @ agent_v).transpose(1, 2).reshape(b, n, c)
    v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    out = out + module.dwc(v).permute(0, 2, 3, 1).reshape(b, n, c)
    return module.proj(out)


@pytest.mark.parametrize("side,agents", [(8, 4), (7, 9), (14, 49)])
def test_agent_attention_matches_official_forward(side, agents):
    torch.manual_seed(0)
    module = AgentAttention(24, 3, (side, side), agents, backend="reference").double()
    with torch.no_grad():
        for p in (module.an_bias, module.na_bias, module.ah_bias, module.aw_bias, module.ha_bias, module.wa_bias):
            p.normal_(0, 0.5)  # O(1) biases so a transposed or misplaced one cannot hide
    x = torch.randn(2, side, side, 24, dtype=torch.float64, requires_grad=True)
    got = module(x)
    want = official_agent_forward(module, x.reshape(2, side * side, 24)).reshape(2, side, side, 24)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    params = [x, *module.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shift", [0, 3])
def test_window_block_matches_timm_swin_block(shift):
    """A 'B' block equals timm's SwinTransformerBlock (roll + partition + mask) on the same weights."""
    swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    ours = AgentSwinBlock(24, 3, (14, 14), "B", agent_num=1, window_size=7, shift=shift, backend="reference").double()
    ref = swin.SwinTransformerBlock(24, input_resolution=(14, 14), num_heads=3, window_size=7,
                                    shift_size=shift).double()
    assert ref.shift_size == (shift, shift)
    with torch.no_grad():
        ours.attn.relative_position_bias_table.normal_(0, 1.0)
    missing = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.unexpected_keys and all("relative_position_index" in k for k in missing.missing_keys)
    x = torch.randn(2, 14, 14, 24, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-9, atol=1e-10)


def test_attn_type_strings():
    assert parse_attn_types("AAMB2", (2, 2, 5, 2)) == [["A", "A"], ["A", "A"], ["A", "A", "B", "B", "B"], ["B", "B"]]
    assert parse_attn_types("AAAB", (1, 1, 1, 1)) == [["A"], ["A"], ["A"], ["B"]]
    for bad in ("AAB", "AAMB", "AAXB", "AAAB2"):
        with pytest.raises(ValueError, match="attn_type"):
            parse_attn_types(bad, (2, 2, 2, 2))


CONFIGS = {  # cfgs/agent_swin_{t,s,b}.yaml
    "agent_swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), "AAAB"),
    "agent_swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), "AABB"),
    "agent_swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), "AAMB2"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_layout_loads_strictly(name):
    official = {"model": {k: torch.empty(s) for k, s in official_state_shapes(*CONFIGS[name]).items()}, "epoch": 1}
    with torch.device("meta"):
        model = timm.create_model(name)
    mapped = checkpoint_filter_fn(official, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_official_checkpoint_resizes_to_another_img_size():
    """A 224 checkpoint onto agent_swin_s built at 288 (the released 288 fine-tune size): agent biases resized
    along their spatial axis, the 7x7 window tables to 9x9, strictly loadable."""
    official = {"model": {k: torch.randn(s) for k, s in official_state_shapes(*CONFIGS["agent_swin_t"]).items()}}
    model = timm.create_model("agent_swin_t", img_size=288, depths=(2, 2, 6, 2))
    mapped = checkpoint_filter_fn(official, model)
    model.load_state_dict(mapped, strict=True)
    assert model.layers[0].blocks[0].attn.ah_bias.shape == (3, 9, 72, 1)
    assert model.layers[3].blocks[0].attn.relative_position_bias_table.shape == (17 * 17, 24)
    # linear resize keeps a constant bias constant
    flat = {k: (torch.full_like(v, 0.25) if k.endswith("aw_bias") else v) for k, v in official["model"].items()}
    resized = checkpoint_filter_fn({"model": flat}, model)
    assert torch.allclose(resized["layers.1.blocks.0.attn.aw_bias"], torch.tensor(0.25))


def test_official_values_land_where_the_names_say():
    shapes = official_state_shapes(16, (1, 1, 2, 1), (1, 2, 4, 8), "AAAB", agent_num=(4, 4, 1, 1), img_size=32,
                                   num_classes=10)
    gen = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    model = timm.create_model("agent_swin_t", num_classes=10, **TINY).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    torch.testing.assert_close(model.layers[1].downsample.reduction.weight,
                               official["layers.0.downsample.reduction.weight"])
    torch.testing.assert_close(model.layers[0].blocks[0].attn.ha_bias, official["layers.0.blocks.0.attn.ha_bias"][0])


def test_wrong_input_size_and_bad_config_raise():
    model = timm.create_model("agent_swin_t", **TINY)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        timm.create_model("agent_swin_t", img_size=100)
    with pytest.raises(ValueError, match="perfect square"):
        timm.create_model("agent_swin_t", img_size=32, agent_num=(5, 16, 49, 49))
