"""A left-padded batch that mixes text-only rows with image rows goes through pruned ``generate()``: every image row
equals its own pruned run, every text-only row equals the stock model (no pruner attached) on that row alone."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from tp_tiny import (  # noqa: E402
    QWEN_IMAGE,
    batch,
    pixels,
    prompt,
    qwen_pixels,
    qwen_prompt,
    tiny_llava,
    tiny_qwen2vl,
)

from visattn import tokenprune as tp  # noqa: E402

TEXT_ROW = [11, 12, 13, 14, 15, 16, 17]

# one method per stage / mechanism by default (LLM drop with original positions, LLM drop with recycling, merged
# vision tokens, embedding selection); the rest with -m slow
LLAVA_METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=5),
    "sparsevlm": lambda: tp.SparseVLM(layers=[0, 1, 2], counts=[8, 5, 3]),
    "visionzip": lambda: tp.VisionZip(dominant=5, contextual=3),
    "divprune": lambda: tp.DivPrune(keep=5),
    "cdpruner": lambda: tp.CDPruner(keep=5),  # instruction per image row
    "dart": lambda: tp.DART(layer=2, keep=4, pivot_image=1, pivot_text=1),  # per-image selection loop
    "zipvl": lambda: tp.ZipVL(tau=0.5, layer=2),  # attention mass over every row, padding rows included
}
LLAVA_METHODS_SLOW = {
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
    "fastervlm": lambda: tp.FasterVLM(keep=5),
    "vtc-cls": lambda: tp.VTCCLS(keep=5, start_layer=0),
    "tome": lambda: tp.ToMe(r=4),
    "random": lambda: tp.RandomPrune(keep=5),
    "pooling": lambda: tp.Pooling(keep=4),
    "vispruner": lambda: tp.VisPruner(keep=5),
}
QWEN_METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=3),
    "divprune": lambda: tp.DivPrune(keep=3),
}
QWEN_METHODS_SLOW = {"pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
                     "cdpruner": lambda: tp.CDPruner(keep=3),
                     "dart": lambda: tp.DART(layer=2, keep=2, pivot_image=1, pivot_text=1),
                     "zipvl": lambda: tp.ZipVL(tau=0.5, layer=2)}


def _generate(model, **kwargs):
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return torch.stack(out.logits, 1)  # (B, steps, V)


def _check(model, methods, rows, images_of_row, kwargs_for):
    """``kwargs_for(rows, image_rows)``: generate() kwargs of ``rows`` whose images are those of ``image_rows``."""
    ids, mask = batch(rows)
    stock_text = {i: _generate(model, **kwargs_for([row], [])) for i, row in enumerate(rows) if i not in images_of_row}
    for name, make in methods.items():
        tp.apply(model, make())
        try:
            both = _generate(model, **kwargs_for(rows, images_of_row, ids, mask))
            for i, row in enumerate(rows):
                if i in images_of_row:
                    one = _generate(model, **kwargs_for([row], [i]))
                else:
                    one = stock_text[i]
                torch.testing.assert_close(both[i], one[0], atol=2e-4, rtol=1e-4, msg=f"{name}, row {i}")
        finally:
            tp.remove(model)


@pytest.mark.parametrize("methods", [pytest.param(LLAVA_METHODS, id="default"),
                                     pytest.param(LLAVA_METHODS_SLOW, id="others", marks=pytest.mark.slow)])
def test_llava_text_only_row_among_image_rows(methods):
    model = tiny_llava("sdpa", layers=4)
    rows = [prompt(3, 16, 4, 1), TEXT_ROW, prompt(6, 16, 2, 2)]
    px = pixels(3, seed=7)

    def kwargs_for(rows_, image_rows, ids=None, mask=None):
        if ids is None:
            ids, mask = batch(rows_)
        kw = dict(input_ids=ids, attention_mask=mask)
        if image_rows:
            kw["pixel_values"] = px[image_rows]
        return kw

    _check(model, methods, rows, [0, 2], kwargs_for)


@pytest.mark.parametrize("methods", [pytest.param(QWEN_METHODS, id="default"),
                                     pytest.param(QWEN_METHODS_SLOW, id="others", marks=pytest.mark.slow)])
def test_qwen2vl_text_only_row_among_image_rows(methods):
    model = tiny_qwen2vl("sdpa")
    grids = [(1, 4, 6), (1, 6, 8)]
    rows = [TEXT_ROW, qwen_prompt(3, 6, 4, 1), qwen_prompt(5, 12, 2, 2)]
    px = qwen_pixels(grids, seed=3)
    sizes = [t * h * w for t, h, w in grids]
    image_of_row = {1: 0, 2: 1}

    def kwargs_for(rows_, image_rows, ids=None, mask=None):
        if ids is None:
            ids, mask = batch(rows_)
        kw = dict(input_ids=ids, attention_mask=mask)
        if image_rows:
            images = [image_of_row[r] for r in image_rows]
            kw["pixel_values"] = torch.cat([px[sum(sizes[:j]) : sum(sizes[: j + 1])] for j in images])
            kw["image_grid_thw"] = torch.tensor([grids[j] for j in images])
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
        return kw

    _check(model, methods, rows, [1, 2], kwargs_for)
