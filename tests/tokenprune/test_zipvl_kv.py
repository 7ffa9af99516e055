"""ZipVL kv="quantize" (v1's mixed-precision KV cache) on a tiny random LLaVA-1.5.

Oracles written here from the rule (ZipCache / ZipVL v1 facts, not from visattn's code): asymmetric min-max per
group as plain float loops (scale = (max - min) / (2^b - 1), code = round((x - min) / scale), read back
code * scale + min); keys per channel over a token set, values per token after dividing every channel by
sqrt(max |v|) over the sample's tokens. The adapter's decode logits = the eager model in float64 decoding from a
stock DynamicCache whose prefill keys / values were replaced by that fake-quantised float64 transcription
(important = text + the ZipVL selection recomputed from the eager attention); bits=(16, 16) = the stock model;
batch rows = single runs; generate = a manual decode loop on the same cache; bytes = the storage formula; bad
arguments name themselves."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_methods import _generate, _inputs, _span, rows_equal_single_runs  # noqa: E402
from test_zipvl import zipvl_oracle  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune.kvquant import MixedPrecisionKV, encode, precision_sets  # noqa: E402

TAU = 0.6


# ------------------------------------------------------------------------------------------ the transcription
def fake_quant_group(xs: list[float], bits: int) -> list[float]:
    """One min-max group, read back (plain Python floats)."""
    lo, hi = min(xs), max(xs)
    scale = (hi - lo) / (2**bits - 1)
    if scale == 0:
        return list(xs)
    return [min(max(round((x - lo) / scale), 0), 2**bits - 1) * scale + lo for x in xs]


def fake_quant_rows(x: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Every row of ``x`` (R, N) in consecutive groups of ``group`` elements (the whole row when None)."""
    if bits == 16:
        return x.clone()
    out = torch.empty_like(x, dtype=torch.float64)
    n = x.shape[1]
    g = n if group is None else group
    for r in range(x.shape[0]):
        row = x[r].double().tolist()
        for s in range(0, n, g):
            out[r, s : s + g] = torch.tensor(fake_quant_group(row[s : s + g], bits), dtype=torch.float64)
    return out


