"""LLaVA-NeXT (anyres) + VisionZip: per-crop dominant indices vs eager [CLS] attention, per-crop contextual merge
vs the plain-loop oracle, the official NeXT layout rebuilt by loops over the crop grid, KV-cache generation vs a
layer-by-layer reference of the unpruned LLM on that sequence, batch rows (images of different sizes) = single runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_next import SIZES, _gen, assert_rows_equal_single_runs  # noqa: E402
from tp_oracles import llm_reference_logits, topk_sorted, visionzip_tokens  # noqa: E402
from tp_tiny import as_eager, batch, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

DOM, CTX, SIDE = 4, 2, 4  # 16 patches per crop (56 px, patch 14)
GRID = {(56, 112): (1, 2), (112, 56): (2, 1)}  # crop grid (rows, cols) for the tiny pinpoints


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava("sdpa", next_=True)
    eager = as_eager(model)
    px = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = eager.model.get_image_features(pixel_values=px, image_sizes=SIZES, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
    n_packed = [f.shape[0] for f in getattr(feats, "pooler_output", feats)]
    ids, mask = batch([prompt(3, n_packed[0], 4, 1), prompt(5, n_packed[1], 2, 2)])
    return model, eager, px, ids, mask, n_packed


def _oracle_sequence(eager, px_image, size):
    """Projected VisionZip tokens of one image in the official NeXT order, built with loops."""
    with torch.no_grad():
        tokens, dominants = visionzip_tokens(eager, px_image, DOM, CTX)
        proj = [eager.model.multi_modal_projector(t) for t in tokens]
    rows, cols = GRID[tuple(size)]
    seq = list(proj[0])
    for r in range(rows * SIDE):
        for c in range(cols * SIDE):
            crop = 1 + (r // SIDE) * cols + c // SIDE
            p = (r % SIDE) * SIDE + c % SIDE
            if p in dominants[crop]:
                seq.append(proj[crop][1 + dominants[crop].index(p)])
    seq += [proj[c][0] for c in range(1, len(proj))]
    for c in range(1, len(proj)):
        seq += list(proj[c][DOM:])
    return torch.stack(seq), dominants


def test_next_visionzip_dominant_indices_match_eager_cls_attention(setup):
    model, eager, px, ids, mask, _ = setup
    _, rep = _gen(model, tp.VisionZip(dominant=DOM, contextual=CTX), ids, mask, px, SIZES, steps=1)
    with torch.no_grad():
        att = eager.model.vision_tower(px.flatten(0, 1), output_attentions=True).attentions[-2]
    for i in range(2):
        for c in range(3):
            expected = topk_sorted(att[3 * i + c, :, 0, 1:].sum(0), DOM - 1)
            assert rep.kept_indices[i][0][c].tolist() == expected
        assert rep.visual_tokens_kept[i] == 3 * (DOM + CTX)


def test_next_visionzip_generate_matches_layerwise_reference(setup):
    model, eager, px, ids, mask, n_packed = setup
    steps = 3
    out, rep = _gen(model, tp.VisionZip(dominant=DOM, contextual=CTX), ids, mask, px, SIZES, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, ids.shape[1] :]
    emb = eager.model.language_model.embed_tokens
    for i in range(2):
        visual, dominants = _oracle_sequence(eager, px[i], SIZES[i].tolist())
        assert [d for d in rep.kept_indices[i][0].tolist()] == dominants
        row = ids[i][mask[i].bool()]
        s = int((row == 3).nonzero()[0])
        with torch.no_grad():
            text = emb(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], visual, text[s + n_packed[i] :]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


def test_next_visionzip_batch_rows_equal_single_runs_and_full_budget(setup):
    model, _, px, ids, mask, _ = setup
    make = lambda: tp.VisionZip(dominant=DOM, contextual=CTX)  # noqa: E731
    rep = assert_rows_equal_single_runs(model, make, ids, mask, px)
    assert rep.visual_tokens_kept == [3 * (DOM + CTX)] * 2
    base, _ = _gen(model, None, ids, mask, px, SIZES)
    full, _ = _gen(model, tp.VisionZip(dominant=16, contextual=1), ids, mask, px, SIZES)
    for a, b in zip(full.logits, base.logits, strict=False):
        torch.testing.assert_close(a, b)

