"""Qwen2-VL / Qwen2.5-VL video inputs (``pixel_values_videos``, ``video_grid_thw``): per-frame pruning and
``temporal-merge`` kept indices vs a float64 loop transcription of the rule, KV-cache generation vs a layer-by-layer
recompute of the pruned sequence with the model's own 3-D position ids, batch rows (different grids, left padding)
= single runs, the per-frame report and bad arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from test_qwen2vl import _gen  # noqa: E402
from tp_oracles import divprune_loop, mrope_reference_logits  # noqa: E402
from tp_tiny import QWEN_IMAGE, QWEN_VEND, QWEN_VSTART, as_eager, batch, qwen_pixels, tiny_qwen2vl  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

VIDEO = 5  # tiny_qwen2vl's video_token_id
GRIDS = [(4, 4, 4), (3, 4, 6)]  # video_grid_thw: 4 frames x 4 tokens, 3 frames x 6 tokens
PER_FRAME = [4, 6]
ROWS = [(3, 2, 1), (5, 3, 2)]  # prefix, suffix, seed
THR, SEG = 0.95, 0.95
METHODS = {
    "divprune": lambda: tp.DivPrune(keep=2),
    "merge": lambda: tp.TemporalMerge(threshold=THR, segment_threshold=SEG),
    "merge+divprune": lambda: tp.TemporalMerge(threshold=THR, segment_threshold=SEG, frames=tp.DivPrune(keep=2)),
}


def video_pixels(grid, seed):
    """Patches of one video whose grid steps 0 and 1 are near copies (static) and step 2 shares half its patches
    with step 3 when there is one: merges and segment cuts both happen."""
    t, h, w = grid
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(t, h * w, 96, generator=g)
    px[1] = px[0] + 0.01 * torch.randn(h * w, 96, generator=g)
    if t > 3:
        px[3, : h * w // 2] = px[2, : h * w // 2]
    return px.flatten(0, 1)


def prompt(i):
    p, s, seed = ROWS[i]
    g = torch.Generator().manual_seed(seed)
    t, h, w = GRIDS[i]
    rand = lambda n: torch.randint(10, 90, (n,), generator=g).tolist()  # noqa: E731
    return rand(p) + [QWEN_VSTART] + [VIDEO] * (t * h * w // 4) + [QWEN_VEND] + rand(s)


def _kwargs(model, idx):
    ids, mask = batch([prompt(i) for i in idx])
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat([video_pixels(GRIDS[i], i)
                                                                                 for i in idx]),
              video_grid_thw=torch.tensor([GRIDS[i] for i in idx]))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == VIDEO).int() * 2
    return kw


def temporal_merge_loop(x, thr, seg_thr, keep=None):
    """The rule of visattn.tokenprune.temporal as plain float64 loops: x (F, P, D) -> per frame kept positions,
    and the embedding of every kept (frame, position)."""
    x = x.double()
    n_f, n_p, _ = x.shape

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    means = [x[f].mean(0) for f in range(n_f)]
    seg = [0]
    for f in range(1, n_f):
        seg.append(seg[-1] + (1 if cos(means[f], means[f - 1]) < seg_thr else 0))
    owner, members = {}, {}
    for p in range(n_p):
        for f in range(n_f):
            joins = f > 0 and seg[f] == seg[f - 1] and cos(x[f, p], x[f - 1, p]) > thr
            owner[f, p] = owner[f - 1, p] if joins else (f, p)
            members.setdefault(owner[f, p], []).append(x[f, p])
    emb = {k: sum(v) / len(v) for k, v in members.items()}
    kept = []
    for f in range(n_f):
        rest = [p for p in range(n_p) if (f, p) in emb]
        if keep is not None and rest:
            sel = divprune_loop(torch.stack([emb[f, p] for p in rest]), min(keep, len(rest)))
            rest = [rest[j] for j in sel]
        kept.append(rest)
    return kept, emb, len(set(seg))


def oracle(name, feats):
    """Per frame kept positions and the (frame, position) -> embedding map of one video's features (F, P, D)."""
    if name == "divprune":
        kept = [divprune_loop(feats[f], 2) for f in range(feats.shape[0])]
        return kept, {(f, p): feats[f, p].double() for f in range(feats.shape[0]) for p in range(feats.shape[1])}
    kept, emb, _ = temporal_merge_loop(feats, THR, SEG, 2 if name == "merge+divprune" else None)
    return kept, emb


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def setup(request):
    model = tiny_qwen2vl("sdpa", v25=request.param == "qwen2.5-vl")
    eager = as_eager(model)
    feats = []
    for i, (t, h, w) in enumerate(GRIDS):
        with torch.no_grad():
            f = eager.model.get_video_features(video_pixels(GRIDS[i], i), torch.tensor([GRIDS[i]]))
        feats.append(list(getattr(f, "pooler_output", f))[0].view(t, h * w // 4, -1))
    return model, eager, feats


def test_fixture_is_not_vacuous(setup):
    _, _, feats = setup
    kept, _, n_seg = temporal_merge_loop(feats[0], THR, SEG)
    assert n_seg >= 2 and sum(map(len, kept)) < feats[0].shape[0] * feats[0].shape[1]  # cuts and merges happen
    assert len(kept[1]) < PER_FRAME[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_kept_indices_and_frame_report_match_loop(setup, name):
    model, _, feats = setup
    kw = _kwargs(model, [0, 1])
    _, rep = _gen(model, METHODS[name](), kw, steps=1)  # generate: frames found from the M-RoPE ids
    tp.apply(model, METHODS[name]())
    try:
        with torch.no_grad():
            model(**kw)  # a plain forward: frames from video_grid_thw
        assert [[k.tolist() for k in r] for r in tp.last_report(model).kept_indices] == [
            [k.tolist() for k in r] for r in rep.kept_indices]
    finally:
        tp.remove(model)
    for i in range(2):
        kept, _ = oracle(name, feats[i])
        assert [k.tolist() for k in rep.kept_indices[i]] == kept
        assert rep.extra["frame_kept"][i] == [[len(k) for k in kept]]
        assert rep.visual_tokens[i] == GRIDS[i][0] * PER_FRAME[i]
        assert rep.visual_tokens_kept[i] == sum(map(len, kept))


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_with_cache_matches_pruned_recompute(setup, name):
    model, eager, feats = setup
    steps = 3
    kw = _kwargs(model, [0, 1])
    out, _ = _gen(model, METHODS[name](), kw, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, kw["input_ids"].shape[1]:]
    emb = eager.model.language_model.embed_tokens
    for i in range(2):
        row = prompt(i)
        seen = []
        h = eager.model.language_model.register_forward_pre_hook(
            lambda m, a, k, seen=seen: seen.append(k["position_ids"]), with_kwargs=True)
        try:
            with torch.no_grad():
                eager(**_kwargs(eager, [i]))
        finally:
            h.remove()
        pos = seen[0][-3:, 0]  # the stock model's M-RoPE ids of the unpruned prompt
        pos = torch.cat([pos, (int(pos.max()) + 1 + torch.arange(steps - 1))[None].expand(3, -1)], 1)
        kept, table = oracle(name, feats[i])
        s, n_p = row.index(VIDEO), PER_FRAME[i]
        with torch.no_grad():
            seq = emb(torch.cat([torch.tensor(row), gen[i][:-1]]))
        keep = [j for j in range(seq.shape[0]) if not s <= j < s + len(kept) * n_p]
        for f, ps in enumerate(kept):
            for p in ps:
                seq[s + f * n_p + p] = table[f, p].float()
                keep.append(s + f * n_p + p)
        keep.sort()
        with torch.no_grad():
            ref = mrope_reference_logits(eager, seq[keep][None], pos[:, keep], [], reindex=False)
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["merge+divprune", "fastv"])
def test_batch_rows_equal_single_runs(setup, name):
    model, _, _ = setup
    make = METHODS.get(name, lambda: tp.FastV(layer=2, keep=2))
    out, rep = _gen(model, make(), _kwargs(model, [0, 1]))
    assert [len(v[0]) for v in rep.extra["frame_kept"]] == [g[0] for g in GRIDS]
    if name == "fastv":
        assert rep.extra["frame_kept"] == [[[2] * g[0]] for g in GRIDS]
    for i in range(2):
        one, rep1 = _gen(model, make(), _kwargs(model, [i]))
        assert [k.tolist() for k in rep1.kept_indices[0]] == [k.tolist() for k in rep.kept_indices[i]]
        for a, b in zip(out.logits, one.logits, strict=True):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["divprune", "merge+divprune"])
def test_image_and_video_in_one_prompt(setup, name):
    """An image (6 tokens) before video 0: DivPrune prunes the image as one more "image", temporal-merge passes it
    unchanged; frame_kept lists the video's frames only."""
    model, eager, feats = setup
    row = [11, QWEN_VSTART] + [QWEN_IMAGE] * 6 + [QWEN_VEND] + prompt(0)
    ids, mask = batch([row])
    img_px = qwen_pixels([(1, 4, 6)], seed=9)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=img_px, image_grid_thw=torch.tensor([(1, 4, 6)]),
              pixel_values_videos=video_pixels(GRIDS[0], 0), video_grid_thw=torch.tensor([GRIDS[0]]))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int() + 2 * (ids == VIDEO).int()
    _, rep = _gen(model, METHODS[name](), kw, steps=1)
    with torch.no_grad():
        img = list(getattr(f := eager.model.get_image_features(img_px, torch.tensor([(1, 4, 6)])), "pooler_output",
                           f))[0]
    kept, _ = oracle(name, feats[0])
    expected_image = divprune_loop(img, 2) if name == "divprune" else list(range(6))
    assert [k.tolist() for k in rep.kept_indices[0]] == [expected_image] + kept
    assert rep.extra["frame_kept"] == [[[len(k) for k in kept]]]


