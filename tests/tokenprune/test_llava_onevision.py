"""LLaVA-OneVision adapter (tiny random SigLIP + Qwen2 model, processor-free inputs): anyres images and videos
(``pixel_values_videos``: frames pooled 2x2 to 9 tokens, one newline token per video).

Oracles: the stock model's own features (``get_image_features`` / ``get_video_features``) and eager attentions,
with DivPrune / FastV / temporal-merge written as float64 loops; ``generate`` with KV cache vs a layer-by-layer
recompute of the pruned sequence; batch rows (left padding) = single runs; keep-all = the stock model; refusals and
bad inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_qwen2vl import _gen  # noqa: E402
from test_qwen_video import temporal_merge_loop  # noqa: E402
from tp_oracles import divprune_loop, llm_reference_logits, topk_sorted  # noqa: E402
from tp_tiny import OV_IMAGE, OV_VIDEO, as_eager, batch, prompt, tiny_onevision  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

F, P = 4, 9  # frames per video, tokens per frame (6x6 patches pooled to 3x3)
THR, SEG = 0.95, 0.97  # frame 1 ~ frame 0 (merged), a cut before frame 2, frame 3 shares its top half with frame 2
VROWS = [(3, 2, 1), (5, 1, 2)]  # prefix, suffix, seed of the video prompts
SIZES = torch.tensor([[24, 48], [48, 24]])  # anyres images: 114 and 120 tokens
IROWS = [(3, 4, 1), (5, 2, 2)]
VIDEO_METHODS = {
    "divprune": lambda: tp.DivPrune(keep=3),
    "fastv": lambda: tp.FastV(layer=2, keep=3),
    "merge": lambda: tp.TemporalMerge(threshold=THR, segment_threshold=SEG),
    "merge+divprune": lambda: tp.TemporalMerge(threshold=THR, segment_threshold=SEG, frames=tp.DivPrune(keep=2)),
}


def video_pixels(seed: int) -> torch.Tensor:
    """One video (F, 3, 24, 24): frame 1 a near copy of frame 0, frame 3 the top half of frame 2."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(F, 3, 24, 24, generator=g)
    px[1] = px[0] + 0.01 * torch.randn(3, 24, 24, generator=g)
    px[3, :, :12] = px[2, :, :12]
    return px


def video_prompt(i: int) -> list[int]:
    p, s, seed = VROWS[i]
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(10, 90, (n,), generator=g).tolist()  # noqa: E731
    return rand(p) + [OV_VIDEO] * (F * P + 1) + rand(s)


def video_kwargs(idx: list[int]) -> dict:
    ids, mask = batch([video_prompt(i) for i in idx])
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.stack([video_pixels(i) for i in idx]))


def image_kwargs(idx: list[int], n_tokens: list[int]) -> dict:
    px = torch.randn(2, 3, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    ids, mask = batch([prompt(IROWS[i][0], n_tokens[i], IROWS[i][1], IROWS[i][2]) for i in idx])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px[idx], image_sizes=SIZES[idx])


@pytest.fixture(scope="module")
def setup():
    """(model, eager twin, per video its stock features (F, P, D), per image its stock packed features)."""
    model = tiny_onevision("sdpa")
    eager = as_eager(model)
    with torch.no_grad():
        out = eager.model.get_video_features(torch.stack([video_pixels(0), video_pixels(1)]))
        vfeats = [v[: F * P].view(F, P, -1) for v in getattr(out, "pooler_output", out)]
        px = torch.randn(2, 3, 3, 24, 24, generator=torch.Generator().manual_seed(3))
        out = eager.model.get_image_features(pixel_values=px, image_sizes=SIZES)
        ifeats = list(getattr(out, "pooler_output", out))
    return model, eager, vfeats, ifeats


def _attention_rows(eager, kw: dict, layer: int) -> torch.Tensor:
    """Heads-averaged attention of the last prompt token at ``layer`` (one unpadded row), by the eager model."""
    with torch.no_grad():
        att = eager(**kw, output_attentions=True).attentions
    return att[layer][0, :, -1].mean(0)


def video_oracle(name: str, eager, feats: torch.Tensor, i: int) -> tuple[list[list[int]], dict]:
    """Per frame kept positions of video ``i`` and the (frame, position) -> embedding map of its kept tokens."""
    if name == "fastv":
        row = video_kwargs([i])
        att = _attention_rows(eager, row, 1)
        s = video_prompt(i).index(OV_VIDEO)
        kept = [topk_sorted(att[s + f * P : s + (f + 1) * P], 3) for f in range(F)]
    elif name == "divprune":
        kept = [divprune_loop(feats[f], 3) for f in range(F)]
    else:
        kept, emb, _ = temporal_merge_loop(feats, THR, SEG, 2 if name == "merge+divprune" else None)
        return kept, emb
    return kept, {(f, p): feats[f, p].double() for f in range(F) for p in range(P)}


