"""Registry, budget validation and clear errors (no model compute needed for most)."""

from __future__ import annotations

import pytest

from visattn import tokenprune as tp


@pytest.mark.parametrize("bad", [0, -3, 1.5, 0.0, -0.1, True, "64", None])
@pytest.mark.parametrize("name", ["fastv", "fastervlm", "vtc-cls", "divprune", "uniform", "random", "pooling",
                                  "cdpruner", "vispruner", "dart"])
def test_bad_keep_raises_value_error_naming_argument(name, bad):
    with pytest.raises(ValueError, match=r"keep="):
        tp.create(name, keep=bad)


def test_registry_creates_every_method():
    assert isinstance(tp.create("fastv", keep=0.25), tp.FastV)
    assert isinstance(tp.create("FasterVLM", keep=64), tp.FasterVLM)
    assert isinstance(tp.create("vtc-cls", keep=64), tp.VTCCLS)
    zip64 = tp.create("visionzip", keep=64)
    assert (zip64.dominant, zip64.contextual) == (54, 10)
    assert isinstance(tp.create("pdrop"), tp.PyramidDrop)
    assert isinstance(tp.create("divprune", keep=0.1), tp.DivPrune)
    with pytest.raises(ValueError, match="name='nope'"):
        tp.create("nope")


@pytest.mark.parametrize(
    "factory, pattern",
    [
        (lambda: tp.FastV(layer=0), r"layer=0"),
        (lambda: tp.FastV(layer=-1), r"layer=-1"),
        (lambda: tp.FastV(layer=2.5), r"layer=2.5"),
        (lambda: tp.FastV(positions="shift"), r"positions='shift'"),
        (lambda: tp.PyramidDrop(layers=[8, 4], ratios=[0.5, 0.25]), r"layers="),
        (lambda: tp.PyramidDrop(layers=[0, 4], ratios=[0.5, 0.25]), r"layers="),
        (lambda: tp.PyramidDrop(layers=[8, 16], ratios=[0.5]), r"ratios="),
        (lambda: tp.PyramidDrop(layers=[8, 16], ratios=[0.25, 0.5]), r"ratios="),
        (lambda: tp.PyramidDrop(layers=[8, 16], ratios=[0.5, 1.5]), r"ratios="),
        (lambda: tp.VisionZip(dominant=1), r"dominant=1"),
        (lambda: tp.VisionZip(contextual=0), r"contextual=0"),
        (lambda: tp.create("visionzip", keep=0.5), r"keep=0.5"),
    ],
)
def test_bad_arguments_raise_value_error(factory, pattern):
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_layer_out_of_range_raises_at_apply_before_compute():
    pytest.importorskip("transformers")
    from tp_tiny import tiny_llava

    model = tiny_llava(layers=2)
    with pytest.raises(ValueError, match=r"layer=5"):
        tp.apply(model, tp.FastV(layer=5, keep=4))
    with pytest.raises(ValueError, match=r"layer=3"):
        tp.apply(model, tp.FasterVLM(keep=4, layer=3))
    with pytest.raises(ValueError, match=r"start_layer"):
        tp.apply(model, tp.VTCCLS(keep=4, start_layer=2, end_layer=1))
    assert not hasattr(model, "_visattn_tokenprune")
    with pytest.raises(ValueError, match=r"kwargs="):
        tp.apply(model, tp.FastV(), keep=3)
