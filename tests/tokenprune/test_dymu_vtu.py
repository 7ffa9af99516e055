"""DyMU's virtual token unmerging (``DyMU(..., unmerge="virtual")``) on the tiny LLaVA-1.5: the adapter's logits
against a float64 plain-loop oracle of the definition (every layer: the merged hidden states unmerged by the merge
map, RoPE at the full positions, causal attention over the full sequence, re-merged by averaging), the identity map
against the stock model, batch rows against rows alone, and generate with the KV cache against a full recompute."""

from __future__ import annotations

import copy

import pytest
import torch
from tp_tiny import batch, pixels, prompt, tiny_llava

from visattn import tokenprune as tp
from visattn.tokenprune import vtu
from visattn.tokenprune.layout import positions_from_valid

THRESHOLDS = [0.99, 0.99]  # the tiny tower's feature layer (index 1) sees merging in both layers
N_PATCHES = 16


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(image_size=56)


def _prompts():
    return [prompt(3, N_PATCHES, 4, 0), prompt(6, N_PATCHES, 2, 1)]


def merged_images(model, px, thresholds):
    """Per image: the projected merged tokens of the feature layer (k, D) and the merged token holding each patch
    (16,), from a copy of the tower cut after the feature layer, run with DyMU alone (``trace_source``)."""
    tower = copy.deepcopy(model.model.vision_tower)
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = encoder.layers
    n_keep = model.config.vision_feature_layer % (len(layers) + 1)
    encoder.layers = layers[:n_keep]
    tp.apply(tower, tp.DyMU(thresholds, trace_source=True))
    hs = tower(px, output_hidden_states=True).hidden_states[-1]
    rep = tp.last_report(tower)
    out = []
    for b in range(px.shape[0]):
        k = rep.extra["row_tokens_per_layer"][b][-1] - 1
        source = rep.extra["source"][b, 1 : k + 1, 1:]  # (k, 16) one-hot: merged token j holds patch p
        assert (source.sum(0) == 1).all()
        groups = [int(source[:, p].nonzero()[0, 0]) for p in range(N_PATCHES)]
        out.append((model.model.multi_modal_projector(hs[b : b + 1, 1 : k + 1])[0], groups))
    return out