def test_fixture_is_not_vacuous(setup):
    _, _, vfeats, ifeats = setup
    for feats in vfeats:
        kept, _, n_seg = temporal_merge_loop(feats, THR, SEG)
        assert n_seg == 2 and len(kept[1]) == 0  # a cut, and frame 1 merged into frame 0 entirely
        assert 0 < len(kept[3]) < P  # frame 3 partly merged into frame 2
    assert [f.shape[0] for f in ifeats] == [114, 120]


@pytest.mark.parametrize("name", list(VIDEO_METHODS))
def test_video_kept_indices_and_frame_report_match_oracle(setup, name):
    model, eager, vfeats, _ = setup
    kw = video_kwargs([0, 1])
    _, rep = _gen(model, VIDEO_METHODS[name](), kw, steps=1)
    tp.apply(model, VIDEO_METHODS[name]())
    try:
        with torch.no_grad():
            model(**kw)  # a plain forward gives the same selection
        assert [[k.tolist() for k in r] for r in tp.last_report(model).kept_indices] == [
            [k.tolist() for k in r] for r in rep.kept_indices]
    finally:
        tp.remove(model)
    for i in range(2):
        kept, _ = video_oracle(name, eager, vfeats[i], i)
        assert [k.tolist() for k in rep.kept_indices[i]] == kept
        assert rep.extra["frame_kept"][i] == [[len(k) for k in kept]]
        assert rep.visual_tokens[i] == F * P  # the closing newline is no frame's token
        assert rep.visual_tokens_kept[i] == sum(map(len, kept))


def _video_sequence(eager, i: int, gen: torch.Tensor, kept: list[list[int]], table: dict):
    """(embeddings of prompt i + generated tokens with the stock visual features, indices kept by ``kept``)."""
    row = video_prompt(i)
    s = row.index(OV_VIDEO)
    with torch.no_grad():
        seq = eager.model.language_model.embed_tokens(torch.cat([torch.tensor(row), gen[:-1]]))
    seq[s + F * P] = eager.model.image_newline  # the video's closing newline token
    for (f, p), emb in table.items():  # every token the LLM may see (FastV: all of them up to its layer)
        seq[s + f * P + p] = emb.float()
    keep = [j for j in range(seq.shape[0]) if not s <= j < s + F * P]
    keep += [s + f * P + p for f, ps in enumerate(kept) for p in ps]
    return seq, sorted(keep)


@pytest.mark.parametrize("name", list(VIDEO_METHODS))
def test_video_generate_with_cache_matches_pruned_recompute(setup, name):
    model, eager, vfeats, _ = setup
    steps = 3
    kw = video_kwargs([0, 1])
    out, _ = _gen(model, VIDEO_METHODS[name](), kw, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, kw["input_ids"].shape[1]:]
    for i in range(2):
        kept, table = video_oracle(name, eager, vfeats[i], i)
        seq, keep = _video_sequence(eager, i, gen[i], kept, table)
        with torch.no_grad():
            if name == "fastv":  # all tokens up to layer 2, the kept ones (original positions) after it
                ref = llm_reference_logits(eager, seq[None], [(2, keep)], reindex=False)
            else:  # before the LLM: the pruned sequence, positions numbered contiguously
                ref = llm_reference_logits(eager, seq[keep][None], [], reindex=True)
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


def _rows_equal_single_runs(model, make, kw_of, frames: bool):
    out, rep = _gen(model, make(), kw_of([0, 1]))
    for i in range(2):
        one, rep1 = _gen(model, make(), kw_of([i]))
        assert [k.tolist() for k in rep1.kept_indices[0]] == [k.tolist() for k in rep.kept_indices[i]]
        if frames:
            assert rep1.extra["frame_kept"][0] == rep.extra["frame_kept"][i]
        for a, b in zip(out.logits, one.logits, strict=True):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)
    return rep


@pytest.mark.parametrize("name", ["merge+divprune", "fastv"])
def test_video_batch_rows_equal_single_runs(setup, name):
    model = setup[0]
    rep = _rows_equal_single_runs(model, VIDEO_METHODS[name], video_kwargs, frames=True)
    assert rep.visual_tokens_kept != rep.visual_tokens


