"""Batched [CLS]-row scoring of many vision layers (``clip_cls_attention_layers``, used by VTC-CLS) against the
single-layer functions and against the models' own eager attention probabilities."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from visattn.tokenprune.scoring import (  # noqa: E402
    clip_cls_attention,
    clip_cls_attention_layers,
    cls_attention_captures,
    open_clip_cls_attention,
)

# HF eager attention takes its softmax in float32 (even for a float64 model): float32-level agreement
EAGER = dict(atol=1e-7, rtol=1e-6)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, so norm affines and q/k biases are all non-trivial."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def hf_tower(kind: str = "clip", dtype: torch.dtype = torch.float64, seed: int = 0):
    """Tiny HF vision tower (hidden 32, 4 heads, 3 layers, 56 px, patch 14) with eager attention."""
    import transformers

    cfg_cls, model_cls = {
        "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
        "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
    }[kind]
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=56, patch_size=14)
    model = model_cls._from_config(cfg, attn_implementation="eager")
    return _randomise(model, seed).to(dtype)


def hf_run(model, bsz: int = 2, seed: int = 1):
    """(encoder layers, per-layer inputs, per-layer eager attention probabilities) of one forward."""
    dtype = next(model.parameters()).dtype
    px = torch.randn(bsz, 3, 56, 56, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    out = model(pixel_values=px, output_hidden_states=True, output_attentions=True)
    return _layers(model), out.hidden_states, out.attentions


def _layers(model):
    return getattr(model, "vision_model", model).encoder.layers  # transformers 5 dropped the inner vision_model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_layers_match_single_layer_and_eager(kind):
    layers, hidden, attn = hf_run(hf_tower(kind))
    idx = [0, 1, 2]
    probs = clip_cls_attention_layers([layers[i] for i in idx], [hidden[i] for i in idx])
    assert probs.shape == (3, 2, 4, hidden[0].shape[1])  # SigLIP has no [CLS]: row 0 is the first patch
    eager = torch.stack([attn[i][:, :, 0] for i in idx])
    torch.testing.assert_close(probs.double(), eager, **EAGER)
    single = torch.stack([clip_cls_attention(layers[i], hidden[i])[0] for i in idx])  # float32 inside
    torch.testing.assert_close(probs.float(), single, atol=1e-6, rtol=1e-5)


def test_hf_float32_subset_and_order():
    layers, hidden, attn = hf_run(hf_tower(dtype=torch.float32), bsz=3)
    idx = [2, 0]
    probs = clip_cls_attention_layers([layers[i] for i in idx], [hidden[i] for i in idx])
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.stack([attn[i][:, :, 0] for i in idx]), atol=2e-6, rtol=1e-5)
    caps = cls_attention_captures(layers, {i: hidden[i] for i in idx})
    assert list(caps) == idx and all(k is None for _, k in caps.values())
    for j, i in enumerate(idx):
        torch.testing.assert_close(caps[i][0], probs[j])


def test_hf_per_layer_eps_falls_back_to_a_loop():
    model = hf_tower()
    layers = _layers(model)
    layers[1].layer_norm1.eps = 0.5  # large enough to change the scores
    _, hidden, attn = hf_run(model)
    probs = clip_cls_attention_layers(list(layers), hidden[:3])
    torch.testing.assert_close(probs, torch.stack([a[:, :, 0] for a in attn]), **EAGER)


def test_non_layernorm_falls_back_to_single_layers():
    model = hf_tower()
    layers = _layers(model)
    layers[1].layer_norm1 = torch.nn.RMSNorm(32, dtype=torch.float64)
    _, hidden, attn = hf_run(model)
    probs = clip_cls_attention_layers(list(layers), hidden[:3], cache={})
    torch.testing.assert_close(probs, torch.stack([a[:, :, 0] for a in attn]).float(), **EAGER)


def test_cache_reused_and_rebuilt_after_weight_change():
    model = hf_tower()
    layers, hidden, _ = hf_run(model)
    cache: dict = {}
    first = clip_cls_attention_layers(list(layers), hidden[:3], cache)
    weights = cache["weights"]
    torch.testing.assert_close(clip_cls_attention_layers(list(layers), hidden[:3], cache), first)
    assert cache["weights"] is weights
    layers[2].self_attn.q_proj.weight.mul_(1.5)  # in place: same storage, new version
    layers[0].layer_norm1.bias.add_(0.3)
    _, hidden2, attn2 = hf_run(model)
    probs = clip_cls_attention_layers(list(layers), hidden2[:3], cache)
    assert cache["weights"] is not weights
    torch.testing.assert_close(probs, torch.stack([a[:, :, 0] for a in attn2]), **EAGER)


# -------------------------------------------------------------------------------------------------- open_clip
def oc_tower(seed: int = 0, layers: int = 3):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(seed)
    cfg = CLIPVisionCfg(layers=layers, width=64, head_width=32, patch_size=8, image_size=32)
    return _randomise(_build_vision_tower(16, cfg), seed).double()


def test_open_clip_blocks_match_single_block_and_eager():
    pytest.importorskip("open_clip")
    visual = oc_tower()
    blocks = visual.transformer.resblocks
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in blocks]
    visual(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for h in hooks:
        h.remove()
    probs = clip_cls_attention_layers(list(blocks), seen, cache={})
    assert probs.shape == (3, 2, 2, 17)
    eager = []
    for block, x in zip(blocks, seen, strict=False):  # the block's own nn.MultiheadAttention, per-head weights
        h = block.ln_1(x)
        eager.append(block.attn(h, h, h, need_weights=True, average_attn_weights=False)[1][:, :, 0])
    torch.testing.assert_close(probs, torch.stack(eager), atol=1e-12, rtol=1e-10)  # float64 throughout
    single = torch.stack([open_clip_cls_attention(b, x)[0] for b, x in zip(blocks, seen, strict=False)])
    torch.testing.assert_close(probs.float(), single, atol=1e-6, rtol=1e-5)
