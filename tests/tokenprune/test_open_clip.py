"""[CLS]-attention / embedding pruning on open_clip vision towers against eager by-hand oracles."""

from __future__ import annotations

import pytest
import torch
from tp_oracles import divprune_loop, topk_sorted

from visattn import tokenprune as tp
from visattn.tokenprune.scoring import open_clip_cls_attention


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test (a module-level switch would leak into every later test file)."""
    with torch.no_grad():
        yield


def oc_tower(seed=0, layers=3, **kw):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(seed)
    cfg = CLIPVisionCfg(layers=layers, width=64, head_width=32, patch_size=8, image_size=32, **kw)
    v = _build_vision_tower(16, cfg).double().eval()
    for p in v.parameters():
        p.data.normal_(0, 0.15)
    return v


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def block_inputs(visual, px):
    """Inputs of every block of the unpruned tower (batch-first)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in visual.transformer.resblocks]
    visual(px)
    for h in hooks:
        h.remove()
    return seen


def cls_row_by_hand(block, x):
    """(B, H, S): softmax over keys of the [CLS] query, per head, from the block's raw weights."""
    mha = block.attn
    c = x.shape[-1]
    heads, hd = mha.num_heads, c // mha.num_heads
    h = torch.nn.functional.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    out = torch.zeros(x.shape[0], heads, x.shape[1], dtype=x.dtype)
    for b in range(x.shape[0]):
        for head in range(heads):
            rows = slice(head * hd, (head + 1) * hd)
            q = h[b, 0] @ w[:c][rows].T + bias[:c][rows]
            k = h[b] @ w[c : 2 * c][rows].T + bias[c : 2 * c][rows]
            logits = [float(q @ k[s]) / hd**0.5 for s in range(x.shape[1])]
            out[b, head] = torch.softmax(torch.tensor(logits, dtype=x.dtype), 0)
    return out


def test_cls_scores_equal_by_hand_and_torch_mha():
    visual = oc_tower(output_tokens=True)
    px = images(2)
    for block, x in zip(visual.transformer.resblocks, block_inputs(visual, px), strict=False):
        probs, keys = open_clip_cls_attention(block, x)
        assert probs.dtype == torch.float32  # scores are taken in float32 by design
        torch.testing.assert_close(probs.double(), cls_row_by_hand(block, x), atol=1e-6, rtol=1e-5)
        h = block.ln_1(x)
        _, w = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(probs.double(), w[:, :, 0], atol=1e-6, rtol=1e-5)
        c = x.shape[-1]
        want_k = (h @ block.attn.in_proj_weight[c : 2 * c].T + block.attn.in_proj_bias[c : 2 * c])
        torch.testing.assert_close(keys, want_k.view(2, x.shape[1], block.attn.num_heads, -1))


@pytest.mark.parametrize(
    "pruner, layers",
    [(tp.FasterVLM(keep=5, layer=-1), [2]), (tp.FasterVLM(keep=0.5, layer=0), [0]),
     (tp.VTCCLS(keep=4, start_layer=0, end_layer=-1), [0, 1])],
)
def test_cls_pruning_keeps_oracle_top_tokens(pruner, layers):
    visual = oc_tower(output_tokens=True, seed=4)
    px = images(3, seed=2)
    pooled0, tokens0 = visual(px)
    inputs = block_inputs(visual, px)
    tp.apply(visual, pruner, timing=True)
    pooled, tokens = visual(px)
    rep = tp.last_report(visual)
    torch.testing.assert_close(pooled, pooled0)
    k = pruner.output_count(16)
    assert tokens.shape == (3, k, 64) and rep.visual_tokens_kept == [k] * 3 and rep.visual_tokens == [16] * 3
    for b in range(3):
        scores = sum(cls_row_by_hand(visual.transformer.resblocks[i], inputs[i][b : b + 1])[0].mean(0)[1:]
                     for i in layers)
        want = topk_sorted(scores, k)
        assert rep.kept_indices[b][0].tolist() == want
        torch.testing.assert_close(tokens[b], tokens0[b, want])
        torch.testing.assert_close(tokens[b : b + 1], visual(px[b : b + 1])[1])  # batch row = alone
    assert rep.scoring_ms >= 0.0


def test_visionzip_and_divprune_on_open_clip_tower():
    visual = oc_tower(output_tokens=True, seed=6)
    px = images(2, seed=7)
    _, tokens0 = visual(px)
    inputs = block_inputs(visual, px)
    final = visual.ln_post(visual.transformer(visual._embeds(px)))
    tp.apply(visual, tp.VisionZip(dominant=5, contextual=3, layer=-1))
    _, tokens = visual(px)
    rep = tp.last_report(visual)
    assert tokens.shape == (2, 8, 64)
    for b in range(2):
        dom = topk_sorted(cls_row_by_hand(visual.transformer.resblocks[-1], inputs[-1][b : b + 1])[0].sum(0)[1:], 4)
        assert rep.kept_indices[b][0].tolist() == dom
        torch.testing.assert_close(tokens[b, 0], final[b, 0])
        torch.testing.assert_close(tokens[b, 1:5], tokens0[b, dom])
    tp.apply(visual, tp.DivPrune(keep=6), replace=True)
    _, tokens = visual(px)
    for b in range(2):
        want = divprune_loop(tokens0[b], 6)
        assert tp.last_report(visual).kept_indices[b][0].tolist() == want
        torch.testing.assert_close(tokens[b], tokens0[b, want])


def test_full_budget_and_remove_are_identical():
    visual = oc_tower(output_tokens=True)
    px = images(2)
    ref = visual(px)
    tp.apply(visual, tp.FasterVLM(keep=16))
    assert all(torch.equal(a, b) for a, b in zip(visual(px), ref, strict=False))
    tp.apply(visual, tp.FasterVLM(keep=3), replace=True)
    assert visual(px)[1].shape[1] == 3
    tp.remove(visual)
    assert all(torch.equal(a, b) for a, b in zip(visual(px), ref, strict=False))


def test_bad_models_and_pruners_raise():
    with pytest.raises(ValueError, match="model: .*output_tokens=True"):
        tp.apply(oc_tower(), tp.FasterVLM(keep=4))
    with pytest.raises(ValueError, match="pruner='fastv'"):
        tp.apply(oc_tower(output_tokens=True), tp.FastV(keep=4))
    with pytest.raises(ValueError, match="layer=5"):
        tp.apply(oc_tower(output_tokens=True), tp.FasterVLM(keep=4, layer=5))
    custom = oc_tower(output_tokens=True, qk_norm=True)
    with pytest.raises(ValueError, match="block=CustomResidualAttentionBlock"):
        open_clip_cls_attention(custom.transformer.resblocks[0], torch.zeros(1, 17, 64, dtype=torch.float64))
