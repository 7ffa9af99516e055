"""MedViTV2 against the official arithmetic, re-derived in float64 from the facts of Omid-Nejati/MedViTV2
``MedViT.py`` / ``fasterkan.py`` and computed straight from an official-layout state dict (flat ``features.N``,
``proj_head.0``, the unused GFP feed-forward included), which ``checkpoint_filter_fn`` maps into the model:

- ``ConvBNReLU``: 3×3 conv (padding 1, no bias), BN (eval: running statistics), ReLU; stem strides 2, 1, 1, 2.
- ``PatchEmbed``: stride 2 → 2×2 average pool (ceil_mode, padding not counted), 1×1 conv, BN; width change →
  1×1 conv, BN; else identity.
- ``LFP``: x = patch_embed(x); x = x + NA(BN(x).reshape(B, H, W, C)).reshape(B, C, H, W) with NATTEN's module
  (qkv Linear, channels [3][heads][d], q·d^-0.5, kernel 7, rpb[h, key - query + 6], softmax, proj Linear);
  x = x + LFF(BN(x)) with LFF(y) = y + BN(1×1(SE(hs(BN(dw_k(hs(BN(1×1(y)))))))))); hs(t) = t·relu6(t+3)/6,
  SE(t) = t · relu6(fc2(relu(fc1(mean_hw t))) + 3)/6; k = 7 in stage 1, 3 after.
- ``GFP``: x = patch_embed(x) (to the E-MHSA width m = make_divisible(0.75·C, 32)); tokens = BN(x) flattened;
  E-MHSA: kv = BN1d(avgpool1d over sr² consecutive tokens) when sr > 1, softmax(q kᵀ·32^-0.5) v per head, proj;
  x = x + E-MHSA; out = projection(x) (1×1 conv + BN to C - m); x = cat(x, out + MHCA(out)) with MHCA = 1×1 conv ·
  ReLU · BN · grouped 3×3 conv; x = x + KAN(BN(x).reshape(-1, C)).reshape(x.shape) with two FasterKAN layers
  (LayerNorm, 1 - tanh((t - g)/0.33)² on g = linspace(-2, 2, 8), bias-free Linear over (feature, g)).
- BN, global average, Linear.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import na_oracle

timm = pytest.importorskip("timm")

from visattn.models.medvit import MedViTV2, block_types, checkpoint_filter_fn  # noqa: E402

SMALL = dict(stem_chs=(16, 8, 16), depths=(1, 1, 3, 1), dims=(64, 128, 192, 256), num_classes=7)
EPS = 1e-5


def _bn(x, sd, p):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = sd[p + "weight"] / torch.sqrt(sd[p + "running_var"] + EPS)
    return (x - sd[p + "running_mean"].view(shape)) * scale.view(shape) + sd[p + "bias"].view(shape)


def _patch_embed(x, sd, p, stride):
    if stride == 2:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    if p + "conv.weight" in sd:
        x = _bn(F.conv2d(x, sd[p + "conv.weight"]), sd, p + "norm.")
    return x


def _hswish(t):
    return t * F.relu6(t + 3) / 6


def _lff(y, sd, p, k):
    t = _hswish(_bn(F.conv2d(y, sd[p + "0.weight"]), sd, p + "1."))
    t = _hswish(_bn(F.conv2d(t, sd[p + "3.weight"], padding=k // 2, groups=t.shape[1]), sd, p + "4."))
    gate = F.relu(F.linear(t.mean((2, 3)), sd[p + "6.fc.0.weight"], sd[p + "6.fc.0.bias"]))
    gate = F.relu6(F.linear(gate, sd[p + "6.fc.2.weight"], sd[p + "6.fc.2.bias"]) + 3) / 6
    t = t * gate[:, :, None, None]
    return y + _bn(F.conv2d(t, sd[p + "7.weight"]), sd, p + "8.")


def _lfp(x, sd, p, stride, k, head_dim=32):
    x = _patch_embed(x, sd, p + "patch_embed.", stride)
    b, c, h, w = x.shape
    y = _bn(x, sd, p + "norm1.").reshape(b, h, w, c)
    heads = c // head_dim
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(b, h, w, 3, heads, head_dim)
    attn = na_oracle(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (7, 7), scale=head_dim ** -0.5,
                     rpb=sd[p + "attn.rpb"])
    attn = F.linear(attn.reshape(b, h, w, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    x = x + attn.reshape(b, c, h, w)
    return x + _lff(_bn(x, sd, p + "norm2."), sd, p + "conv.conv.", k)


def _kan_layer(t, sd, p):
    t = F.layer_norm(t, t.shape[-1:], sd[p + "layernorm.weight"], sd[p + "layernorm.bias"])
    basis = 1 - torch.tanh((t[..., None] - sd[p + "rbf.grid"]) / 0.33) ** 2
    return basis.reshape(t.shape[0], -1) @ sd[p + "spline_linear.weight"].T


def _gfp(x, sd, p, stride, sr, head_dim=32):
    x = _patch_embed(x, sd, p + "patch_embed.", stride)
    b, m, h, w = x.shape
    tokens = _bn(x, sd, p + "norm1.").flatten(2).transpose(1, 2)  # [b, n, m]
    kv = tokens
    if sr > 1:
        kv = _bn(F.avg_pool1d(tokens.transpose(1, 2), sr * sr, sr * sr), sd, p + "e_mhsa.norm.").transpose(1, 2)
    heads = m // head_dim

    def split(t, name):
        return F.linear(t, sd[p + f"e_mhsa.{name}.weight"], sd[p + f"e_mhsa.{name}.bias"]).view(
            b, t.shape[1], heads, head_dim).transpose(1, 2)

    q, k, v = split(tokens, "q"), split(kv, "k"), split(kv, "v")
    att = torch.softmax(q @ k.transpose(-1, -2) * head_dim ** -0.5, dim=-1) @ v
    att = F.linear(att.transpose(1, 2).reshape(b, -1, m), sd[p + "e_mhsa.proj.weight"], sd[p + "e_mhsa.proj.bias"])
    x = x + att.transpose(1, 2).reshape(b, m, h, w)
    out = _patch_embed(x, sd, p + "projection.", 1)
    mh = F.conv2d(out, sd[p + "mhca.group_conv3x3.weight"], padding=1, groups=out.shape[1] // head_dim)
    mh = F.conv2d(F.relu(_bn(mh, sd, p + "mhca.norm.")), sd[p + "mhca.projection.weight"])
    x = torch.cat([x, out + mh], 1)
    y = _bn(x, sd, p + "norm2.")
    rows = y.reshape(-1, y.shape[1])
    kan = _kan_layer(_kan_layer(rows, sd, p + "kan.layers.0."), sd, p + "kan.layers.1.")
    return x + kan.reshape(x.shape)


def official_forward(sd, x, depths, sr_ratios=(8, 4, 2, 1)):
    for i, stride in enumerate((2, 1, 1, 2)):
        x = F.relu(_bn(F.conv2d(x, sd[f"stem.{i}.conv.weight"], stride=stride, padding=1), sd, f"stem.{i}.norm."))
    n = 0
    for s, kinds in enumerate(block_types(depths)):
        for j, kind in enumerate(kinds):
            stride = 2 if s > 0 and j == 0 else 1
            p = f"features.{n}."
            x = _lfp(x, sd, p, stride, 7 if s == 0 else 3) if kind == "L" else _gfp(x, sd, p, stride, sr_ratios[s])
            n += 1
    x = _bn(x, sd, "norm.").mean((2, 3))
    return F.linear(x, sd["proj_head.0.weight"], sd["proj_head.0.bias"])


def official_state_dict(model: MedViTV2, seed=0) -> dict:
    """Random float64 values in the official layout: flat ``features.N``, ``proj_head.0``, plus the weights of the
    locality feed-forward the official GFP builds and never runs (which the filter must drop)."""
    gen = torch.Generator().manual_seed(seed)
    out, n = {}, 0
    for stage in model.stages:
        for block in stage.blocks:
            for name, t in block.state_dict().items():
                out[f"features.{n}.{name}"] = t
            if hasattr(block, "e_mhsa"):
                c, hidden = block.norm2.num_features, 2 * block.norm2.num_features
                dead = {"conv.conv.0.weight": (hidden, c, 1, 1), "conv.conv.3.weight": (hidden, 1, 3, 3),
                        "conv.conv.7.weight": (c, hidden, 1, 1), "conv.conv.6.fc.0.weight": (2, hidden)}
                for name, shape in dead.items():
                    out[f"features.{n}.{name}"] = torch.zeros(shape)
            n += 1
    for name, t in model.state_dict().items():
        if not name.startswith("stages."):
            out[name.replace("head.", "proj_head.0.", 1) if name.startswith("head.") else name] = t
    for name, t in out.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("rbf.grid"):
            out[name] = torch.linspace(-2, 2, 8, dtype=torch.float64)
        elif name.endswith("running_var"):
            out[name] = torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or ".norm." in name and "weight" in name:
            out[name] = 1 + 0.2 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
        else:
            fan_in = max(1, math.prod(t.shape[1:]))
            out[name] = torch.randn(t.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
    return out


def test_checkpoint_layout_maps_and_model_matches_official_arithmetic():
    torch.manual_seed(0)
    model = timm.create_model("medvitv2_tiny", **SMALL).double().eval()
    official = official_state_dict(model)
    mapped = checkpoint_filter_fn({"model": official}, model)
    assert "stages.1.blocks.0.conv.conv.0.weight" not in mapped  # stage 2's only block is a GFP: dead LFF dropped
    model.load_state_dict(mapped, strict=True)
    assert checkpoint_filter_fn(model.state_dict()).keys() == model.state_dict().keys()  # own layout unchanged
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    weight = torch.randn(1, SMALL["num_classes"], dtype=torch.float64)
    x_ref, x_got = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in official.items() if v.is_floating_point()
              and not k.endswith(("running_mean", "running_var", "rbf.grid"))}
    want = official_forward({**official, **leaves}, x_ref, SMALL["depths"])
    got = model(x_got)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert want.abs().max() > 1e-2  # a non-trivial output
    # gradients of the input and of every parameter against the autograd of the official arithmetic
    want_grads = torch.autograd.grad((want * weight).sum(), [x_ref, *leaves.values()], allow_unused=True)
    (got * weight).sum().backward()
    def close(got, want, what):  # float64, to 1e-7 of the tensor's scale (the key bias's true gradient is 0:
        # elementwise relative errors of its rounding noise mean nothing)
        err = (got - want).abs().max().item()
        assert err <= 1e-7 * max(1.0, want.abs().max().item()), (what, err)

    close(x_got.grad, want_grads[0], "input")
    tags = {key: torch.tensor(i) for i, key in enumerate(official)}  # which official key became which of ours
    renamed = {int(v): ours for ours, v in checkpoint_filter_fn(tags, model).items()}
    mine = dict(model.named_parameters())
    for (key, _), grad in zip(leaves.items(), want_grads[1:], strict=True):
        ours = renamed.get(int(tags[key]))
        if ours is None:  # the dead GFP feed-forward: no gradient in either
            assert grad is None, key
            continue
        close(mine[ours].grad, grad, key)
    assert len([k for k in leaves if int(tags[k]) in renamed]) == len(mine)  # every parameter compared


# parameters of the official definitions (MedViT.py with num_classes=1000, counted by building them): total, the
# share of the GFP feed-forward that is built but never called (not built here), and the KAN grids (frozen
# Parameters there, buffers here: 8 per KAN layer, two layers per GFP)
OFFICIAL_PARAMS = {"medvitv2_tiny": (11_719_845, 984_328, 64), "medvitv2_small": (30_087_295, 2_750_218, 80),
                   "medvitv2_base": (66_995_571, 6_140_554, 80), "medvitv2_large": (118_291_477, 10_874_378, 80)}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_equal_the_official_definitions(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    total, unused, grids = OFFICIAL_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == total - unused - grids
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("rbf.grid")) == grids


def test_timm_api_features_and_backend():
    torch.manual_seed(0)
    model = timm.create_model("medvitv2_tiny", **SMALL).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [tuple(m.shape) for m in maps] == [(1, 64, 28, 28), (1, 128, 14, 14), (1, 192, 7, 7), (1, 256, 4, 4)]
        torch.testing.assert_close(model.forward_head(final), model(x))
        backbone = timm.create_model("medvitv2_tiny", features_only=True, out_indices=(1, 3), **SMALL).eval()
        backbone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("head", "norm."))},
                                 strict=False)
        assert [f.shape[1] for f in backbone(x)] == [128, 256]
    assert model.no_weight_decay() >= {"stages.0.blocks.0.attn.rpb"}
    with pytest.raises(ValueError, match="depths"):
        timm.create_model("medvitv2_tiny", depths=(2, 2, 5, 1))
    with pytest.raises(ValueError, match="MHCA"):  # a GFP width whose E-MHSA part rounds up to all of it
        timm.create_model("medvitv2_tiny", dims=(64, 96, 192, 256))
    with pytest.raises(TypeError, match="unexpected keyword"):
        timm.create_model("medvitv2_tiny", window=3)
