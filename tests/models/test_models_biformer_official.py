"""BiFormer end to end against the official model re-derived in float64 from rayleizhu/BiFormer, computed straight
from a random official-layout state dict (key names from ``test_models_biformer.official_state_shapes``).

Transcribed facts (models/biformer.py, models/_common.py, ops/bra_legacy.py as released):

- ``forward_features``: for each stage i, ``downsample_layers[i]`` (i = 0: Conv 3x3 s2, BN, GELU, Conv 3x3 s2, BN;
  else Conv 3x3 s2, BN) then ``stages[i]``; then ``norm`` (BatchNorm2d); ``forward``: mean over H*W, ``head``.
- ``Block.forward``: ``x = x + pos_embed(x)`` (3x3 depthwise conv, NCHW), then NHWC:
  ``x = x + attn(norm1(x))``, ``x = x + mlp(norm2(x))``; LayerNorm eps 1e-6; mlp = Linear, Identity, GELU, Linear.
- BRA (``auto_pad``): zero-pad the *input* to a multiple of n_win at the bottom/right, ``qkv`` (rows q | k | v),
  region means of q and k (all heads together), routing = top-k of ``(q_mean * scale) @ k_mean^T`` per query
  region, per head softmax(``scale`` q k^T) over the routed regions' tokens, LePE = 5x5 depthwise conv of the
  whole padded v map, ``wo``, crop. ``scale = qk_dim ** -0.5``; heads = qk_dim / head_dim.
- AttentionLePE (topk -2): 8 heads, bias-free qkv, softmax(q k^T (C/8)^-0.5) v, plus a 5x5 depthwise conv of the
  block's normalised input, ``proj``.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from test_models_biformer import TINY, _random_state, official_state_shapes

import visattn  # noqa: F401
from visattn.models.biformer import checkpoint_filter_fn

NUM_CLASSES = 10


def _random_official(seed=0):
    """test_models_biformer's random official state dict (BN statistics included), in float64."""
    shapes = official_state_shapes(TINY["depths"], TINY["embed_dims"], topks=TINY["topks"],
                                   head_dim=TINY["head_dim"], num_classes=NUM_CLASSES)
    return {k: v.double() if v.is_floating_point() else v for k, v in _random_state(shapes, seed).items()}


def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        training=False, eps=1e-5)


def _conv(sd, p, x, stride=1, groups=1):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd.get(p + ".bias"), stride=stride, padding=w.shape[-1] // 2, groups=groups)


