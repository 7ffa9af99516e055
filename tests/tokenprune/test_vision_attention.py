"""``tokenprune.patch_vision_attention``: Qwen2-VL / Qwen2.5-VL vision attention as one attention call per distinct
chunk length. The oracle is the stock transformers model itself: the patched tower's output equals the unpatched
copy's (float32, ~1e-6) on equal windows, partial windows (unequal lengths, in and out of order), several images and
videos of different sizes in one batch and the full-attention blocks; per block, the patched calls are exactly the
stock calls' distinct lengths, each batched over the stock chunks of that length (counted by a wrapper around
``scaled_dot_product_attention``); host readbacks drop from one per block to one per ``cu_seqlens`` tensor;
gradients, eager attention, fp16 / bf16, generate() and token pruning (per-frame DivPrune, temporal-merge) match the
stock model; undo restores it; bad models are refused naming the argument."""

from __future__ import annotations

import copy
import inspect
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tp_tiny import (  # noqa: E402
    QWEN_IMAGE,
    batch,
    pruned_forward,
    qwen_pixels,
    qwen_prompt,
    tiny_llava,
    tiny_qwen2vl,
)

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune.hf_qwen_vision_attn import group_chunks, is_vision_attention_patched  # noqa: E402

DEPTH = 4  # Qwen2.5-VL: block 1 full attention, blocks 0, 2, 3 windows of 2x2 merged tokens (4x4 patches)
GRIDS = {
    "equal-windows": [(1, 8, 8)],  # 4 windows of 16 patches
    "video": [(2, 8, 8)],  # 2 frames of 64 patches, 8 windows
    "partial-windows": [(1, 6, 10)],  # windows 16, 16, 8 | 8, 8, 4: one run per length
    "partial-interleaved": [(1, 10, 6)],  # windows 16, 8 | 16, 8 | 8, 4: lengths interleave (gathered)
    "mixed-batch": [(1, 8, 8), (1, 6, 10), (2, 4, 4), (1, 10, 6)],  # images and a video of different sizes
}
FAMILIES = ["qwen2-vl", "qwen2.5-vl"]


def _model(family: str, attn: str = "sdpa", depth: int = DEPTH):
    return tiny_qwen2vl(attn, v25=family == "qwen2.5-vl", depth=depth)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    """(stock model, patched copy, family)."""
    stock = _model(request.param)
    patched = copy.deepcopy(stock)
    tp.patch_vision_attention(patched)
    return stock, patched, request.param