def test_bad_arguments(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="threshold=1.5"):
        tp.TemporalMerge(threshold=1.5)
    with pytest.raises(ValueError, match="segment_threshold"):
        tp.TemporalMerge(segment_threshold="high")
    with pytest.raises(ValueError, match="frames="):
        tp.TemporalMerge(frames=tp.FastV(layer=1, keep=2))
    for bad in (0, -3, 1.5, True, "4"):
        with pytest.raises(ValueError, match="keep="):
            tp.create("temporal-merge", keep=bad)
        with pytest.raises(ValueError, match="keep="):
            tp.DivPrune(keep=bad)
    assert isinstance(tp.create("temporal-merge", keep=2, threshold=0.8).frames, tp.DivPrune)
    kw = _kwargs(model, [0])
    kw["video_grid_thw"] = torch.tensor([(4, 4, 6)])
    tp.apply(model, tp.DivPrune(keep=2))
    try:
        with pytest.raises(ValueError, match="video_grid_thw"), torch.no_grad():
            model(**kw)
    finally:
        tp.remove(model)


def test_temporal_merge_refused_on_llava():
    from tp_tiny import tiny_llava

    with pytest.raises(NotImplementedError, match="Qwen2-VL"):
        tp.apply(tiny_llava(layers=2), tp.TemporalMerge())
