"""The HF adapters refuse, naming the transformers version and what differs, when the hooked model does not match
what they were tested against: a renamed cache argument or output field, a cache object with another API, a mask
in another format, a layer with other arguments, a release outside the tested range. Plus the clear errors for
``labels=`` and a non-string method name."""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from tp_tiny import batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune import hf_contract  # noqa: E402

VERSION = rf"transformers {transformers.__version__}"


@pytest.fixture(scope="module")
def model():
    return tiny_llava("sdpa", layers=3)


def _inputs(rows: int = 1) -> dict:
    ids, mask = batch([prompt(3 + i, 16, 4, i) for i in range(rows)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(rows, seed=7))


def _cache_arg(model) -> str:
    return hf_contract.language_model_contract(model.model.language_model).cache_arg


def test_installed_release_reads_the_cache_argument_by_its_own_name(model):
    """The name comes from the language model's signature: ``cache`` from 5.24 on, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.model.language_model.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert _cache_arg(model) == expected
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert expected == ("cache" if version >= (5, 24) else "past_key_values")


def test_renamed_cache_argument_is_refused_at_apply(model, monkeypatch):
    lm = model.model.language_model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_state=None, inputs_embeds=None,
                **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(lm, "forward", types.MethodType(forward, lm), raising=False)
    for pruner in (tp.FastV(layer=1, keep=4), tp.FasterVLM(keep=4), tp.DivPrune(keep=4)):
        with pytest.raises(ValueError, match=rf"{VERSION} .*takes none of \('cache', 'past_key_values'\)"):
            tp.apply(model, pruner)
        assert not hasattr(model, "_visattn_tokenprune")


def test_renamed_layer_argument_is_refused_at_apply(model, monkeypatch):
    layer = model.model.language_model.layers[0]

    def forward(self, hidden_states, attention_mask=None, rotary=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(layer, "forward", types.MethodType(forward, layer), raising=False)
    with pytest.raises(ValueError, match=rf"{VERSION} .*no argument\(s\) \['position_embeddings'\]"):
        tp.apply(model, tp.FastV(layer=1, keep=4))
    tp.apply(model, tp.FasterVLM(keep=4))  # vision-stage methods never touch the decoder layers
    tp.remove(model)


def _patch_lm_output(model, monkeypatch, change):
    """Wrap the language model's forward (signature kept) so that ``change(output)`` is what the adapter sees."""
    lm = model.model.language_model
    original = lm.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return change(original(*args, **kwargs))

    monkeypatch.setattr(lm, "forward", forward, raising=False)


def test_cache_returned_under_another_name_is_refused_on_first_call(model, monkeypatch):
    @dataclasses.dataclass
    class Renamed:
        last_hidden_state: torch.Tensor
        kv_cache: object

    name = _cache_arg(model)
    _patch_lm_output(model, monkeypatch, lambda out: Renamed(out.last_hidden_state, getattr(out, name)))
    for pruner in (tp.FastV(layer=1, keep=4), tp.DivPrune(keep=4)):
        tp.apply(model, pruner)
        try:
            with pytest.raises(ValueError, match=rf"{VERSION} .*Renamed has no '{name}' field .*kv_cache"):
                with torch.no_grad():
                    model(**_inputs())
        finally:
            tp.remove(model)


class _OldCache:
    """A cache whose ``get_seq_length`` takes no layer index (a changed public API)."""

    def __init__(self, cache):
        self._cache = cache

    def get_seq_length(self):
        return self._cache.get_seq_length()


def test_cache_with_another_api_is_refused_on_first_call(model, monkeypatch):
    name = _cache_arg(model)

    def change(out):
        setattr(out, name, _OldCache(getattr(out, name)))
        return out

    _patch_lm_output(model, monkeypatch, change)
    tp.apply(model, tp.FasterVLM(keep=4))
    try:
        with pytest.raises(ValueError, match=rf"{VERSION} .*_OldCache.get_seq_length\(0\) failed"):
            with torch.no_grad():
                model(**_inputs())
    finally:
        tp.remove(model)


def test_cache_that_miscounts_the_prefill_is_refused(model, monkeypatch):
    name = _cache_arg(model)

    class Miscounting(_OldCache):
        def get_seq_length(self, layer_idx=0):
            return self._cache.get_seq_length(layer_idx) + 1

    def change(out):
        setattr(out, name, Miscounting(getattr(out, name)))
        return out

    _patch_lm_output(model, monkeypatch, change)
    tp.apply(model, tp.FastV(layer=1, keep=4))
    try:
        with pytest.raises(ValueError, match=rf"{VERSION} .*get_seq_length\(0\) = \d+ after a prefill of \d+ tokens"):
            with torch.no_grad():
                model(**_inputs())
    finally:
        tp.remove(model)


def test_cache_passed_under_an_unknown_name_is_refused_in_decode(model, monkeypatch):
    """A decode step whose cache arrives under a name the adapter does not read would be run on the wrong mask:
    refused instead."""
    lm = model.model.language_model
    name = _cache_arg(model)
    tp.apply(model, tp.FastV(layer=1, keep=4))
    try:
        with torch.no_grad():
            out = model(**_inputs())
            cache = getattr(out, name)
            with pytest.raises(ValueError, match=rf"{VERSION} .*received its KV cache as 'kv_state'"):
                lm(inputs_embeds=torch.zeros(1, 1, 64), kv_state=cache)
    finally:
        tp.remove(model)


def test_four_d_mask_into_the_language_model_is_refused(model):
    inputs = _inputs()
    n = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    tp.apply(model, tp.DivPrune(keep=4))
    try:
        with pytest.raises(ValueError, match=rf"{VERSION} .*attention_mask .*shape \(1, 1, {n}, {n}\)"):
            with torch.no_grad():
                model(**inputs)
    finally:
        tp.remove(model)


def test_unsupported_layer_attention_implementation_is_refused():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"{VERSION} .*attn_implementation='flex_attention'"):
        hf_contract.check_layer_call(layer, "flex_attention", {})
    rope = (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="not a .cos, sin. pair"):
        hf_contract.check_layer_call(layer, "sdpa", {"position_embeddings": rope[:1]})
    hf_contract.check_layer_call(layer, "sdpa", {"position_embeddings": rope, "attention_mask": None})