class _Calls:
    """Records (block index, query shape) of every scaled_dot_product_attention call (pre-hooks on the blocks)."""

    def __init__(self, model, monkeypatch):
        self.calls, self.block = [], None
        real = F.scaled_dot_product_attention

        def sdpa(query, *args, **kwargs):
            self.calls.append((self.block, tuple(query.shape)))
            return real(query, *args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        for i, blk in enumerate(model.model.visual.blocks):
            blk.register_forward_pre_hook(lambda *_, i=i: setattr(self, "block", i))

    def per_block(self) -> dict[int, list[tuple[int, ...]]]:
        out: dict[int, list] = {}
        for blk, shape in self.calls:
            out.setdefault(blk, []).append(shape)
        return out


def _tower(model, grids, dtype=torch.float32, grad=False):
    px = qwen_pixels(grids, seed=5).to(dtype)
    with torch.set_grad_enabled(grad):
        out = model.model.visual(px, grid_thw=torch.tensor(grids))
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("case", list(GRIDS))
def test_tower_output_and_calls_match_stock(pair, case, monkeypatch):
    stock, patched, family = pair
    grids = GRIDS[case]
    s_model, p_model = copy.deepcopy(stock), copy.deepcopy(patched)  # the recorders' hooks stay on the copies
    rec_s = _Calls(s_model, monkeypatch)
    ref = _tower(s_model, grids)
    stock_blocks = rec_s.per_block()
    rec_p = _Calls(p_model, monkeypatch)
    out = _tower(p_model, grids)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    frames = [h * w for t, h, w in grids for _ in range(t)]
    full = range(DEPTH) if family == "qwen2-vl" else [1]
    for blk in full:  # (d) the full-attention blocks attend frame by frame
        assert [s[2] for s in stock_blocks[blk]] == frames
    # every stock call is one chunk; the patched block makes one call per distinct length, batched over its chunks
    for blk, shapes in stock_blocks.items():
        assert all(s[0] == 1 for s in shapes)
        want = Counter(s[2] for s in shapes)
        got = rec_p.per_block()[blk]
        assert len(got) == len(want)
        assert {s[2]: s[0] for s in got} == dict(want)
        assert all(s[1:2] + s[3:] == shapes[0][1:2] + shapes[0][3:] for s in got)  # heads, head_dim
    if case in ("partial-windows", "partial-interleaved") and family == "qwen2.5-vl":  # (b) unequal windows
        assert len({s[2] for s in stock_blocks[0]}) == 3
    if case == "equal-windows" and family == "qwen2.5-vl":  # (a) 4 windows in one call per windowed block
        assert [len(stock_blocks[b]) for b in range(DEPTH)] == [4, 1, 4, 4]
        assert [len(rec_p.per_block()[b]) for b in range(DEPTH)] == [1, 1, 1, 1]


def _readbacks(model, grids, monkeypatch) -> Counter:
    """Tensor.tolist() calls of one tower forward of a copy of ``model``, keyed by the block running (None: outside
    the blocks)."""
    model = copy.deepcopy(model)
    counts, where = Counter(), {"block": None}
    real = torch.Tensor.tolist

    def tolist(self):
        counts[where["block"]] += 1
        return real(self)

    for i, blk in enumerate(model.model.visual.blocks):
        blk.register_forward_pre_hook(lambda *_, i=i: where.update(block=i))
        blk.register_forward_hook(lambda *_: where.update(block=None))
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    _tower(model, grids)
    _tower(model, grids)  # a second forward reads back again (the grouping is kept for one tower forward)
    monkeypatch.undo()
    return counts


def test_host_readbacks_once_per_cu_seqlens_tensor(pair, monkeypatch):
    """The stock blocks each read the chunk lengths back; the patched ones once per cu_seqlens tensor and tower
    forward (Qwen2-VL: one; Qwen2.5-VL: the windows' in block 0 and the frames' in block 1); the tower's own
    readbacks outside the blocks are unchanged."""
    stock, patched, family = pair
    ref = _readbacks(stock, GRIDS["mixed-batch"], monkeypatch)
    got = _readbacks(patched, GRIDS["mixed-batch"], monkeypatch)
    assert all(ref[b] >= 2 for b in range(DEPTH))
    assert got[None] == ref[None]
    assert {b: n for b, n in got.items() if b is not None} == ({0: 2} if family == "qwen2-vl" else {0: 2, 1: 2})


def test_gradients_match_stock(pair):
    stock, patched, _ = pair
    s_model, p_model = copy.deepcopy(stock).train(), copy.deepcopy(patched).train()
    grids = GRIDS["mixed-batch"]
    px = qwen_pixels(grids, seed=6)
    weights = None
    grads = []
    for model in (s_model, p_model):
        x = px.clone().requires_grad_(True)
        out = model.model.visual(x, grid_thw=torch.tensor(grids)).pooler_output
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) if weights is None else weights
        (out * weights).sum().backward()
        grads.append([x.grad] + [p.grad for p in model.model.visual.parameters()])
    assert all(g is not None for g in grads[1])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_matches_stock(family):
    stock = _model(family, "eager")
    patched = copy.deepcopy(stock)
    assert tp.patch_vision_attention(patched).attn_implementation == "eager"
    for a, b in zip(_tower(patched, GRIDS["mixed-batch"]), _tower(stock, GRIDS["mixed-batch"]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_stock(pair, dtype):
    stock, patched, _ = pair
    s_model, p_model = copy.deepcopy(stock).to(dtype), copy.deepcopy(patched).to(dtype)
    for a, b in zip(_tower(p_model, GRIDS["mixed-batch"], dtype), _tower(s_model, GRIDS["mixed-batch"], dtype),
                    strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b)


def _image_kwargs(model):
    grids = [(1, 8, 8), (1, 6, 10)]  # equal and partial windows
    prompts = [qwen_prompt(3, 16, 4, 1), qwen_prompt(5, 15, 2, 2)]
    ids, mask = batch(prompts)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=qwen_pixels(grids, seed=3),
              image_grid_thw=torch.tensor(grids))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    return kw


def _generate(model, kw):
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_generate_matches_stock(pair):
    stock, patched, _ = pair
    kw = _image_kwargs(stock)
    tokens, logits = _generate(patched, kw)
    ref_tokens, ref_logits = _generate(stock, kw)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["divprune", "merge"])
