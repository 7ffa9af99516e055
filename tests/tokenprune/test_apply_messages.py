"""What apply / remove / generate say when used wrongly (issue 19, "CLI and messages"): a second pruner without
``replace=True``, ``remove`` on a model without one, and ``generate(cache_implementation="static")``."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from tp_tiny import batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

N_IMG = 16  # (56 / 14) ** 2


@pytest.fixture(scope="module")
def model():
    return tiny_llava("sdpa")


def _inputs():
    ids, mask = batch([prompt(3, N_IMG, 4, 0)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))


def test_a_second_pruner_is_refused_and_the_first_keeps_working(model):
    tp.apply(model, tp.FastV(layer=2, keep=5))
    try:
        with pytest.raises(ValueError, match=r"already has a FastV pruner attached.*remove\(model\).*replace=True"):
            tp.apply(model, tp.DivPrune(keep=3))
        with torch.no_grad():
            model(**_inputs())
        report = tp.last_report(model)
        assert report.method == "fastv" and report.visual_tokens_kept == [5]
        with pytest.raises(TypeError, match="replace must be a bool"):
            tp.apply(model, tp.DivPrune(keep=3), replace=1)
        tp.apply(model, tp.DivPrune(keep=3), replace=True)
        with torch.no_grad():
            model(**_inputs())
        report = tp.last_report(model)
        assert report.method == "divprune" and report.visual_tokens_kept == [3]
    finally:
        tp.remove(model)


def test_remove_without_a_pruner_says_so_and_leaves_the_model_alone(model):
    with torch.no_grad():
        before = model(**_inputs()).logits
    with pytest.warns(UserWarning, match="has no pruner attached; nothing removed"):
        assert tp.remove(model) is model
    tp.apply(model, tp.FastV(layer=2, keep=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real removal is silent
        tp.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).logits, before)


def test_generate_with_a_static_cache_is_refused_naming_the_cache_implementation(model):
    inputs = _inputs()
    with torch.no_grad():  # the stock model generates with a static cache
        stock = model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert stock.shape[1] == inputs["input_ids"].shape[1] + 2
    for pruner in (tp.FastV(layer=2, keep=5), tp.VisionZip(dominant=5, contextual=3)):
        tp.apply(model, pruner)
        try:
            with pytest.raises(ValueError, match=r"cache_implementation='static' \(StaticCache\) is not supported "
                                                 r"with a pruner attached"), torch.no_grad():
                model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
            with torch.no_grad():  # the default dynamic cache still works with the same pruner
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        finally:
            tp.remove(model)