def fake_quant_sample(k: torch.Tensor, v: torch.Tensor, sets: list[list[int]], bits: tuple[int, int],
                      group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's keys / values (H, L, D) with the columns of ``sets[0]`` at ``bits[0]``, ``sets[1]`` at
    ``bits[1]`` (keys: per channel of the H*D flattened ones; values: per token after the channel factor)."""
    heads, length, dim = k.shape
    kf = k.permute(1, 0, 2).reshape(length, heads * dim).double()
    vf = v.permute(1, 0, 2).reshape(length, heads * dim).double()
    cols_all = sorted(sets[0] + sets[1])
    chan = torch.tensor([math.sqrt(max(abs(vf[t, c].item()) for t in cols_all)) or 1.0
                         for c in range(heads * dim)], dtype=torch.float64)
    ko, vo = kf.clone(), vf.clone()
    for cols, b in zip(sets, bits, strict=True):
        if not cols or b == 16:
            continue
        idx = torch.tensor(cols)
        ko[idx] = fake_quant_rows(kf[idx].T, b, group).T
        vo[idx] = fake_quant_rows(vf[idx] / chan, b, group) * chan
    return (ko.reshape(length, heads, dim).permute(1, 0, 2), vo.reshape(length, heads, dim).permute(1, 0, 2))


# ---------------------------------------------------------------------------------------- arithmetic alone
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [None, 3, 5])
def test_encode_round_trip_matches_transcription(bits, group):
    g = torch.Generator().manual_seed(bits * 10 + (group or 0))
    x = torch.randn(4, 11, generator=g, dtype=torch.float64) * 3
    x[1] = 0.25  # a constant row reads back exactly
    stored = encode(x, bits, group)
    got = stored.decode()
    assert got.dtype == torch.float64 and got.shape == x.shape
    torch.testing.assert_close(got, fake_quant_rows(x, bits, group), rtol=0, atol=1e-12)
    assert (got[1] == 0.25).all()
    # storage: ceil(elements * bits / 8) bytes of codes per row (groups padded to full length) + float64 scale/zero
    n_groups = 1 if group is None else -(-11 // group)
    per_row = n_groups * (11 if group is None else group)
    assert stored.codes.dtype == torch.uint8
    assert stored.nbytes == 4 * math.ceil(per_row * bits / 8) + 2 * 4 * n_groups * 8


def test_encode_16_bits_and_empty_store_as_is():
    x = torch.randn(3, 5)
    assert encode(x, 16).decode() is x and encode(x, 16).nbytes == x.numel() * 4
    assert encode(x[:0], 2).decode().shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_codes_match_the_float64_transcription(dtype):
    """Half inputs are coded in float32 (8-bit codes would not fit a bfloat16 mantissa); scales and zeros are
    stored in the input dtype, so the read back is the transcription up to rounding the scale (times a code of at
    most 255), the zero and the result to that dtype (each within eps / 2 relative)."""
    x = (torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    stored = encode(x, 8)
    assert stored.scale.dtype == dtype and stored.decode().dtype == dtype
    xd = x.double()
    ref = fake_quant_rows(xd, 8, None)
    lo = xd.amin(1, keepdim=True)
    step = (xd.amax(1, keepdim=True) - lo) / 255
    eps = torch.finfo(dtype).eps
    bound = (255 * step + lo.abs() + ref.abs()) * eps / 2 * 1.01
    assert ((stored.decode().double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("bits,group", [((4, 2), None), ((8, 2), 3), ((16, 4), None)])
def test_mixed_precision_kv_matches_transcription(bits, group):
    g = torch.Generator().manual_seed(1)
    bsz, heads, length, dim = 2, 2, 9, 4
    k = torch.randn(bsz, heads, length, dim, generator=g, dtype=torch.float64)
    v = torch.randn(bsz, heads, length, dim, generator=g, dtype=torch.float64) * 2
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    important = torch.rand(bsz, length, generator=g) < 0.4
    kv = MixedPrecisionKV(k, v, precision_sets(important, valid), bits, group)
    kd, vd = kv.decode()
    for b in range(bsz):
        sets = [[t for t in range(length) if valid[b, t] and important[b, t]],
                [t for t in range(length) if valid[b, t] and not important[b, t]]]
        ke, ve = fake_quant_sample(k[b], v[b], sets, bits, group)
        cols = torch.tensor(sets[0] + sets[1])
        torch.testing.assert_close(kd[b][:, cols], ke[:, cols], rtol=0, atol=1e-12)
        torch.testing.assert_close(vd[b][:, cols], ve[:, cols], rtol=0, atol=1e-12)
        pad = ~valid[b]
        assert (kd[b][:, pad] == 0).all() and (vd[b][:, pad] == 0).all()
    assert kv.fp16_bytes() == [2 * 2 * heads * dim * int(valid[b].sum()) for b in range(bsz)]


# ------------------------------------------------------------------------------------------- the adapter
def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _oracle_logits(eager, row: torch.Tensor, px: torch.Tensor, gen: torch.Tensor, bits, group) -> torch.Tensor:
    """(steps, V) float64: prefill logits of the last token, then one decode step per token of ``gen`` on a
    DynamicCache whose prefill keys / values are the transcription's fake-quantised ones."""
    from transformers import DynamicCache

    s = _span(row)
    kept = [s + j for j in zipvl_oracle(eager, row, px, TAU)]
    assert 0 < len(kept) < 16  # both precision sets hold visual tokens
    image = set(range(s, s + 16))
    sets = [[t for t in range(row.shape[0]) if t not in image or t in kept],
            [t for t in range(row.shape[0]) if t in image and t not in kept]]
    m64 = copy.deepcopy(eager).double()
    cache, name = DynamicCache(), _cache_kwarg(m64)
    with torch.no_grad():
        logits = [m64(input_ids=row[None], pixel_values=px.double(), **{name: cache}).logits[0, -1]]
        for layer in cache.layers:
            ke, ve = fake_quant_sample(layer.keys[0], layer.values[0], sets, bits, group)
            layer.keys, layer.values = ke[None], ve[None]
        for tok in gen:
            logits.append(m64(input_ids=tok.view(1, 1), **{name: cache}).logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("bits,group", [((4, 2), None), ((16, 2), None), ((8, 2), 8)])
def test_decode_logits_match_float64_oracle(models, bits, group):
    model, eager = models
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.ZipVL(tau=TAU, kv="quantize", bits=bits, group_size=group), ids, mask, px,
                            steps=3)
    assert report.visual_tokens_kept == [16, 16]  # nothing dropped
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()]
        ref = _oracle_logits(eager, row, px[i : i + 1], gen[i][:-1], bits, group)
        assert report.extra["kv_important"][i][0].tolist() == zipvl_oracle(eager, row, px[i : i + 1], TAU)
        torch.testing.assert_close(logits[i].double(), ref, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def stock(models):
    """The stock model's greedy generate() of 3 tokens on the test batch, with its logits (computed once)."""
    model, _ = models
    ids, mask, px = _inputs()
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)


def test_quantisation_changes_the_decode(models, stock):
    """The oracle test is not vacuous: the low-bit cache moves the decode logits away from the stock model's."""
    model, _ = models
    ids, mask, px = _inputs()
    out, _ = _generate(model, tp.ZipVL(tau=TAU, kv="quantize", bits=(16, 2)), ids, mask, px, steps=3)
    torch.testing.assert_close(out.logits[0], stock.logits[0], atol=1e-5, rtol=1e-5)  # the prefill is exact
    assert (out.logits[1] - stock.logits[1]).abs().max() > 1e-3


