"""The options visattn.nn's window and agent modules take so the model families configure them (Swin-layout bias
tables, Agent-PVT's split projections and reduced keys, Agent-DeiT's class token, the one separable-bias layout),
against timm's Swin block and plain-torch re-derivations of the official Agent-Attention forwards."""

import pytest
import torch
import torch.nn.functional as F

from visattn.nn import AgentAttention, WindowAttention


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


# ----------------------------------------------------------------------------------------------- window
@pytest.mark.parametrize("size,window,shift", [((8, 8), 4, 2), ((10, 7), 4, 0)])
def test_swin_layout_loads_timm_swin_as_is_and_matches_it(size, window, shift):
    from timm.models.swin_transformer import SwinTransformerBlock

    dim, heads = 24, 3
    block = SwinTransformerBlock(dim, size, heads, window_size=window, shift_size=shift).double().eval()
    _randomise(block.attn, seed=1)
    ours = WindowAttention(dim, window, heads, shift_size=shift, rpb_layout="swin").double()
    assert ours.rpb is None and ours.relative_position_bias_table.shape == block.attn.relative_position_bias_table.shape
    ours.load_state_dict(block.attn.state_dict())  # same keys; relative_position_index is dropped
    assert set(ours.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                      "relative_position_bias_table"}
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), block._attn(x), rtol=1e-9, atol=1e-9)
    # the table trains in Swin's layout: its gradient is the one timm's module gets
    g = torch.randn(2, *size, dim, dtype=torch.float64)
    got = torch.autograd.grad(ours(x), ours.relative_position_bias_table, g)[0]
    want = torch.autograd.grad(block._attn(x), block.attn.relative_position_bias_table, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_window_layout_options_checked():
    with pytest.raises(ValueError, match="rpb_layout"):
        WindowAttention(16, 4, 2, rpb_layout="timm")
    plain = WindowAttention(16, 4, 2).double()
    _randomise(plain)
    swin = WindowAttention(16, 4, 2, rpb_layout="swin").double()
    swin.load_state_dict(plain.state_dict())  # a visattn-layout rpb converts to the Swin table on load
    assert torch.equal(swin.position_bias(), plain.rpb)
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(swin(x), plain(x), rtol=0, atol=0)
    module = WindowAttention(16, 4, 2, rel_pos_bias=False, rpb_layout="swin")
    assert module.position_bias() is None and "relative_position_bias_table" not in dict(module.named_parameters())
    assert "rpb_layout='swin'" in repr(WindowAttention(16, 4, 2, rpb_layout="swin"))


# ----------------------------------------------------------------------------------------------- agent
def _official_agent(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """The official agent forwards on tokens, re-derived in plain torch: Agent-Swin's (fused qkv), Agent-PVT's
    (``q`` and ``kv`` Linears, keys of the sr-reduced map, conv input upsampled bilinearly) and Agent-DeiT's
    (class token first: patch-only agents and conv, ``ac_bias`` / ``ca_bias``)."""
    b, n, c = x.shape
    heads, hd, a = m.num_heads, c // m.num_heads, m.agent_num
    (h, w), (kh, kw) = m.window_size, m.kv_size
    cls = 1 if m.class_token else 0
    if m.fused_qkv:
        q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    else:
        q = F.linear(x, m.q.weight, m.q.bias)
        kv_in = x
        if m.sr_ratio > 1:
            kv_in = F.conv2d(x.permute(0, 2, 1).reshape(b, c, h, w), m.sr.weight, m.sr.bias, stride=m.sr_ratio)
            kv_in = F.layer_norm(kv_in.reshape(b, c, -1).permute(0, 2, 1), (c,), m.norm.weight, m.norm.bias)
        k, v = F.linear(kv_in, m.kv.weight, m.kv.bias).reshape(b, -1, 2, c).permute(2, 0, 1, 3)
    patch_q = q[:, cls:].reshape(b, h, w, c).permute(0, 3, 1, 2)
    agents = F.adaptive_avg_pool2d(patch_q, int(a**0.5)).reshape(b, c, a).permute(0, 2, 1)

    def split(t):
        return t.reshape(b, -1, heads, hd).permute(0, 2, 1, 3)

    q, k, v, agents = split(q), split(k), split(v), split(agents)
    bias1 = F.interpolate(m.an_bias, size=(kh, kw), mode="bilinear").reshape(1, heads, a, -1)
    bias1 = bias1 + (m.ah_bias + m.aw_bias).reshape(1, heads, a, -1)
    bias2 = F.interpolate(m.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, a, -1).permute(0, 1, 3, 2)
    bias2 = bias2 + (m.ha_bias + m.wa_bias).reshape(1, heads, -1, a)
    if cls:
        bias1 = torch.cat([m.ac_bias, bias1], dim=-1)
        bias2 = torch.cat([m.ca_bias, bias2], dim=-2)
    agent_v = torch.softmax(agents * m.scale @ k.transpose(-2, -1) + bias1, -1) @ v
    out = (torch.softmax(q * m.scale @ agents.transpose(-2, -1) + bias2, -1) @ agent_v).transpose(1, 2)
    out = out.reshape(b, n, c)
    v_map = v[:, :, cls:].transpose(1, 2).reshape(b, kh, kw, c).permute(0, 3, 1, 2)
    if m.sr_ratio > 1:
        v_map = F.interpolate(v_map, size=(h, w), mode="bilinear")
    conv = F.conv2d(v_map, m.dwc.weight, m.dwc.bias, padding=1, groups=c).reshape(b, c, -1).permute(0, 2, 1)
    out = torch.cat([out[:, :cls], out[:, cls:] + conv], dim=1)
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("size,agents,options,backend", [
    ((6, 6), 9, dict(fused_qkv=False), None),
    ((8, 4), 4, dict(fused_qkv=False, sr_ratio=2), None),
    ((8, 4), 4, dict(fused_qkv=False, sr_ratio=2), "reference"),
    ((4, 6), 4, dict(class_token=True), None),
    ((5, 5), 9, dict(class_token=True), "sdpa"),
])
def test_family_forms_match_official_forward(size, agents, options, backend):
    module = AgentAttention(24, size, 3, agent_num=agents, backend=backend, **options).double()
    _randomise(module, seed=3)
    tokens = size[0] * size[1] + (1 if module.class_token else 0)
    x = torch.randn(2, tokens, 24, dtype=torch.float64, requires_grad=True)
    out = module(x)
    want = _official_agent(module, x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    params = [x, module.an_bias, module.ah_bias, module.dwc.weight]
    for got, ref in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)
    if not module.class_token:  # the map form gives the token form's numbers
        torch.testing.assert_close(module(x.detach().reshape(2, *size, 24)).reshape(2, -1, 24), out.detach(),
                                   rtol=0, atol=0)


def test_family_form_parameter_names():
    pvt = AgentAttention(16, (8, 8), 2, agent_num=4, fused_qkv=False, sr_ratio=2)
    assert {n.split(".")[0] for n, _ in pvt.named_parameters()} == {
        "q", "kv", "sr", "norm", "proj", "dwc", "an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"}
    assert pvt.ah_bias.shape == (2, 4, 4, 1) and pvt.aw_bias.shape == (2, 4, 1, 4)  # sized for the reduced keys
    assert pvt.ha_bias.shape == (2, 8, 1, 4) and pvt.wa_bias.shape == (2, 1, 8, 4)
    deit = AgentAttention(16, (4, 4), 2, agent_num=4, class_token=True)
    assert {"ac_bias", "ca_bias", "qkv.weight"} <= set(dict(deit.named_parameters()))
    assert deit.ac_bias.shape == (1, 2, 4, 1) and deit.ca_bias.shape == (1, 2, 1, 4)


def test_official_five_dim_biases_load_into_the_one_layout():
    """Official checkpoints keep the separable biases 5-D ``[1, heads, ...]``; the module keeps them 4-D (what
    channels_last accepts) and squeezes them on load."""
    module = AgentAttention(16, (6, 4), 2, agent_num=4).double()
    _randomise(module)
    official = {k: (v.unsqueeze(0) if k in ("ah_bias", "aw_bias", "ha_bias", "wa_bias") else v).clone()
                for k, v in module.state_dict().items()}
    assert official["ah_bias"].shape == (1, 2, 4, 6, 1)
    other = AgentAttention(16, (6, 4), 2, agent_num=4).double()
    other.load_state_dict(official)
    for key, value in module.state_dict().items():
        assert other.state_dict()[key].shape == value.shape and torch.equal(other.state_dict()[key], value), key
    module.to(memory_format=torch.channels_last)  # refuses 5-D parameters


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(fused_qkv=1), TypeError, "fused_qkv"),
    (dict(class_token="yes"), TypeError, "class_token"),
    (dict(sr_ratio=0, fused_qkv=False), ValueError, "sr_ratio"),
    (dict(sr_ratio=2), ValueError, "fused_qkv=False"),
    (dict(sr_ratio=4, fused_qkv=False), ValueError, "sr_ratio=4 must divide"),
    (dict(class_token=True, fused_qkv=False), ValueError, "class_token"),
])
def test_family_options_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        AgentAttention(16, (6, 6), 2, agent_num=4, **kwargs)


def test_family_forms_check_input():
    deit = AgentAttention(16, (4, 4), 2, agent_num=4, class_token=True)
    with pytest.raises(ValueError, match=r"1 \+ 4\*4"):
        deit(torch.randn(1, 16, 16))  # no class token
    pvt = AgentAttention(16, (4, 4), 2, agent_num=4, fused_qkv=False, sr_ratio=2, backend="triton")
    with pytest.raises(ValueError, match="reduced map"):
        pvt(torch.randn(1, 4, 4, 16))