def _rope(x, pos, inv_freq):
    """RoPE of one position in the rotate-half layout, written out: pairs (d, d + D/2) rotated by pos * freq_d."""
    ang = pos * inv_freq
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def vtu_oracle(model, tokens, mapping):
    """Float64 logits of the merged sequence ``tokens`` (Lm, D) with the merge map ``mapping`` (full position ->
    merged index, positions 0..Lf-1), by plain loops over the full unmerged sequence in every layer."""
    lm = copy.deepcopy(model.model.language_model).double()
    head = copy.deepcopy(model.lm_head).double()
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    x = tokens.double()
    n_full, n_merged = len(mapping), x.shape[0]
    for layer in lm.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(n_merged, heads, d)
        k = a.k_proj(h).view(n_merged, kv_heads, d)
        v = a.v_proj(h).view(n_merged, kv_heads, d)
        out_full = torch.zeros(n_full, heads, d, dtype=torch.float64)
        for i in range(n_full):  # query at full position i, keys at full positions 0..i
            qi = _rope(q[mapping[i]], i, inv_freq)
            for hh in range(heads):
                g = hh // (heads // kv_heads)
                scores = torch.stack([_rope(k[mapping[j], g], j, inv_freq) @ qi[hh] for j in range(i + 1)]) / d**0.5
                p = scores.softmax(0)
                out_full[i, hh] = sum(p[j] * v[mapping[j], g] for j in range(i + 1))
        out = torch.zeros(n_merged, heads, d, dtype=torch.float64)
        for u in range(n_merged):  # re-merge: the mean over the full positions token u stands for
            mine = [i for i in range(n_full) if mapping[i] == u]
            out[u] = sum(out_full[i] for i in mine) / len(mine)
        x = x + a.o_proj(out.reshape(n_merged, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return head(lm.norm(x))


def _merged_sequence(model, p, tokens, groups):
    emb = model.model.get_input_embeddings()
    t = torch.tensor(p)
    s = p.index(3)
    k = tokens.shape[0]
    seq = torch.cat([emb(t[:s]), tokens, emb(t[s + N_PATCHES :])])
    mapping = list(range(s)) + [s + g for g in groups] + [s + k + i for i in range(len(p) - s - N_PATCHES)]
    return seq, mapping


@pytest.mark.parametrize("form", ["exact", "rope_linear"])
def test_logits_equal_float64_loop_oracle_of_the_definition(llava, form):
    prompts = _prompts()
    ids, mask = batch(prompts)
    px = pixels(2)
    images = merged_images(llava, px, THRESHOLDS)
    counts = [t.shape[0] for t, _ in images]
    assert counts[0] != counts[1] and max(counts) < N_PATCHES  # merged, differently per image
    tp.apply(llava, tp.DyMU(THRESHOLDS, unmerge="virtual", vtu_form=form))
    try:
        logits = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        rep = tp.last_report(llava)
        assert rep.visual_tokens_kept == counts
    finally:
        tp.remove(llava)
    cfg = llava.config.text_config
    hid, inter, kv = (cfg.hidden_size, cfg.intermediate_size,
                     cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads)
    for b, p in enumerate(prompts):  # FLOPs: projections and MLPs on the merged tokens, attention at full length
        nf, nm = len(p), len(p) - N_PATCHES + counts[b]
        linear = lambda n: 2 * n * hid * (2 * hid + 2 * kv) + 6 * n * hid * inter  # noqa: E731
        expected = 1 - (linear(nm) + 2 * nf * nf * hid) / (linear(nf) + 2 * nf * nf * hid)
        assert rep.flops_saved[b] == pytest.approx(expected, rel=1e-12)
    for b, p in enumerate(prompts):
        seq, mapping = _merged_sequence(llava, p, *images[b])
        ref = vtu_oracle(llava, seq, mapping)
        torch.testing.assert_close(logits[b, -ref.shape[0] :].double(), ref, atol=2e-5, rtol=1e-4)
    # without VTU the same merged tokens give other logits (the oracle tells the two apart)
    tp.apply(llava, tp.DyMU(THRESHOLDS))
    plain = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    tp.remove(llava)
    assert not torch.allclose(plain[0, -ref.shape[0] :], logits[0, -ref.shape[0] :], atol=1e-3)


@pytest.mark.parametrize("thresholds", [[None], [2.0, 2.0, 2.0]])
def test_identity_map_equals_stock_model(llava, thresholds):
    ids, mask = batch(_prompts())
    px = pixels(2)
    pos = positions_from_valid(mask.bool())
    ref = llava(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits
    ref_gen = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
    tp.apply(llava, tp.DyMU(thresholds, unmerge="virtual"))
    try:
        got = llava(input_ids=ids, attention_mask=mask, pixel_values=px, position_ids=pos).logits
        assert tp.last_report(llava).visual_tokens_kept == [N_PATCHES, N_PATCHES]
        gen = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
    finally:
        tp.remove(llava)
    assert all("forward" not in layer.self_attn.__dict__ for layer in llava.model.language_model.layers)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-4)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_rows_equal_rows_alone(llava, side):
    prompts = _prompts() + [prompt(1, N_PATCHES, 7, 2)]
    ids, mask = batch(prompts, side)
    px = pixels(3, seed=4)
    tp.apply(llava, tp.DyMU(THRESHOLDS, unmerge="virtual"))
    try:
        full = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        kept = tp.last_report(llava).visual_tokens_kept
        assert len(set(kept)) > 1
        for b, p in enumerate(prompts):
            one = llava(input_ids=torch.tensor([p]), pixel_values=px[b : b + 1]).logits[0]
            row = full[b, -one.shape[0] :] if side == "left" else full[b, : one.shape[0]]
            torch.testing.assert_close(row, one, atol=1e-5, rtol=1e-4)
    finally:
        tp.remove(llava)


def test_generate_with_cache_equals_full_recompute(llava):
    ids, mask = batch(_prompts())
    px = pixels(2)
    steps = 4
    tp.apply(llava, tp.DyMU(THRESHOLDS, unmerge="virtual"))
    try:
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=steps,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
        assert cache.get_seq_length() == ids.shape[1] + steps - 1  # the full (unmerged) prompt plus the steps
        seqs = out.sequences
        for t in range(steps):  # each step = a fresh VTU prefill of prompt + tokens so far, no cache
            n = ids.shape[1] + t
            m = torch.cat([mask, torch.ones(2, t, dtype=mask.dtype)], 1)
            ref = llava(input_ids=seqs[:, :n], attention_mask=m, pixel_values=px, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[t], ref, atol=1e-5, rtol=1e-4)
    finally:
        tp.remove(llava)


def test_forms_agree_on_padded_rows_with_grouped_heads():
    """The RoPE-linear form (no expanded q / k / v) = the exact form (expand, attend, re-merge), float64, on random
    merge maps with padding, 4 query heads over 2 key heads; the cache receives the same expanded keys / values."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, d, lm = 3, 4, 2, 8, 7
    q = torch.randn(b, h, lm, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, lm, d, generator=g, dtype=torch.float64) for _ in range(2))
    index = torch.randint(0, lm, (b, 12), generator=g)
    ok = torch.ones(b, 12, dtype=torch.bool)
    ok[1, :3] = False  # left padding
    ang = torch.rand(b, 12, d // 2, generator=g, dtype=torch.float64) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    stored = {}

    def store(name):
        def put(kf, vf):
            stored[name] = (kf, vf)
            return kf, vf
        return put

    exact = vtu.virtual_attention(q, k, v, index, ok, cos, sin, 0.3, store("exact"))
    linear = vtu.virtual_attention_rope_linear(q, k, v, index, ok, cos, sin, 0.3, store("linear"))
    torch.testing.assert_close(linear, exact, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(a, c) for a, c in zip(stored["exact"], stored["linear"], strict=True))
    assert stored["exact"][0].shape == (b, hkv, 12, d)
    full = torch.ones_like(ok)  # ok=None (no padding: SDPA's causal kernel) = an all-real mask
    ref = vtu.virtual_attention(q, k, v, index, full, cos, sin, 0.3)
    for form in (vtu.virtual_attention, vtu.virtual_attention_rope_linear):
        torch.testing.assert_close(form(q, k, v, index, None, cos, sin, 0.3), ref, rtol=1e-10, atol=1e-10)


def test_unmerge_argument_and_where_it_runs():
    with pytest.raises(ValueError, match=r"unmerge='full'"):
        tp.DyMU([0.5], unmerge="full")
    with pytest.raises(ValueError, match=r"vtu_form='fast'"):
        tp.DyMU([0.5], unmerge="virtual", vtu_form="fast")
    with pytest.raises(ValueError, match=r"unmerge='virtual'"):
        tp.apply(copy.deepcopy(tiny_llava(image_size=56).model.vision_tower), tp.DyMU([0.5], unmerge="virtual"))
    assert tp.DyMU([0.5], unmerge="virtual").capabilities.virtual_unmerge
    assert not tp.DyMU([0.5]).capabilities.virtual_unmerge


@pytest.mark.parametrize("family,error", [("llava_next", ValueError), ("qwen2_vl", NotImplementedError)])
def test_other_families_refuse_before_touching_the_model(family, error):
    from tp_tiny import tiny_qwen2vl

    model = tiny_llava(next_=True) if family == "llava_next" else tiny_qwen2vl()
    with pytest.raises(error):
        tp.apply(model, tp.DyMU([0.5], unmerge="virtual"))
    assert not hasattr(model, "_visattn_tokenprune")
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.language_model.layers)
