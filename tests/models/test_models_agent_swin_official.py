"""Agent-Swin end to end against the official model re-derived in float64 from LeapLabTHU/Agent-Attention
``agent_transformer/models/agent_swin.py``, computed straight from a random official-layout state dict (key names
and shapes from ``test_models_agent.official_state_shapes``).

Transcribed facts of the official code:

- ``PatchEmbed``: 4x4 stride-4 conv, flatten to tokens, LayerNorm; ``forward_features`` ends with LayerNorm and
  the mean over tokens; ``head``.
- ``BasicLayer``: per block the type from ``attn_type`` (``M<n>``: the first n blocks 'A'); window
  ``window_size`` for 'A' and ``max(7, window_size // 8)`` for 'B'; shift 0 for even block index i and
  window // 2 for odd i; then ``PatchMerging`` at the *end* of the stage (not after the last).
- ``SwinTransformerBlock``: if ``min(resolution) <= window``, no shift and the window becomes the map; pre-norm,
  roll by -shift, partition into windows, attention, reverse, roll back, residual; MLP (GELU) residual.
  Shifted windows add Swin's mask (-100 between the 3x3 slice regions) and every 'B' window adds the relative
  position bias ``table[index]`` (Swin's index: (dy + w - 1) * (2w - 1) + (dx + w - 1)).
- ``AgentAttention`` ('A', one window = the map): agents = adaptive average pool of q; agent biases
  ``interp(an_bias) + ah + aw`` and ``interp(na_bias)^T + ha + wa``; 3x3 depthwise conv of v added; ``proj``.
- ``PatchMerging``: concat ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]``, LayerNorm(4C),
  Linear(4C -> 2C, no bias).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from test_models_agent import official_state_shapes

import visattn  # noqa: F401
from visattn.models.agent import checkpoint_filter_fn, parse_attn_types

# 224 input so the 'B' windows (7) tile stage 3's 14x14 map and shift there; depth 3 at stage 3 with AAMB1
# makes its blocks A, B (odd: shifted), B (even: unshifted); stage 4's 7x7 map equals the window (no shift).
CFG = dict(embed_dim=8, depths=(1, 1, 3, 1), num_heads=(1, 2, 2, 4), attn_type="AAMB1", agent_num=(4, 4, 4, 1))
NUM_CLASSES = 10


def _random_official(seed=0):
    shapes = official_state_shapes(CFG["embed_dim"], CFG["depths"], CFG["num_heads"], CFG["attn_type"],
                                   agent_num=CFG["agent_num"], img_size=224, num_classes=NUM_CLASSES)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            out[key] = torch.zeros(shape)  # buffers: recomputed by the filter's target, never read
        elif key.endswith(".weight") and len(shape) == 1:  # LayerNorm scales
            out[key] = 1.0 + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            out[key] = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return out


def _ln(sd, p, x):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _partition(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _reverse(windows, ws, b, h, w):
    c = windows.shape[-1]
    return windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _relative_index(ws):
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    flat = torch.stack([ys.flatten(), xs.flatten()])
    rel = (flat[:, :, None] - flat[:, None, :]) + ws - 1
    return rel[0] * (2 * ws - 1) + rel[1]


def _shift_mask(h, w, ws, shift):
    img = torch.zeros(1, h, w, 1, dtype=torch.float64)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl] = cnt
            cnt += 1
    m = _partition(img, ws)[..., 0]
    diff = m[:, None, :] - m[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0).to(torch.float64)


def _window_attention(sd, p, x, heads, mask):
    bw, n, c = x.shape
    ws = int(n**0.5)
    q, k, v = F.linear(x, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"]).reshape(bw, n, 3, heads, c // heads).permute(
        2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + sd[p + ".relative_position_bias_table"][_relative_index(ws).flatten()].view(n, n, -1).permute(
        2, 0, 1)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask[None, :, None]
        attn = attn.view(-1, heads, n, n)
    out = (torch.softmax(attn, -1) @ v).transpose(1, 2).reshape(bw, n, c)
    return F.linear(out, sd[p + ".proj.weight"], sd[p + ".proj.bias"])


def _agent_attention(sd, p, x, heads, agents):
    b, n, c = x.shape
    h = w = int(n**0.5)
    hd = c // heads
    q, k, v = F.linear(x, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"]).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    pool = int(agents**0.5)
    agent = F.adaptive_avg_pool2d(q.reshape(b, h, w, c).permute(0, 3, 1, 2), pool).reshape(b, c, -1).permute(0, 2, 1)
    q, k, v = (t.reshape(b, n, heads, hd).permute(0, 2, 1, 3) for t in (q, k, v))
    agent = agent.reshape(b, agents, heads, hd).permute(0, 2, 1, 3)
    bias_a = F.interpolate(sd[p + ".an_bias"], size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
    bias_a = bias_a + (sd[p + ".ah_bias"] + sd[p + ".aw_bias"]).reshape(1, heads, agents, -1)
    agent_v = torch.softmax((agent * hd**-0.5) @ k.transpose(-2, -1) + bias_a, -1) @ v
    bias_q = F.interpolate(sd[p + ".na_bias"], size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
    bias_q = bias_q.permute(0, 1, 3, 2) + (sd[p + ".ha_bias"] + sd[p + ".wa_bias"]).reshape(1, heads, -1, agents)
    out = (torch.softmax((q * hd**-0.5) @ agent.transpose(-2, -1) + bias_q, -1) @ agent_v)
    out = out.transpose(1, 2).reshape(b, n, c)
    conv = F.conv2d(v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2), sd[p + ".dwc.weight"],
                    sd[p + ".dwc.bias"], padding=1, groups=c)
    out = out + conv.permute(0, 2, 3, 1).reshape(b, n, c)
    return F.linear(out, sd[p + ".proj.weight"], sd[p + ".proj.bias"])


def official_forward_features(sd, x, embed_dim, depths, num_heads, attn_type, agent_num, window_size=56):
    """AgentSwinTransformer.forward_features up to (not including) the token mean: [B, L, C] after ``norm``."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    res = x.shape[-1]
    x = _ln(sd, "patch_embed.norm", x.flatten(2).transpose(1, 2))
    types = parse_attn_types(attn_type, depths)
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            ws = window_size if types[i][j] == "A" else max(7, window_size // 8)
            shift = 0 if j % 2 == 0 else ws // 2
            if res <= ws:
                ws, shift = res, 0
            b, n, c = x.shape
            y = _ln(sd, p + ".norm1", x).view(b, res, res, c)
            if shift:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            windows = _partition(y, ws)
            if types[i][j] == "A":
                windows = _agent_attention(sd, p + ".attn", windows, num_heads[i], agent_num[i])
            else:
                mask = _shift_mask(res, res, ws, shift) if shift else None
                windows = _window_attention(sd, p + ".attn", windows, num_heads[i], mask)
            y = _reverse(windows, ws, b, res, res)
            if shift:
                y = torch.roll(y, (shift, shift), (1, 2))
            x = x + y.reshape(b, n, c)
            hidden = F.gelu(F.linear(_ln(sd, p + ".norm2", x), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
            x = x + F.linear(hidden, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
        if i < len(depths) - 1:
            b, n, c = x.shape
            g = x.view(b, res, res, c)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], -1)
            g = _ln(sd, f"layers.{i}.downsample.norm", g.reshape(b, -1, 4 * c))
            x = F.linear(g, sd[f"layers.{i}.downsample.reduction.weight"])
            res //= 2
    return _ln(sd, "norm", x)


def test_official_checkpoint_gives_the_official_features_and_logits():
    """A random official state dict through ``checkpoint_filter_fn`` (strict): the final NHWC feature map and the
    logits equal the official forward's in float64 — agent blocks at every stage map size, patch merging, 'B'
    blocks shifted on odd block indices with Swin's mask and relative-position tables, an unshifted window that
    covers the map."""
    sd = _random_official()
    model = timm.create_model("agent_swin_t", num_classes=NUM_CLASSES, backend="reference", **CFG).double().eval()
    model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    want = official_forward_features(sd, x, **CFG)
    torch.testing.assert_close(features.reshape(2, -1, features.shape[-1]), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits, F.linear(want.mean(1), sd["head.weight"], sd["head.bias"]), rtol=1e-9,
                               atol=1e-9)
