"""The method × adapter matrix: every registered method has a row here, and on every HF family (tiny random
LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, LLaVA-OneVision) ``apply`` either serves it — a padded batch runs a pruned forward
whose report keeps at most the visual tokens it had, with finite logits — or refuses with the documented error before
touching the model (docs/TOKENPRUNE.md, "What runs where"). The methods added with the 2025 baselines also get batch
rows = single runs on LLaVA-NeXT (images of different token counts)."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_next import SIZES, assert_rows_equal_single_runs, next_inputs  # noqa: E402
from tp_tiny import (  # noqa: E402
    QWEN_IMAGE,
    batch,
    pixels,
    prompt,
    pruned_forward,
    qwen_pixels,
    qwen_prompt,
    tiny_llava,
    tiny_onevision,
    tiny_qwen2vl,
)

from visattn import tokenprune as tp  # noqa: E402

Y, NI = "yes", NotImplementedError
#: method -> (constructor for the tiny models, outcome on LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / LLaVA-OneVision)
MATRIX = {
    "fastv": (lambda: tp.FastV(layer=2, keep=0.5), (Y, Y, Y, Y)),
    "pdrop": (lambda: tp.PyramidDrop(layers=[1, 2], ratios=[0.5, 0.25]), (Y, Y, Y, Y)),
    "sparsevlm": (lambda: tp.SparseVLM(layers=[0, 1], counts=[0.5, 0.25]), (Y, Y, NI, Y)),
    "dart": (lambda: tp.DART(layer=2, keep=4, pivot_image=1, pivot_text=1), (Y, Y, Y, Y)),
    "fastervlm": (lambda: tp.FasterVLM(keep=0.5), (Y, Y, NI, NI)),
    "vtc-cls": (lambda: tp.VTCCLS(keep=0.5, start_layer=0), (Y, Y, NI, NI)),
    "visionzip": (lambda: tp.VisionZip(dominant=4, contextual=2), (Y, Y, NI, NI)),
    "vispruner": (lambda: tp.VisPruner(keep=0.5), (Y, NI, NI, NI)),
    "pooling": (lambda: tp.Pooling(keep=4), (Y, NI, NI, NI)),
    "tome": (lambda: tp.ToMe(r=2), (Y, ValueError, NI, NI)),
    "dymu": (lambda: tp.DyMU([0.99, 0.99]), (Y, ValueError, NI, NI)),
    "divprune": (lambda: tp.DivPrune(keep=0.5), (Y, Y, Y, Y)),
    "uniform": (lambda: tp.Uniform(keep=0.5), (Y, Y, Y, Y)),
    "random": (lambda: tp.RandomPrune(keep=0.5, seed=2), (Y, Y, Y, Y)),
    "cdpruner": (lambda: tp.CDPruner(keep=0.5), (Y, Y, Y, Y)),
    "zipvl": (lambda: tp.ZipVL(tau=0.5, layer=2), (Y, Y, Y, Y)),
    "zipvl-kv": (lambda: tp.ZipVL(tau=0.5, layer=2, kv="quantize"), (Y, Y, Y, Y)),  # an option, not a registry name
    "temporal-merge": (lambda: tp.TemporalMerge(frames=tp.DivPrune(keep=2)), (NI, NI, Y, Y)),  # images pass unchanged
}
FAMILIES = ("llava", "llava_next", "qwen2_vl", "llava_onevision")
#: the arguments a method cannot do without (DyMU's thresholds come from an offline search: no default)
REQUIRED = {"dymu": {"thresholds": [0.5]}}
#: rows of a registered method with another option (not registry names)
OPTIONS = ("zipvl-kv",)


def test_every_registered_method_has_a_row():
    assert {type(make()) for make, _ in MATRIX.values()} == set(tp.REGISTRY.values())
    for name, (make, _) in MATRIX.items():
        if name in OPTIONS:
            continue
        assert type(tp.create(name, **REQUIRED.get(name, {}))) is type(make())


_BUILT: dict = {}


def _family(name: str):
    """(model, forward kwargs of a left-padded 2-row batch) of one family, built once."""
    if name in _BUILT:
        return _BUILT[name]
    if name == "llava":
        model = tiny_llava("sdpa")
        ids, mask = batch([prompt(3, 16, 4, 1), prompt(6, 16, 2, 2)])
        kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2, seed=7))
    elif name == "llava_next":
        model = tiny_llava("sdpa", next_=True)
        px, ids, mask, _ = next_inputs(model)
        kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=SIZES)
    elif name == "llava_onevision":  # anyres images of 114 and 120 tokens
        model = tiny_onevision("sdpa")
        ids, mask = batch([prompt(3, 114, 4, 1), prompt(6, 120, 2, 2)])
        kw = dict(input_ids=ids, attention_mask=mask, image_sizes=torch.tensor([[24, 48], [48, 24]]),
                  pixel_values=torch.randn(2, 3, 3, 24, 24, generator=torch.Generator().manual_seed(7)))
    else:
        model = tiny_qwen2vl("sdpa")
        grids = [(1, 4, 6), (1, 6, 8)]
        ids, mask = batch([qwen_prompt(3, 6, 4, 1), qwen_prompt(5, 12, 2, 2)])
        kw = dict(input_ids=ids, attention_mask=mask, pixel_values=qwen_pixels(grids, seed=3),
                  image_grid_thw=torch.tensor(grids))
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    _BUILT[name] = (model, kw)
    return _BUILT[name]


@pytest.mark.parametrize("family", range(len(FAMILIES)), ids=FAMILIES)
@pytest.mark.parametrize("method", list(MATRIX))
def test_apply_serves_or_refuses(method, family):
    model, kw = _family(FAMILIES[family])
    make, outcomes = MATRIX[method]
    expected = outcomes[family]
    if expected is not Y:
        with pytest.raises(expected):
            tp.apply(model, make())
        assert not hasattr(model, "_visattn_tokenprune")
        return
    logits, rep = pruned_forward(model, make(), **kw)
    assert rep is not None and rep.method == make().name
    assert all(0 < k <= v for k, v in zip(rep.visual_tokens_kept, rep.visual_tokens, strict=True)), rep
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["random", "cdpruner", "dart", "zipvl"])
def test_new_methods_batch_rows_equal_single_runs_on_llava_next(method):
    model, kw = _family("llava_next")
    rep = assert_rows_equal_single_runs(model, MATRIX[method][0], kw["input_ids"], kw["attention_mask"],
                                        kw["pixel_values"])
    assert rep.visual_tokens != rep.visual_tokens_kept


def test_zipvl_kv_quantize_rows_equal_single_runs_on_llava_next():
    """ZipVL kv='quantize' keeps every packed token (newlines included) and its mixed-precision cache of a padded
    batch row equals the row's own."""
    model, kw = _family("llava_next")
    rep = assert_rows_equal_single_runs(model, MATRIX["zipvl-kv"][0], kw["input_ids"], kw["attention_mask"],
                                        kw["pixel_values"])
    assert rep.visual_tokens == rep.visual_tokens_kept
    assert all(0 < s < f for s, f in zip(rep.extra["kv_bytes"], rep.extra["kv_bytes_fp16"], strict=True))
