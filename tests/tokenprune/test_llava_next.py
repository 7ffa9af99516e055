"""LLaVA-NeXT adapter (anyres, images of different token counts): LLM-side methods and DivPrune."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_oracles import divprune_loop, topk_sorted  # noqa: E402
from tp_tiny import as_eager, batch, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

SIZES = torch.tensor([[56, 112], [112, 56]])


def next_inputs(model):
    """(pixel values, ids, mask, packed features) of a left-padded 2-row batch whose images (``SIZES``) have
    different token counts."""
    px = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px, image_sizes=SIZES, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    ids, mask = batch([prompt(3, feats[0].shape[0], 4, 1), prompt(5, feats[1].shape[0], 2, 2)])
    return px, ids, mask, feats


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava("sdpa", next_=True)
    px, ids, mask, feats = next_inputs(model)
    return model, as_eager(model), px, ids, mask, feats


def _gen(model, pruner, ids, mask, px, sizes, steps=3):
    if pruner is not None:
        tp.apply(model, pruner)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes,
                                 max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out, tp.last_report(model)
    finally:
        if pruner is not None:
            tp.remove(model)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "divprune", "sparsevlm"])
def test_next_batch_rows_equal_single_runs(setup, name):
    model, _, px, ids, mask, _ = setup
    make = {"fastv": lambda: tp.FastV(layer=2, keep=0.25), "divprune": lambda: tp.DivPrune(keep=0.25),
            "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
            "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1, 2], counts=[0.5, 0.25, 0.125])}[name]
    rep = assert_rows_equal_single_runs(model, make, ids, mask, px)
    assert rep.visual_tokens != rep.visual_tokens_kept


def assert_rows_equal_single_runs(model, make, ids, mask, px):
    """Generate the padded batch with ``make()`` and every row alone; kept indices and logits must agree."""
    out, rep = _gen(model, make(), ids, mask, px, SIZES)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        one, rep1 = _gen(model, make(), row, torch.ones_like(row), px[i : i + 1], SIZES[i : i + 1])
        assert rep1.kept_indices[0][0].tolist() == rep.kept_indices[i][0].tolist()
        for a, b in zip(out.logits, one.logits, strict=False):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)
    return rep


def test_next_kept_indices_match_eager_bruteforce(setup):
    model, eager, px, ids, mask, feats = setup
    _, fastv = _gen(model, tp.FastV(layer=2, keep=0.25), ids, mask, px, SIZES, steps=1)
    _, div = _gen(model, tp.DivPrune(keep=0.25), ids, mask, px, SIZES, steps=1)
    for i in range(2):
        row = ids[i][mask[i].bool()][None]
        s = int((row[0] == 3).nonzero()[0])
        n = feats[i].shape[0]
        with torch.no_grad():
            att = eager(input_ids=row, pixel_values=px[i : i + 1], image_sizes=SIZES[i : i + 1],
                        output_attentions=True).attentions
        k = round(0.25 * n)
        assert sorted(fastv.kept_indices[i][0].tolist()) == topk_sorted(att[1][0, :, -1, s : s + n].mean(0), k)
        assert sorted(div.kept_indices[i][0].tolist()) == divprune_loop(feats[i], k)


def test_next_full_budget_identity(setup):
    model, _, px, ids, mask, _ = setup
    base, _ = _gen(model, None, ids, mask, px, SIZES)
    out, _ = _gen(model, tp.FastV(layer=2, keep=1.0), ids, mask, px, SIZES)
    for a, b in zip(out.logits, base.logits, strict=False):
        torch.testing.assert_close(a, b)