@pytest.mark.parametrize("version", ["5.16.2", "5.41.0", "6.0.0.dev0"])
def test_release_outside_the_tested_range_is_refused(model, monkeypatch, version):
    monkeypatch.setattr(hf_contract, "transformers_version", lambda: version)
    with pytest.raises(ValueError, match=rf"transformers {version} \(tested: >=5\.17,<5\.41\)"):
        tp.apply(model, tp.FastV(layer=1, keep=4))
    monkeypatch.setenv(hf_contract.ALLOW_UNTESTED_ENV, "1")
    tp.apply(model, tp.FastV(layer=1, keep=4))
    tp.remove(model)


def test_labels_with_a_pruner_raise_naming_labels(model):
    inputs = _inputs()
    with torch.no_grad():
        loss = model(**inputs, labels=inputs["input_ids"]).loss  # the stock model computes a loss
    assert torch.isfinite(loss)
    for pruner in (tp.FastV(layer=1, keep=4), tp.FasterVLM(keep=4), tp.DivPrune(keep=4)):
        tp.apply(model, pruner)
        try:
            with pytest.raises(ValueError, match=r"^labels: "):
                with torch.no_grad():
                    model(**inputs, labels=inputs["input_ids"])
        finally:
            tp.remove(model)


@pytest.mark.parametrize("bad", [None, 5, tp.FastV])
def test_create_with_a_non_string_name_raises_type_error(bad):
    with pytest.raises(TypeError, match=r"^name="):
        tp.create(bad)