def test_composes_with_video_pruning(pair, method):
    """tp.apply on the patched model keeps the same tokens per frame and gives the same logits as on the stock
    model (the grids of test_qwen_video: 4x4 and 4x6 patches, one window and a 16 + 8 split)."""
    from test_qwen_video import METHODS, _kwargs

    stock, patched, _ = pair
    results = []
    for model in (stock, patched):
        logits, report = pruned_forward(model, METHODS[method](), **_kwargs(model, [0, 1]))
        results.append((logits, [[k.tolist() for k in row] for row in report.kept_indices],
                        report.extra["frame_kept"]))
    (logits, kept, frames), (ref_logits, ref_kept, ref_frames) = results[1], results[0]
    assert kept == ref_kept and frames == ref_frames
    assert sum(map(len, kept[0])) < 16  # pruning happened
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_stock(family, monkeypatch):
    model = _model(family)
    tower = model.model.visual
    hooks = (len(tower._forward_pre_hooks), len(tower._forward_hooks))
    ref = _tower(model, GRIDS["partial-interleaved"])
    first = tp.patch_vision_attention(model)
    again = tp.patch_vision_attention(model)  # idempotent
    assert first == again and first.patched == DEPTH and first.towers == 1
    assert all(is_vision_attention_patched(b.attn) for b in tower.blocks)
    assert tp.unpatch_vision_attention(model) is model
    assert not any(is_vision_attention_patched(b.attn) for b in tower.blocks)
    assert all("forward" not in b.attn.__dict__ for b in tower.blocks)
    assert (len(tower._forward_pre_hooks), len(tower._forward_hooks)) == hooks
    rec = _Calls(model, monkeypatch)
    out = _tower(model, GRIDS["partial-interleaved"])
    assert all(s[0] == 1 for _, s in rec.calls)  # the stock loop again: one call per chunk
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)
    alone = tp.patch_vision_attention(tower)  # the tower alone (its own config's model_type)
    assert (alone.model_type, alone.patched) == (first.model_type, DEPTH)
    tp.unpatch_vision_attention(tower)
    assert not any(is_vision_attention_patched(b.attn) for b in tower.blocks)


def test_refusals_name_the_argument():
    with pytest.raises(TypeError, match="model"):
        tp.patch_vision_attention("qwen")
    with pytest.raises(TypeError, match="model"):
        tp.unpatch_vision_attention(None)
    llava = tiny_llava()
    with pytest.raises(ValueError, match="model: .*model_type='llava'"):
        tp.patch_vision_attention(llava)
    model = _model("qwen2.5-vl", depth=2)
    model.model.visual.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="model: .*attn_implementation='flash_attention_2'"):
        tp.patch_vision_attention(model)
    assert not any(is_vision_attention_patched(b.attn) for b in model.model.visual.blocks)  # nothing changed


def test_patched_module_runs_stock_forward_for_other_implementations(monkeypatch):
    """After set_attn_implementation away from sdpa / eager (e.g. flash), the patched module defers to the stock
    forward (checked with a stand-in implementation registered under a new name: one call per chunk)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("visattn_test_sdpa", sdpa_attention_forward)
    model = _model("qwen2.5-vl", depth=2)
    tp.patch_vision_attention(model)
    ref = _tower(model, GRIDS["equal-windows"])
    model.model.visual.config._attn_implementation = "visattn_test_sdpa"
    rec = _Calls(model, monkeypatch)
    out = _tower(model, GRIDS["equal-windows"])
    assert [s[0] for _, s in rec.calls] == [1] * 5  # 4 windows + 1 frame, one call each
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_group_chunks_against_a_loop():
    cu = torch.tensor([0, 4, 4, 6, 10, 12, 16], dtype=torch.int32)  # lengths 4, 0, 2, 4, 2, 4
    groups = group_chunks(cu, 16)
    assert groups.runs == ((4, 3, 0), (2, 2, 12))
    rows = [list(range(a, b)) for a, b in zip(cu.tolist(), cu.tolist()[1:], strict=False)]
    expect = [r for n in (4, 2) for r in rows if len(r) == n]
    assert groups.order.tolist() == [i for r in expect for i in r]
    assert groups.order[groups.inverse].tolist() == list(range(16))
    same = group_chunks(torch.tensor([0, 4, 8, 10]), 10)
    assert same.order is None and same.runs == ((4, 2, 0), (2, 1, 8))
    for bad in (torch.tensor([0, 4, 3, 10]), torch.tensor([0, 4, 9]), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match="cu_seqlens"):
            group_chunks(bad, 10 if bad.dim() == 1 else 4)
