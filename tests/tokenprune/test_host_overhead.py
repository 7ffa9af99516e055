"""Host overhead of the adapter per prefill (CPU counts with tp_count): aten ops and host syncs issued by the
tokenprune hooks (the eager code path; on CUDA the LLM-stage scoring and top-k are one Triton launch each).
Bounds = the counts after the host-bookkeeping work (docs/PRUNE_PERF.md, "Host overhead"); a regression that adds
per-layer / per-stage / per-image / per-cluster syncs fails here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_count import counts  # noqa: E402
from tp_tiny import batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

SIZES = torch.tensor([[56, 112], [112, 56]])
# method, shape, factory, (syncs b=1, syncs b=2), (ops b=1, ops b=2)
CASES = [
    ("sparsevlm", "1.5", lambda: tp.SparseVLM(layers=[1, 3, 5], counts=[8, 5, 3]), (6, 10), (810, 870)),
    ("pdrop", "1.5", lambda: tp.PyramidDrop(layers=[2, 4, 6], ratios=[0.5, 0.25, 0.125]), (6, 10), (490, 550)),
    ("vtc-cls", "1.5", lambda: tp.VTCCLS(keep=4, start_layer=0, end_layer=-1), (8, 12), (120, 140)),
    ("visionzip", "1.5", lambda: tp.VisionZip(dominant=4, contextual=2), (8, 12), (180, 205)),
    ("sparsevlm", "next", lambda: tp.SparseVLM(layers=[1, 3, 5], counts=[8, 5, 3]), (6, 10), (810, 950)),
    ("vtc-cls", "next", lambda: tp.VTCCLS(keep=8, start_layer=0, end_layer=-1), (15, 25), (170, 240)),
    ("visionzip", "next", lambda: tp.VisionZip(dominant=4, contextual=2), (12, 18), (245, 315)),
]
# LLaVA-1.5 by default; the LLaVA-NeXT bounds and the growth checks below run with -m slow
CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if c[1] == "next" else []) for c in CASES]


@pytest.fixture(scope="module")
def models():
    return {"1.5": tiny_llava("sdpa", layers=8), "next": tiny_llava("sdpa", next_=True, layers=8)}



def _inputs(model, shape: str, bsz: int) -> dict:
    if shape == "1.5":
        ids, mask = batch([prompt(3 + i, 16, 9 + i, i) for i in range(bsz)])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(bsz, seed=7))
    px = torch.randn(bsz, 3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=px, image_sizes=SIZES[:bsz], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
    n = [f.shape[0] for f in getattr(feats, "pooler_output", feats)]
    ids, mask = batch([prompt(3 + i, n[i], 4 + i, i) for i in range(bsz)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=SIZES[:bsz])


@pytest.mark.parametrize("name,shape,make,max_syncs,max_ops", CASES)
def test_syncs_and_ops_per_prefill(models, name, shape, make, max_syncs, max_ops):
    model = models[shape]
    for bsz in (1, 2):
        ops, syncs, _, sync_kinds = counts(model, make(), **_inputs(model, shape, bsz))
        print(f"{name}-{shape} b={bsz}: {ops} ops, {syncs} syncs")  # read with pytest -s
        assert syncs <= max_syncs[bsz - 1], (name, shape, bsz, dict(sync_kinds))
        assert ops <= max_ops[bsz - 1], (name, shape, bsz, ops)


@pytest.mark.slow
def test_llm_methods_have_no_per_layer_syncs(models):
    """Deeper LLM, same stages: the sync count must not grow with the number of decoder layers."""
    shallow, deep = tiny_llava("sdpa", layers=8), tiny_llava("sdpa", layers=16)
    inp = _inputs(shallow, "1.5", 1)
    for make in (lambda: tp.SparseVLM(layers=[1, 3, 5], counts=[8, 5, 3]),
                 lambda: tp.PyramidDrop(layers=[2, 4, 6], ratios=[0.5, 0.25, 0.125])):
        assert counts(deep, make(), **inp)[1] == counts(shallow, make(), **inp)[1]


@pytest.mark.slow
def test_vtc_cls_ops_do_not_grow_with_scored_layers(models):
    """VTC-CLS scores all its vision layers in one batched call: one scored layer costs as many ops as two."""
    model = models["1.5"]
    inp = _inputs(model, "1.5", 1)
    one, two = (counts(model, tp.VTCCLS(keep=4, start_layer=s, end_layer=-1), **inp)[0] for s in (1, 0))
    assert one == two


@pytest.mark.slow
def test_sparsevlm_recycling_syncs_do_not_grow_with_images():
    """Two images per sample instead of one: at most the per-call syncs of the extra selection bookkeeping."""
    model = tiny_llava("sdpa", layers=8)
    make = lambda: tp.SparseVLM(layers=[1, 3, 5], counts=[8, 5, 3])  # noqa: E731
    one = batch([prompt(3, 16, 9, 0)])
    two = batch([prompt(3, 16, 2, 0)[:-2] + prompt(0, 16, 9, 1)])
    s1 = counts(model, make(), input_ids=one[0], attention_mask=one[1], pixel_values=pixels(1, seed=7))[1]
    s2 = counts(model, make(), input_ids=two[0], attention_mask=two[1], pixel_values=pixels(2, seed=7))[1]
    assert s2 <= s1 + 2


@pytest.mark.slow
def test_llm_stages_have_no_syncs(models):
    """Stage drops use host-tracked counts: three stages cost no more syncs than one (SparseVLM recycling too)."""
    model = models["1.5"]
    inp = _inputs(model, "1.5", 2)
    for one, three in [(tp.PyramidDrop(layers=[2], ratios=[0.5]), tp.PyramidDrop(layers=[2, 4, 6])),
                       (tp.SparseVLM(layers=[1], counts=[8]), tp.SparseVLM(layers=[1, 3, 5], counts=[8, 5, 3]))]:
        assert counts(model, three, **inp)[1] == counts(model, one, **inp)[1]