def _bra(sd, p, x, n_win, topk, head_dim):
    """ops/bra_legacy.py BiLevelRoutingAttention.forward (identity kv downsample, qkvo, auto_pad) on NHWC x."""
    batch, height, width, dim = x.shape
    xp = F.pad(x, (0, 0, 0, -width % n_win, 0, -height % n_win))
    hp, wp = xp.shape[1:3]
    qkv = F.linear(xp, sd[p + ".qkv.qkv.weight"], sd[p + ".qkv.qkv.bias"])
    qk_dim = (qkv.shape[-1] - dim) // 2
    q, k, v = qkv[..., :qk_dim], qkv[..., qk_dim:2 * qk_dim], qkv[..., 2 * qk_dim:]
    heads, scale = qk_dim // head_dim, qk_dim**-0.5
    rh, rw = hp // n_win, wp // n_win

    def region(t, b, r):
        i, j = divmod(r, n_win)
        return t[b, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw].reshape(rh * rw, -1)

    out = torch.zeros(batch, hp, wp, dim, dtype=x.dtype)
    for b in range(batch):
        qm = torch.stack([region(q, b, r).mean(0) for r in range(n_win**2)])
        km = torch.stack([region(k, b, r).mean(0) for r in range(n_win**2)])
        routes = torch.topk((qm * scale) @ km.T, topk, dim=-1).indices
        for r in range(n_win**2):
            keys = torch.cat([region(k, b, int(s)) for s in routes[r]])
            values = torch.cat([region(v, b, int(s)) for s in routes[r]])
            queries = region(q, b, r)
            heads_out = []
            for h in range(heads):
                cq = slice(h * head_dim, (h + 1) * head_dim)
                cv = slice(h * dim // heads, (h + 1) * dim // heads)
                heads_out.append(torch.softmax(scale * queries[:, cq] @ keys[:, cq].T, -1) @ values[:, cv])
            i, j = divmod(r, n_win)
            out[b, i * rh:(i + 1) * rh, j * rw:(j + 1) * rw] = torch.cat(heads_out, -1).reshape(rh, rw, dim)
    lepe = _conv(sd, p + ".lepe", v.permute(0, 3, 1, 2), groups=dim).permute(0, 2, 3, 1)
    out = F.linear(out + lepe, sd[p + ".wo.weight"], sd[p + ".wo.bias"])
    return out[:, :height, :width]


def _attention_lepe(sd, p, x, heads=8):
    """models/_common.py AttentionLePE.forward on NHWC x."""
    batch, height, width, dim = x.shape
    tokens = x.reshape(batch, height * width, dim)
    q, k, v = F.linear(tokens, sd[p + ".qkv.weight"]).reshape(batch, -1, 3, heads, dim // heads).permute(
        2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5, -1)
    out = (attn @ v).transpose(1, 2).reshape(batch, height, width, dim)
    lepe = _conv(sd, p + ".lepe", x.permute(0, 3, 1, 2), groups=dim).permute(0, 2, 3, 1)
    return F.linear(out + lepe, sd[p + ".proj.weight"], sd[p + ".proj.bias"])


def official_forward_features(sd, x, depths, embed_dims, head_dim, n_win, topks, **_):
    """models/biformer.py BiFormer.forward_features (NCHW, after the final BatchNorm)."""
    x = _bn(sd, "downsample_layers.0.1", _conv(sd, "downsample_layers.0.0", x, stride=2))
    x = _bn(sd, "downsample_layers.0.4", _conv(sd, "downsample_layers.0.3", F.gelu(x), stride=2))
    for i, depth in enumerate(depths):
        if i:
            x = _bn(sd, f"downsample_layers.{i}.1", _conv(sd, f"downsample_layers.{i}.0", x, stride=2))
        dim = embed_dims[i]
        for j in range(depth):
            p = f"stages.{i}.{j}"
            x = x + _conv(sd, p + ".pos_embed", x, groups=dim)
            y = x.permute(0, 2, 3, 1)
            normed = F.layer_norm(y, (dim,), sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], eps=1e-6)
            if topks[i] > 0:
                y = y + _bra(sd, p + ".attn", normed, n_win, topks[i], head_dim)
            else:
                y = y + _attention_lepe(sd, p + ".attn", normed)
            normed = F.layer_norm(y, (dim,), sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], eps=1e-6)
            hidden = F.gelu(F.linear(normed, sd[p + ".mlp.0.weight"], sd[p + ".mlp.0.bias"]))
            y = y + F.linear(hidden, sd[p + ".mlp.3.weight"], sd[p + ".mlp.3.bias"])
            x = y.permute(0, 3, 1, 2)
    return _bn(sd, "norm", x)


def test_official_checkpoint_gives_the_official_features_and_logits():
    """A random official state dict through ``checkpoint_filter_fn`` (strict): the final NCHW feature map and the
    logits equal the official forward's in float64, on an input whose stage maps the region grid does not divide
    (BRA's padding path) and with every region routed by data (top-k 1 / 2 / 4, then full attention)."""
    sd = _random_official()
    model = timm.create_model("biformer_tiny", num_classes=NUM_CLASSES, backend="reference",
                              **TINY).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    x = torch.randn(2, 3, 56, 72, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    want = official_forward_features(sd, x, **TINY)
    torch.testing.assert_close(features, want, rtol=1e-9, atol=1e-9)
    want_logits = F.linear(want.flatten(2).mean(-1), sd["head.weight"], sd["head.bias"])
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
