"""visattn.nn modules against independent compositions of the math (dense oracle, timm's Swin, plain-torch
re-derivations of the official Agent-Attention and BiFormer forwards), their official argument names, and the
checks every constructor runs."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from visattn.bench import dense
from visattn.nn import (
    AgentAttention,
    BiLevelRoutingAttention,
    NeighborhoodAttention1d,
    NeighborhoodAttention2d,
    NeighborhoodAttention3d,
    WindowAttention,
    swin_rpb_to_visattn,
    visattn_rpb_to_swin,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def _na_oracle(module, x):
    """qkv Linear -> dense masked float64 attention (visattn.bench.dense) -> proj Linear."""
    heads, hd = module.num_heads, module.head_dim
    q, k, v = F.linear(x, module.qkv.weight, module.qkv.bias).unflatten(-1, (3, heads, hd)).unbind(-3)
    out = dense.na(q, k, v, module.kernel_size, module.stride, module.dilation, module.is_causal, module.scale,
                   rpb=module.rpb)
    return F.linear(out.flatten(-2), module.proj.weight, module.proj.bias)


@pytest.mark.parametrize("cls,shape,kwargs", [
    (NeighborhoodAttention1d, (2, 13), dict(kernel_size=5, dilation=2, rel_pos_bias=True)),
    (NeighborhoodAttention1d, (2, 11), dict(kernel_size=4, stride=2, is_causal=True)),
    (NeighborhoodAttention2d, (2, 9, 11), dict(kernel_size=3, dilation=(2, 3), rel_pos_bias=True)),
    (NeighborhoodAttention2d, (1, 8, 10), dict(kernel_size=(3, 5), is_causal=(True, False), rel_pos_bias=True)),
    (NeighborhoodAttention2d, (2, 8, 8), dict(kernel_size=4, stride=(2, 4), qkv_bias=False, qk_scale=0.3)),
    (NeighborhoodAttention3d, (1, 4, 6, 5), dict(kernel_size=3, dilation=(1, 2, 1), rel_pos_bias=True)),
])
def test_neighborhood_modules_match_dense_oracle(cls, shape, kwargs):
    module = cls(24, 3, **kwargs).double()
    _randomise(module)
    x = torch.randn(*shape, 24, dtype=torch.float64, requires_grad=True)
    out = module(x)
    want = _na_oracle(module, x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, module.qkv.weight], g)
    want_grads = torch.autograd.grad(want, [x, module.qkv.weight], g)
    for a, b in zip(got_grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_neighborhood_module_api_names_and_init():
    module = NeighborhoodAttention2d(32, 4, 7, rel_pos_bias=True)
    assert set(dict(module.named_parameters())) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
    assert module.rpb.shape == (4, 13, 13)
    assert 0.01 < module.rpb.std().item() < 0.03  # trunc_normal(std=.02), not zeros
    assert NeighborhoodAttention2d(32, 4, 7).rpb is None


@pytest.mark.parametrize("bad,match", [
    (dict(embed_dim=30, num_heads=4, kernel_size=3), "num_heads"),
    (dict(embed_dim=32, num_heads=4, kernel_size=0), "kernel_size"),
    (dict(embed_dim=32, num_heads=4, kernel_size=3, stride=4), "stride"),
    (dict(embed_dim=32, num_heads=4, kernel_size=3, stride=2, rel_pos_bias=True), "rel_pos_bias"),
    (dict(embed_dim=32, num_heads=4, kernel_size=3, dilation=(1, 2, 3)), "dilation"),
    (dict(embed_dim=32, num_heads=4, kernel_size=3, backend="cuda"), "backend"),
])
def test_neighborhood_bad_args_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2d(**bad)


def test_module_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="x must have shape"):
        NeighborhoodAttention2d(32, 4, 3)(torch.randn(1, 8, 8, 16))


# ----------------------------------------------------------------------------------------------- window / Swin
def test_swin_rpb_conversion_matches_timm_index():
    from timm.models.swin_transformer import get_relative_position_index

    wh, ww, heads = 3, 4, 2
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads)
    swin_bias = table[get_relative_position_index(wh, ww).view(-1)].view(wh * ww, wh * ww, heads)
    rpb = swin_rpb_to_visattn(table, (wh, ww))
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)  # query i, key j: rpb[h, yj - yi + wh - 1, xj - xi + ww - 1]
    ours = rpb[:, ys[None, :] - ys[:, None] + wh - 1, xs[None, :] - xs[:, None] + ww - 1]
    torch.testing.assert_close(ours, swin_bias.permute(2, 0, 1), rtol=0, atol=0)
    torch.testing.assert_close(visattn_rpb_to_swin(rpb, (wh, ww)), table, rtol=0, atol=0)


def test_swin_rpb_conversion_3d_round_trip_and_bad_shape():
    table = torch.randn(3 * 5 * 7, 4)
    rpb = swin_rpb_to_visattn(table, (2, 3, 4))
    assert rpb.shape == (4, 3, 5, 7)
    # Video Swin row-major index: (dt*(2wh-1) + dh)*(2ww-1) + dw with query-minus-key offsets
    assert rpb[1, 0, 0, 0] == table[(2 * 5 + 4) * 7 + 6, 1]
    torch.testing.assert_close(visattn_rpb_to_swin(rpb, (2, 3, 4)), table, rtol=0, atol=0)
    with pytest.raises(ValueError, match="table"):
        swin_rpb_to_visattn(table, (2, 3, 3))


@pytest.mark.parametrize("size,window,shift", [((8, 8), 4, 2), ((8, 12), (4, 6), (2, 3)), ((10, 7), 4, 0)])
def test_window_attention_matches_timm_swin_block(size, window, shift):
    from timm.models.swin_transformer import SwinTransformerBlock

    dim, heads = 24, 3
    block = SwinTransformerBlock(dim, size, heads, window_size=window, shift_size=shift).double().eval()
    _randomise(block.attn, seed=1)
    ours = WindowAttention(dim, window, heads, shift_size=shift).double()
    ws = ours.window_size
    assert tuple(block.window_size) == ws and tuple(block.shift_size) == ours.shift_size  # timm kept our geometry
    ours.load_state_dict(block.attn.state_dict())  # Swin's keys: the bias table is converted on load
    torch.testing.assert_close(ours.rpb, swin_rpb_to_visattn(block.attn.relative_position_bias_table, ws))
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), block._attn(x), rtol=1e-9, atol=1e-9)


def test_window_attention_3d_matches_dense_oracle_with_padding():
    module = WindowAttention(16, (2, 3, 3), 2, shift_size=(1, 1, 2)).double()
    _randomise(module)
    x = torch.randn(1, 4, 5, 6, 16, dtype=torch.float64)  # H=5 is padded to 6
    xp = F.pad(x, (0, 0, 0, 0, 0, 1))
    q, k, v = F.linear(xp, module.qkv.weight, module.qkv.bias).unflatten(-1, (3, 2, 8)).unbind(-3)
    want = dense.window(q, k, v, (2, 3, 3), (1, 1, 2), module.rpb, module.scale)
    want = F.linear(want.flatten(-2), module.proj.weight, module.proj.bias)[:, :, :5]
    torch.testing.assert_close(module(x), want, rtol=1e-9, atol=1e-9)


def test_window_attention_bad_args():
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(16, 4, 2, shift_size=4)
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention(16, (4,), 2)


# ----------------------------------------------------------------------------------------------- agent
def _official_agent_forward(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain re-derivation of Agent-Swin's AgentAttention.forward on [b, n, c] tokens (official tensor path)."""
    b, h, w, c = x.shape
    n, heads, hd, a = h * w, m.num_heads, c // m.num_heads, m.agent_num
    tokens = x.reshape(b, n, c)
    q, k, v = F.linear(tokens, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    side = int(a**0.5)
    agents = F.adaptive_avg_pool2d(q.reshape(b, h, w, c).permute(0, 3, 1, 2), side).reshape(b, c, -1).permute(0, 2, 1)
    def split(t, length):
        return t.reshape(b, length, heads, hd).permute(0, 2, 1, 3)
    q, k, v, agents = split(q, n), split(k, n), split(v, n), split(agents, a)
    bias1 = F.interpolate(m.an_bias, size=(h, w), mode="bilinear").reshape(1, heads, a, -1)
    bias1 = bias1 + (m.ah_bias + m.aw_bias).reshape(1, heads, a, -1)
    agent_v = torch.softmax(agents * m.scale @ k.transpose(-2, -1) + bias1, -1) @ v
    bias2 = F.interpolate(m.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, a, -1).permute(0, 1, 3, 2)
    bias2 = bias2 + (m.ha_bias + m.wa_bias).reshape(1, heads, -1, a)
    out = (torch.softmax(q * m.scale @ agents.transpose(-2, -1) + bias2, -1) @ agent_v).transpose(1, 2)
    out = out.reshape(b, n, c)
    v_map = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
    out = out + F.conv2d(v_map, m.dwc.weight, m.dwc.bias, padding=1, groups=c).permute(0, 2, 3, 1).reshape(b, n, c)
    return F.linear(out, m.proj.weight, m.proj.bias).reshape(b, h, w, c)


@pytest.mark.parametrize("size,agents", [((7, 7), 9), ((8, 12), 16)])
def test_agent_attention_matches_official_forward(size, agents):
    module = AgentAttention(24, size, 3, agent_num=agents).double()
    _randomise(module, seed=2)
    x = torch.randn(2, *size, 24, dtype=torch.float64, requires_grad=True)
    out = module(x)
    want = _official_agent_forward(module, x)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    params = [x, module.an_bias, module.wa_bias, module.dwc.weight]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_agent_attention_param_names_and_errors():
    names = set(dict(AgentAttention(16, (7, 7), 2).named_parameters()))
    assert names == {"an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "dwc.weight", "dwc.bias",
                     "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}  # the official module's parameters
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(16, (7, 7), 2, agent_num=10)
    with pytest.raises(ValueError, match="window_size"):
        AgentAttention(16, (7, 7), 2)(torch.randn(1, 8, 8, 16))
    with pytest.raises(ValueError, match="mask"):
        AgentAttention(16, (7, 7), 2)(torch.randn(1, 49, 16), mask=torch.zeros(1, 49, 49))


def test_agent_attention_takes_official_token_input():
    """The official forward takes ``[B, H*W, C]`` tokens; the map form gives the same numbers."""
    module = AgentAttention(16, (6, 6), 2, agent_num=9).double()
    x = torch.randn(2, 6, 6, 16, dtype=torch.float64)
    tokens = module(x.reshape(2, 36, 16))
    assert tokens.shape == (2, 36, 16)
    torch.testing.assert_close(tokens, module(x).reshape(2, 36, 16), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- bi-level routing
def _biformer_forward(m: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Gather-based re-derivation of BiFormer's bra_legacy forward (auto_pad, identity kv_down, lepe, wo)."""
    n, h_in, w_in, c = x.shape
    s = m.n_win
    x = F.pad(x, (0, 0, 0, (s - w_in % s) % s, 0, (s - h_in % s) % s))
    _, H, W, _ = x.shape
    rh, rw = H // s, W // s
    windows = x.reshape(n, s, rh, s, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, rh, rw, c)
    proj = F.linear(windows, m.qkv.qkv.weight, m.qkv.qkv.bias)
    q, kv = proj[..., : m.qk_dim], proj[..., m.qk_dim:]
    q_win, k_win = q.mean((2, 3)), kv[..., : m.qk_dim].mean((2, 3))
    v_full = kv[..., m.qk_dim:].reshape(n, s, s, rh, rw, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, H, W)
    lepe = F.conv2d(v_full, m.lepe.weight, m.lepe.bias, padding=m.lepe.padding, groups=c).permute(0, 2, 3, 1)
    route = torch.topk((q_win * m.scale) @ k_win.transpose(-2, -1), k=m.topk, dim=-1).indices  # [n, p2, topk]
    kv_pix = kv.reshape(n, s * s, rh * rw, -1)
    p2, w2, ckv = s * s, rh * rw, kv_pix.shape[-1]
    sel = torch.gather(kv_pix[:, None].expand(-1, p2, -1, -1, -1), 2,
                       route[..., None, None].expand(-1, -1, -1, w2, ckv))  # [n, p2, topk, w2, ckv]
    heads = m.num_heads
    k_sel = sel[..., : m.qk_dim].reshape(n, p2, m.topk * w2, heads, -1).permute(0, 1, 3, 2, 4)
    v_sel = sel[..., m.qk_dim:].reshape(n, p2, m.topk * w2, heads, -1).permute(0, 1, 3, 2, 4)
    q_pix = q.reshape(n, p2, w2, heads, -1).permute(0, 1, 3, 2, 4)
    out = torch.softmax((q_pix * m.scale) @ k_sel.transpose(-2, -1), -1) @ v_sel  # [n, p2, heads, w2, hd]
    out = out.permute(0, 1, 3, 2, 4).reshape(n, s, s, rh, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, H, W, c)
    out = F.linear(out + lepe, m.wo.weight, m.wo.bias)
    return out[:, :h_in, :w_in]


@pytest.mark.parametrize("size,n_win,topk,qk_dim", [((12, 12), 3, 4, None), ((13, 10), 4, 3, 12), ((8, 8), 2, 1, 24)])
def test_bilevel_routing_module_matches_biformer_forward(size, n_win, topk, qk_dim):
    module = BiLevelRoutingAttention(24, 3, n_win=n_win, topk=topk, qk_dim=qk_dim, side_dwconv=3,
                                     auto_pad=True).double()
    _randomise(module, seed=3)
    x = torch.randn(2, *size, 24, dtype=torch.float64)
    assert module.scale == pytest.approx(module.qk_dim**-0.5)
    torch.testing.assert_close(module(x), _biformer_forward(module, x), rtol=1e-9, atol=1e-9)


def test_bilevel_routing_bad_args_and_no_auto_pad():
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(16, 2, n_win=2, topk=5)
    with pytest.raises(ValueError, match="side_dwconv"):
        BiLevelRoutingAttention(16, 2, n_win=2, side_dwconv=4)
    with pytest.raises(ValueError, match="qk_dim"):
        BiLevelRoutingAttention(16, 2, n_win=2, qk_dim=15)
    with pytest.raises(ValueError, match="n_win"):
        BiLevelRoutingAttention(16, 2, n_win=3, auto_pad=False)(torch.randn(1, 8, 8, 16))


def test_modules_backprop_float32_auto_backend():
    for module, x in [(NeighborhoodAttention2d(16, 2, 3, rel_pos_bias=True), torch.randn(2, 6, 7, 16)),
                      (WindowAttention(16, 3, 2, shift_size=1), torch.randn(2, 6, 6, 16)),
                      (AgentAttention(16, (6, 6), 2, agent_num=4), torch.randn(2, 6, 6, 16)),
                      (BiLevelRoutingAttention(16, 2, n_win=2, topk=2), torch.randn(2, 6, 6, 16))]:
        module(x).square().mean().backward()
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), type(module).__name__
        assert math.isfinite(sum(float(g.abs().sum()) for g in grads))


# ----------------------------------------------------------------------------------------------- official signatures
# Positional parameters of the official modules: Swin's models/swin_transformer.py WindowAttention, Agent-Attention's
# agent_transformer/models/agent_swin.py AgentAttention, BiFormer's ops/bra_legacy.py BiLevelRoutingAttention.
OFFICIAL = {
    WindowAttention: ["dim", "window_size", "num_heads", "qkv_bias", "qk_scale", "attn_drop", "proj_drop"],
    AgentAttention: ["dim", "window_size", "num_heads", "qkv_bias", "qk_scale", "attn_drop", "proj_drop",
                     "shift_size", "agent_num"],
    BiLevelRoutingAttention: ["dim", "num_heads", "n_win", "qk_dim", "qk_scale", "kv_per_win", "kv_downsample_ratio",
                              "kv_downsample_kernel", "kv_downsample_mode", "topk", "param_attention", "param_routing",
                              "diff_routing", "soft_routing", "side_dwconv", "auto_pad"],
}


@pytest.mark.parametrize("cls", list(OFFICIAL), ids=lambda c: c.__name__)
def test_official_argument_names_and_order(cls):
    params = list(inspect.signature(cls).parameters.values())
    official = OFFICIAL[cls]
    assert [p.name for p in params[:len(official)]] == official
    assert all(p.kind is p.KEYWORD_ONLY for p in params[len(official):])


def test_biformer_defaults_and_state_dict_keys():
    module = BiLevelRoutingAttention(32)
    assert (module.num_heads, module.n_win, module.topk, module.qk_dim, module.auto_pad) == (8, 7, 4, 32, False)
    assert module.lepe.kernel_size == (3, 3)  # BiFormer's side_dwconv default
    assert set(module.state_dict()) == {"qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias", "lepe.weight",
                                        "lepe.bias"}
    assert isinstance(BiLevelRoutingAttention(32, param_attention="qkv").wo, torch.nn.Identity)


# ----------------------------------------------------------------------------------------------- constructor checks
CONSTRUCTOR_ERRORS = [
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, side_dwconv=3.0), TypeError, "side_dwconv"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, qk_scale=math.nan), ValueError, "qk_scale"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, kv_downsample_mode="avgpool"), ValueError,
     "kv_downsample_mode"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, param_routing=True), ValueError, "param_routing"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, soft_routing=1), TypeError, "soft_routing"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, param_attention="qk"), ValueError,
     "param_attention"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2.0), TypeError, "n_win"),
    (BiLevelRoutingAttention, dict(dim=16, num_heads=2, n_win=2, auto_pad="yes"), TypeError, "auto_pad"),
    (NeighborhoodAttention2d, dict(embed_dim=16, num_heads=2, kernel_size=3, qk_scale=math.nan), ValueError,
     "qk_scale"),
    (NeighborhoodAttention2d, dict(embed_dim=16, num_heads=2, kernel_size=3, qk_scale=0), ValueError, "qk_scale"),
    (NeighborhoodAttention2d, dict(embed_dim=16, num_heads=2, kernel_size=3, proj_drop=1.5), ValueError,
     "proj_drop"),
    (NeighborhoodAttention2d, dict(embed_dim=16, num_heads=2, kernel_size=3, qkv_bias=1), TypeError, "qkv_bias"),
    (NeighborhoodAttention2d, dict(embed_dim=16, num_heads=2, kernel_size=3, is_causal=1), TypeError, "is_causal"),
    (NeighborhoodAttention2d, dict(embed_dim=16.0, num_heads=2, kernel_size=3), TypeError, "embed_dim"),
    (NeighborhoodAttention3d, dict(embed_dim=16, num_heads=0, kernel_size=3), ValueError, "num_heads"),
    (NeighborhoodAttention1d, dict(embed_dim=16, num_heads=2, kernel_size=3, backend="flex-fna"), ValueError,
     "backend"),
    (WindowAttention, dict(dim=16, window_size=4, num_heads=2, qk_scale=math.inf), ValueError, "qk_scale"),
    (WindowAttention, dict(dim=16, window_size=4, num_heads=2, attn_drop=0.1), ValueError, "attn_drop"),
    (WindowAttention, dict(dim=16, window_size=4, num_heads=2, shift_size=-1), ValueError, "shift_size"),
    (WindowAttention, dict(dim=16, window_size=4, num_heads=2, rel_pos_bias="yes"), TypeError, "rel_pos_bias"),
    (AgentAttention, dict(dim=16, window_size=7, num_heads=2, qk_scale=math.nan), ValueError, "qk_scale"),
    (AgentAttention, dict(dim=16, window_size=7, num_heads=2, shift_size=1.5), TypeError, "shift_size"),
    (AgentAttention, dict(dim=16, window_size=7, num_heads=2, proj_drop=-0.1), ValueError, "proj_drop"),
    (AgentAttention, dict(dim=16, window_size=7, num_heads=2, backend="triton2"), ValueError, "backend"),
]


@pytest.mark.parametrize("cls,kwargs,exc,name", CONSTRUCTOR_ERRORS,
                         ids=[f"{c.__name__}-{n}" for c, _, _, n in CONSTRUCTOR_ERRORS])
def test_constructor_rejects_bad_argument_naming_it(cls, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("height,width,pool", [(56, 56, 3), (28, 28, 4), (5, 9, 3), (3, 3, 4), (7, 7, 7)])
def test_pool_agents_is_adaptive_avg_pool(height, width, pool):
    """The GEMM pooling of q equals nn.AdaptiveAvgPool2d (uneven and overlapping bins, maps smaller than the grid),
    on a strided view of a fused qkv tensor, with a gradient."""
    from visattn.nn.agent import pool_agents

    qkv = torch.randn(2, height, width, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    q = qkv[..., 0, :, :]
    got = pool_agents(q, pool)
    want = F.adaptive_avg_pool2d(q.reshape(2, height, width, 8).permute(0, 3, 1, 2), pool)
    want = want.flatten(2).transpose(1, 2).reshape(2, pool * pool, 2, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, qkv, grad)
    (g_want,) = torch.autograd.grad(want, qkv, grad)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