@pytest.mark.parametrize("name", ["divprune", "fastv", "sparsevlm"])
def test_image_batch_rows_equal_single_runs(setup, name):
    model, _, _, ifeats = setup
    n = [f.shape[0] for f in ifeats]
    make = {"divprune": lambda: tp.DivPrune(keep=8), "fastv": lambda: tp.FastV(layer=2, keep=8),
            "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1, 2], counts=[0.5, 0.25, 0.125])}[name]
    rep = _rows_equal_single_runs(model, make, lambda idx: image_kwargs(idx, n), frames=False)
    assert rep.visual_tokens == n and rep.visual_tokens_kept != n
    assert "frame_kept" not in rep.extra


def test_image_kept_indices_match_oracle(setup):
    model, eager, _, ifeats = setup
    n = [f.shape[0] for f in ifeats]
    kw = image_kwargs([0, 1], n)
    _, fastv = _gen(model, tp.FastV(layer=2, keep=8), kw, steps=1)
    _, div = _gen(model, tp.DivPrune(keep=8), kw, steps=1)
    for i in range(2):
        s = prompt(IROWS[i][0], n[i], IROWS[i][1], IROWS[i][2]).index(OV_IMAGE)
        att = _attention_rows(eager, image_kwargs([i], n), 1)
        assert fastv.kept_indices[i][0].tolist() == topk_sorted(att[s : s + n[i]], 8)
        assert div.kept_indices[i][0].tolist() == divprune_loop(ifeats[i], 8)


def test_image_generate_with_cache_matches_pruned_recompute(setup):
    model, eager, _, ifeats = setup
    steps = 3
    n = [f.shape[0] for f in ifeats]
    kw = image_kwargs([0, 1], n)
    out, _ = _gen(model, tp.DivPrune(keep=8), kw, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, kw["input_ids"].shape[1]:]
    for i in range(2):
        row = prompt(IROWS[i][0], n[i], IROWS[i][1], IROWS[i][2])
        s = row.index(OV_IMAGE)
        with torch.no_grad():
            seq = eager.model.language_model.embed_tokens(torch.cat([torch.tensor(row), gen[i][:-1]]))
        seq[s : s + n[i]] = ifeats[i]
        kept = {s + p for p in divprune_loop(ifeats[i], 8)}
        keep = [j for j in range(seq.shape[0]) if not s <= j < s + n[i] or j in kept]
        with torch.no_grad():
            ref = llm_reference_logits(eager, seq[keep][None], [], reindex=True)
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


def test_image_and_video_in_one_prompt(setup):
    """An image before video 0: DivPrune prunes the image as one more "image", temporal-merge passes it unchanged;
    frame_kept lists the video's frames only."""
    model, eager, vfeats, ifeats = setup
    ids, mask = batch([[11] + [OV_IMAGE] * ifeats[0].shape[0] + video_prompt(0)])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=image_kwargs([0], [1])["pixel_values"],
              image_sizes=SIZES[:1], pixel_values_videos=video_pixels(0)[None])
    for name in ("divprune", "merge+divprune"):
        _, rep = _gen(model, VIDEO_METHODS[name](), kw, steps=1)
        kept, _ = video_oracle(name, eager, vfeats[0], 0)
        image = divprune_loop(ifeats[0], 3) if name == "divprune" else list(range(ifeats[0].shape[0]))
        assert [k.tolist() for k in rep.kept_indices[0]] == [image] + kept
        assert rep.extra["frame_kept"] == [[[len(k) for k in kept]]]


@pytest.mark.parametrize("make", [lambda: tp.FastV(layer=2, keep=1.0), lambda: tp.Uniform(keep=1.0),
                                  lambda: tp.TemporalMerge(threshold=1.0, segment_threshold=1.0)],
                         ids=["fastv", "uniform", "temporal-merge"])
def test_keep_all_equals_stock_model(setup, make):
    model, _, _, ifeats = setup
    n = [f.shape[0] for f in ifeats]
    for kw in (video_kwargs([0, 1]), image_kwargs([0, 1], n)):
        base, _ = _gen(model, None, kw)
        out, rep = _gen(model, make(), kw)
        assert rep.visual_tokens_kept == rep.visual_tokens
        for a, b in zip(out.logits, base.logits, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [lambda: tp.FasterVLM(keep=0.5), lambda: tp.VTCCLS(keep=0.5, start_layer=0),
                                  lambda: tp.VisionZip(dominant=4, contextual=2), lambda: tp.VisPruner(keep=0.5),
                                  lambda: tp.Pooling(keep=4), lambda: tp.ToMe(r=2), lambda: tp.DyMU([0.9, 0.9])],
                         ids=["fastervlm", "vtc-cls", "visionzip", "vispruner", "pooling", "tome", "dymu"])
def test_vision_stage_methods_refused(setup, make):
    model = setup[0]
    with pytest.raises(NotImplementedError, match="on LLaVA-OneVision is not supported"):
        tp.apply(model, make())
    assert not hasattr(model, "_visattn_tokenprune")


def test_bad_arguments(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="layer=9"):
        tp.apply(model, tp.FastV(layer=9, keep=3))
    with pytest.raises(ValueError, match="keep="):
        tp.create("temporal-merge", keep=0)
    kw = video_kwargs([0])
    bad = kw["input_ids"].clone()
    bad[0, int((bad[0] == OV_VIDEO).nonzero()[0])] = 50  # a run of F*P video tokens: no closing newline
    tp.apply(model, tp.DivPrune(keep=3))
    try:
        with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
            model(**{**kw, "input_ids": bad})
    finally:
        tp.remove(model)
