"""LLaVA-NeXT (anyres) + FasterVLM / VTC-CLS: kept packed positions vs eager [CLS] attention mapped by feature
matching through HF's packing, KV-cache generation vs a layer-by-layer reference, batch rows = single runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_next import SIZES, _gen  # noqa: E402
from tp_oracles import llm_reference_logits, topk_sorted  # noqa: E402
from tp_tiny import as_eager, batch, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

METHODS = {"fastervlm": lambda: tp.FasterVLM(keep=0.25), "vtc-cls": lambda: tp.VTCCLS(keep=7, start_layer=0)}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava("sdpa", next_=True)
    eager = as_eager(model)
    px = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = eager.model.get_image_features(pixel_values=px, image_sizes=SIZES, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
        packed = list(getattr(feats, "pooler_output", feats))
        vt = eager.model.vision_tower(px.flatten(0, 1), output_attentions=True, output_hidden_states=True)
        crops = eager.model.multi_modal_projector(vt.hidden_states[-2][:, 1:]).view(2, 3, 16, -1)
    ids, mask = batch([prompt(3, packed[0].shape[0], 4, 1), prompt(5, packed[1].shape[0], 2, 2)])
    return model, eager, px, ids, mask, packed, crops, vt.attentions


def _expected(name, eager, packed, crops, att, i):
    """Kept packed indices of image i: newlines + top-K packed patches, each scored by its own crop's [CLS]."""
    if name == "fastervlm":
        scores = att[-2][:, :, 0, 1:].mean(1)
    else:
        scores = sum(att[layer][:, :, 0, 1:].mean(1) for layer in range(len(att) - 1))
    scores = scores.view(2, 3, 16)[i]
    newline = eager.model.image_newline
    per_pos, newlines = [], []
    for p, f in enumerate(packed[i]):
        if torch.equal(f, newline.to(f.dtype)):
            newlines.append(p)
            continue
        hits = [(c, q) for c in range(3) for q in range(16) if torch.equal(crops[i, c, q], f)]
        assert len(hits) == 1
        per_pos.append((p, float(scores[hits[0]])))
    k = round(0.25 * len(per_pos)) if name == "fastervlm" else min(7, len(per_pos))
    top = topk_sorted(torch.tensor([sc for _, sc in per_pos]), k)
    return sorted(newlines + [per_pos[t][0] for t in top])


@pytest.mark.parametrize("name", list(METHODS))
def test_next_vision_kept_and_generate_match_reference(setup, name):
    model, eager, px, ids, mask, packed, crops, att = setup
    steps = 3
    out, rep = _gen(model, METHODS[name](), ids, mask, px, SIZES, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, ids.shape[1] :]
    emb = eager.model.language_model.embed_tokens
    for i in range(2):
        kept = _expected(name, eager, packed, crops, att, i)
        assert rep.kept_indices[i][0].tolist() == kept
        assert rep.visual_tokens_kept[i] == len(kept) < packed[i].shape[0]
        row = ids[i][mask[i].bool()]
        s = int((row == 3).nonzero()[0])
        with torch.no_grad():
            text = emb(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], packed[i][kept], text[s + packed[i].shape[0] :]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_next_vision_batch_rows_equal_single_runs(setup, name):
    model, _, px, ids, mask, *_ = setup
    out, rep = _gen(model, METHODS[name](), ids, mask, px, SIZES)
    for i in range(2):
        row = ids[i][mask[i].bool()][None]
        one, rep1 = _gen(model, METHODS[name](), row, torch.ones_like(row), px[i : i + 1], SIZES[i : i + 1])
        assert rep1.kept_indices[0][0].tolist() == rep.kept_indices[i][0].tolist()
        for a, b in zip(out.logits, one.logits, strict=False):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)