def test_sixteen_bits_equal_the_stock_model(models, stock):
    model, _ = models
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.ZipVL(tau=TAU, kv="quantize", bits=(16, 16)), ids, mask, px, steps=3)
    assert torch.equal(out.sequences, stock.sequences)
    for a, b in zip(out.logits, stock.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_batch_rows_equal_single_runs(models):
    model, _ = models
    report = rows_equal_single_runs(model, lambda: tp.ZipVL(tau=TAU, kv="quantize"), *_inputs())
    ids, mask, px = _inputs()
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        _, one = _generate(model, tp.ZipVL(tau=TAU, kv="quantize"), row, torch.ones_like(row), px[i : i + 1], steps=1)
        assert one.extra["kv_bytes"][0] == report.extra["kv_bytes"][i]
        assert one.extra["kv_important"][0][0].tolist() == report.extra["kv_important"][i][0].tolist()


def test_generate_equals_a_manual_decode_loop_on_the_cache(models):
    from transformers import DynamicCache

    from visattn.tokenprune.hf_kvcache import MixedPrecisionLayer

    model, _ = models
    ids, mask, px = _inputs()
    ids, mask, px = ids[1:], mask[1:], px[1:]  # the unpadded row (padded positions: generate's business)
    assert bool(mask.all())
    out, _ = _generate(model, tp.ZipVL(tau=TAU, kv="quantize"), ids, mask, px, steps=4)
    tp.apply(model, tp.ZipVL(tau=TAU, kv="quantize"))
    try:
        cache, name = DynamicCache(), _cache_kwarg(model)
        seq, am = ids, mask
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=px, **{name: cache}).logits[:, -1]
            steps = [logits]
            for _ in range(3):
                tok = logits.argmax(-1, keepdim=True)
                seq, am = torch.cat([seq, tok], 1), torch.cat([am, torch.ones_like(tok)], 1)
                logits = model(input_ids=tok, attention_mask=am, **{name: cache}).logits[:, -1]
                steps.append(logits)
        assert all(isinstance(x, MixedPrecisionLayer) for x in cache.layers)
        assert cache.get_seq_length() == ids.shape[1] + 3
        assert cache.layers[0].keys.shape[-2] == 3  # the decode tokens, unquantised
    finally:
        tp.remove(model)
    assert torch.equal(out.sequences[:, ids.shape[1]:], torch.cat([s.argmax(-1, keepdim=True) for s in steps], 1))
    for a, b in zip(out.logits, steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_report_bytes_follow_the_storage_formula(models):
    model, _ = models
    ids, mask, px = _inputs()
    _, report = _generate(model, tp.ZipVL(tau=TAU, kv="quantize", bits=(4, 2)), ids, mask, px, steps=1)
    cfg = model.config.text_config
    layers, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    dim = cfg.hidden_size // cfg.num_attention_heads
    chans = kvh * dim
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        hi = n - 16 + len(report.extra["kv_important"][i][0])
        total = 0
        for t, bits in ((hi, 4), (n - hi, 2)):
            if t:  # keys: C channels of ceil(t*b/8) bytes + fp32 scale/zero; values: t tokens of ceil(C*b/8)
                total += chans * math.ceil(t * bits / 8) + 2 * 4 * chans
                total += t * math.ceil(chans * bits / 8) + 2 * 4 * t
        total += 4 * chans + 4 * n  # value channel factors, int32 column indices
        assert report.extra["kv_bytes"][i] == layers * total
        assert report.extra["kv_bytes_fp16"][i] == layers * 2 * 2 * chans * n
        assert report.extra["kv_bytes"][i] < report.extra["kv_bytes_fp16"][i] / 1.5
    assert report.summary()["kv_bytes"] == report.extra["kv_bytes"]


@pytest.mark.parametrize("kwargs,arg,err", [
    ({"kv": "int4"}, "kv", ValueError),
    ({"kv": "quantize", "bits": (4, 3)}, "bits", ValueError),
    ({"kv": "quantize", "bits": (2, 4)}, "bits", ValueError),
    ({"kv": "quantize", "bits": 4}, "bits", TypeError),
    ({"kv": "quantize", "bits": (4.0, 2)}, "bits", ValueError),
    ({"kv": "quantize", "group_size": 0}, "group_size", ValueError),
    ({"kv": "quantize", "group_size": True}, "group_size", ValueError),
    ({"bits": (4, 2)}, "bits", ValueError),
    ({"group_size": 32}, "group_size", ValueError),
    ({"kv": "quantize", "positions": "reindex"}, "positions", ValueError),
])
def test_bad_arguments_raise_naming_them(kwargs, arg, err):
    with pytest.raises(err, match=rf"{arg}="):
        tp.create("zipvl", **kwargs)


def test_capabilities_and_config():
    z = tp.ZipVL(kv="quantize")
    assert z.capabilities.kv_quantize and not tp.ZipVL.capabilities.kv_quantize
    assert z.kv_bits == (4, 2) and z.kv_group_size is None
    assert "capabilities" not in z.config() and z.config()["kv"] == "quantize"
