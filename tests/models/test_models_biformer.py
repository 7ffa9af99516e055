"""BiFormer: the attention modules against brute-force float64 oracles written from the official algorithm,
official-layout state dicts (key names and shapes written from rayleizhu/BiFormer models/biformer.py,
models/_common.py and
ops/bra_legacy.py) loading strictly. The own-layout round trip and the filter's refusals, shared by every family:
tests/models/test_models_timm_api.py."""

from __future__ import annotations

import pytest
import timm
import torch
from offline_hub import biformer_official_shapes as official_state_shapes
from offline_hub import random_state as _random_state

import visattn  # noqa: F401
from visattn.models.biformer import AttentionLePE, BiFormerBlock, checkpoint_filter_fn

TINY = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=4, topks=(1, 2, 4, -2))


@pytest.mark.parametrize("name,depths,dims", [
    ("biformer_tiny", (2, 2, 8, 2), (64, 128, 256, 512)),
    ("biformer_small", (4, 4, 18, 4), (64, 128, 256, 512)),
    ("biformer_base", (4, 4, 18, 4), (96, 192, 384, 768)),
])
def test_official_layout_loads_strictly(name, depths, dims):
    """An official checkpoint (``{"model": state_dict}``) maps onto every variant, strictly, shapes included."""
    official = {"model": {k: torch.empty(s) for k, s in official_state_shapes(depths, dims).items()},
                "optimizer": {}, "epoch": 299}
    with torch.device("meta"):
        model = timm.create_model(name)
    mapped = checkpoint_filter_fn(official, model)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want


def test_official_checkpoint_values_land_where_the_names_say():
    official = _random_state(official_state_shapes(TINY["depths"], TINY["embed_dims"], topks=TINY["topks"],
                                                   head_dim=8, num_classes=10))
    model = timm.create_model("biformer_tiny", num_classes=10, **TINY).eval()
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    torch.testing.assert_close(model.stem[3].weight, official["downsample_layers.0.3.weight"])
    torch.testing.assert_close(model.stages[2].downsample[0].weight, official["downsample_layers.2.0.weight"])
    torch.testing.assert_close(model.stages[1].blocks[0].attn.qkv.weight, official["stages.1.0.attn.qkv.qkv.weight"])
    torch.testing.assert_close(model.stages[3].blocks[0].mlp.fc2.bias, official["stages.3.0.mlp.3.bias"])


# ----------------------------------------------------------------------------------------------- oracles
def bra_official_oracle(x, module):
    """The official BRA forward (ops/bra_legacy.py) re-derived in float64 with explicit loops: pad x to the region
    grid, project, per region the top-k regions by the dot product of region-mean q and k (all heads), then per
    head softmax(scale * q k^T) over the routed regions' tokens, plus LePE of v, then wo, then crop."""
    n = module.n_win
    batch, height, width, dim = x.shape
    ph, pw = -height % n, -width % n
    xp = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = height + ph, width + pw
    qkv = module.qkv(xp)
    qk = module.qk_dim
    q, k, v = qkv[..., :qk], qkv[..., qk:2 * qk], qkv[..., 2 * qk:]
    rh, rw = hp // n, wp // n

    def region(t, r):  # tokens of region r (row-major over the n x n grid): [B, rh*rw, C]
        rows, cols = slice((r // n) * rh, (r // n + 1) * rh), slice((r % n) * rw, (r % n + 1) * rw)
        return t[:, rows, cols].reshape(batch, -1, t.shape[-1])

    out = torch.zeros(batch, hp, wp, dim, dtype=x.dtype)
    heads = module.num_heads
    for b in range(batch):
        qmean = torch.stack([region(q, r)[b].mean(0) for r in range(n * n)])
        kmean = torch.stack([region(k, r)[b].mean(0) for r in range(n * n)])
        routes = torch.topk(qmean @ kmean.T, module.topk, dim=-1).indices
        for r in range(n * n):
            qs = region(q, r)[b]
            ks = torch.cat([region(k, s)[b] for s in routes[r]])
            vs = torch.cat([region(v, s)[b] for s in routes[r]])
            per_head = []
            for h in range(heads):
                cq = slice(h * qk // heads, (h + 1) * qk // heads)
                cv = slice(h * dim // heads, (h + 1) * dim // heads)
                probs = torch.softmax(module.scale * qs[:, cq] @ ks[:, cq].T, dim=-1)
                per_head.append(probs @ vs[:, cv])
            o = torch.cat(per_head, dim=-1).reshape(rh, rw, dim)
            out[b, (r // n) * rh:(r // n + 1) * rh, (r % n) * rw:(r % n + 1) * rw] = o
    out = out + module.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return module.wo(out)[:, :height, :width]


@pytest.mark.parametrize("size,n_win,topk", [((8, 8), 4, 2), ((10, 7), 3, 4), ((14, 14), 7, 16)])
def test_bra_module_matches_official_algorithm(size, n_win, topk):
    torch.manual_seed(0)
    # the attention as the model configures it (visattn.nn.BiLevelRoutingAttention, flat qkv, padded, 5x5 LePE)
    module = BiFormerBlock(24, num_heads=3, topk=topk, n_win=n_win, backend="reference").attn.double()
    assert module.lepe.kernel_size == (5, 5) and module.auto_pad
    assert module.scale == 24**-0.5  # the released quirk: qk_dim ** -0.5, not head_dim ** -0.5
    x = torch.randn(1, *size, 24, dtype=torch.float64, requires_grad=True)
    got = module(x)
    want = bra_official_oracle(x, module)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    gx, = torch.autograd.grad(got.square().sum(), x)
    wx, = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-8, atol=1e-10)


def test_last_stage_attention_matches_official_formula():
    """AttentionLePE (models/_common.py): 8 heads, bias-free qkv, softmax(q k^T * (C/8)^-0.5) v, LePE of the input."""
    torch.manual_seed(0)
    module = AttentionLePE(32).double()
    x = torch.randn(2, 5, 6, 32, dtype=torch.float64)
    tokens = x.reshape(2, 30, 32)
    q, k, v = module.qkv(tokens).reshape(2, 30, 3, 8, 4).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-1, -2)) * 4**-0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(2, 30, 32)
    lepe = module.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
    want = module.proj(out + lepe).reshape(2, 5, 6, 32)
    torch.testing.assert_close(module(x), want, rtol=1e-10, atol=1e-12)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="topk"):
        timm.create_model("biformer_tiny", topks=(1, 4, 0, -2))
    with pytest.raises(ValueError, match="embed_dims"):
        timm.create_model("biformer_tiny", embed_dims=(64, 128))
    with pytest.raises(ValueError, match=r"topk must be <= n_win\*\*2 = 49"):
        timm.create_model("biformer_tiny", topks=(1, 4, 50, -2))
