"""DyMU's dynamic token merging (ToMe with a per-layer similarity threshold) in HF CLIP / open_clip towers and
LLaVA-1.5's tower, against plain-loop oracles of the official instance-level rule (``merge_loop`` with a
threshold: every A token whose best cosine similarity exceeds it merges, at most half of the mergeable tokens):
the matching on padded rows, every layer of the tower per image, batch rows of different lengths = single
runs, LLaVA logits = the language model run by hand on each image's merged tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from test_open_clip import images
from test_tome import hf_oracle, hf_tower, merge_loop, oc_oracle, oc_tower

from visattn import tokenprune as tp
from visattn.tokenprune.tome import merge_dynamic, survivors_dynamic, threshold_matching

HF_T = [0.99, 0.99, 0.99]  # per-image counts differ on these tiny towers (checked below)
OC_T = [0.9, 0.9, 0.9]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("deterministic", [False, True])  # scatter_reduce / one-hot matmul (CUDA's default)
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 0.8, 2.0])
def test_threshold_matching_on_padded_rows_equals_loop_oracle(threshold, deterministic):
    g = torch.Generator().manual_seed(1)
    lengths = [17, 12, 9, 2]  # padded to 17; the real tokens come first in each row
    n, c = max(lengths), 5
    x = torch.randn(len(lengths), n, c, generator=g, dtype=torch.float64)
    metric = torch.randn(len(lengths), n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (len(lengths), n, 1), generator=g).double()
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    m = threshold_matching(metric, valid, threshold)
    total, new_size = merge_dynamic(x * size, m, deterministic=deterministic), merge_dynamic(size, m)
    origin = survivors_dynamic(torch.arange(n).expand(len(lengths), n), m)
    for b, ln in enumerate(lengths):
        ox, osz, osrc = merge_loop(list(x[b, :ln]), metric[b, :ln], [float(s) for s in size[b, :ln, 0]],
                                   [{i} for i in range(ln)], 0, threshold)
        k = int(m.counts[b])
        assert k == len(ox)
        torch.testing.assert_close(total[b, :k] / new_size[b, :k], torch.stack(ox))
        assert new_size[b, :k, 0].tolist() == osz
        assert all(int(o) in s for o, s in zip(origin[b, :k], osrc, strict=True))  # each token's own identity
    assert m.width == max(int(k) for k in m.counts)


def test_hf_clip_layers_equal_eager_oracle():
    model = hf_tower(seed=2)
    px = images(3, seed=5)
    tp.apply(model, tp.DyMU(HF_T, trace_source=True))
    out = model(px, output_hidden_states=True)
    rep = tp.last_report(model)
    counts = rep.extra["row_tokens_per_layer"]
    assert len({tuple(c) for c in counts}) > 1  # the images keep different numbers of tokens
    for b in range(3):
        ref, size, sources = hf_oracle(model, px[b : b + 1], [0, 0, 0], thresholds=HF_T)
        for i, h in enumerate(ref):
            assert counts[b][i] == h.shape[0]
            torch.testing.assert_close(out.hidden_states[i + 1][b, : h.shape[0]], h)
        k = counts[b][-1]
        assert rep.extra["size"][b, :k, 0].tolist() == size
        assert [set(s.nonzero()[:, 0].tolist()) for s in rep.extra["source"][b, :k]] == sources
        assert rep.extra["valid"][b].tolist() == [True] * k + [False] * (out.last_hidden_state.shape[1] - k)
        assert all(int(i) + 1 in s for i, s in zip(rep.kept_indices[b][0], sources[1:], strict=True))
    assert rep.visual_tokens_kept == [c[-1] - 1 for c in counts]
    assert all(0 < f < 1 for f in rep.flops_saved) and len(set(rep.flops_saved)) > 1


def test_open_clip_layers_equal_eager_oracle():
    visual = oc_tower(seed=2)
    px = images(3, seed=5)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, a, o: seen.append(o)) for blk in visual.transformer.resblocks]
    tp.apply(visual, tp.DyMU(OC_T, prop_attn=False))
    pooled, tokens = visual(px)
    for h in hooks:
        h.remove()
    counts = tp.last_report(visual).extra["row_tokens_per_layer"]
    assert len({tuple(c) for c in counts}) > 1
    for b in range(3):
        ref, _, _ = oc_oracle(visual, px[b : b + 1], [0, 0, 0], prop=False, thresholds=OC_T)
        for got, want in zip(seen, ref, strict=True):
            torch.testing.assert_close(got[b, : want.shape[0]], want)
        final = visual.ln_post(ref[-1])
        torch.testing.assert_close(tokens[b, : final.shape[0] - 1], final[1:])
        torch.testing.assert_close(pooled[b], final[0] @ visual.proj)


def test_batch_rows_equal_single_runs():
    model, visual, px = hf_tower(seed=2), oc_tower(seed=2), images(3, seed=5)
    tp.apply(model, tp.DyMU(HF_T))
    tp.apply(visual, tp.DyMU(OC_T))
    full_hf, full_oc = model(px).last_hidden_state, visual(px)[1]
    for b in range(3):
        one_hf, one_oc = model(px[b : b + 1]).last_hidden_state, visual(px[b : b + 1])[1]
        torch.testing.assert_close(full_hf[b, : one_hf.shape[1]], one_hf[0])
        torch.testing.assert_close(full_oc[b, : one_oc.shape[1]], one_oc[0])


def test_no_thresholds_is_identical_and_remove_restores():
    model, px = hf_tower(), images(2)
    ref = model(px).last_hidden_state
    tp.apply(model, tp.DyMU([None, None]))
    assert torch.equal(model(px).last_hidden_state, ref)
    tp.apply(model, tp.DyMU([2.0, 2.0, 2.0]), replace=True)  # no similarity exceeds 2: nothing merges
    torch.testing.assert_close(model(px).last_hidden_state, ref)
    tp.remove(model)
    assert torch.equal(model(px).last_hidden_state, ref)


@pytest.mark.parametrize("kwargs,arg", [({"thresholds": []}, "thresholds"), ({"thresholds": 0.5}, "thresholds"),
                                        ({"thresholds": [0.5, "x"]}, "thresholds"),
                                        ({"thresholds": [float("nan")]}, "thresholds"),
                                        ({"thresholds": [True]}, "thresholds"),
                                        ({"thresholds": [0.5], "prop_attn": 1}, "prop_attn"),
                                        ({"thresholds": [0.5], "keep": 64}, "keep")])
def test_bad_arguments_raise_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=rf"{arg}="):
        tp.create("dymu", **kwargs)


def test_too_many_thresholds_refused_at_apply():
    with pytest.raises(ValueError, match=r"thresholds=\[0.5, 0.5, 0.5, 0.5\]: 4 values for a tower with 3 layers"):
        tp.apply(hf_tower(), tp.DyMU([0.5] * 4))


def test_llava_each_image_fills_its_own_slots():
    from tp_tiny import batch, pixels, prompt, tiny_llava

    model = tiny_llava(image_size=56)
    prompts = [prompt(3, 16, 4, 0), prompt(6, 16, 2, 1)]
    ids, mask = batch(prompts)
    px = pixels(2)
    thresholds = [0.99, 0.99]
    tower = copy.deepcopy(model.model.vision_tower)
    tp.apply(tower, tp.DyMU(thresholds))
    hs = tower(px, output_hidden_states=True).hidden_states[-2]
    counts = [row[-2] - 1 for row in tp.last_report(tower).extra["row_tokens_per_layer"]]
    assert counts[0] != counts[1] and max(counts) < 16
    proj = model.model.multi_modal_projector(hs[:, 1:])
    tp.apply(model, tp.DyMU(thresholds))
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    rep = tp.last_report(model)
    assert rep.visual_tokens == [16, 16] and rep.visual_tokens_kept == counts
    emb = model.model.get_input_embeddings()
    for b, p in enumerate(prompts):
        t = torch.tensor(p)
        s = p.index(3)
        seq = torch.cat([emb(t[:s]), proj[b, : counts[b]], emb(t[s + 16 :])])[None]
        ref = model.lm_head(model.model.language_model(inputs_embeds=seq).last_hidden_state)[0]
        torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
    for b, p in enumerate(prompts):  # a batch row generates as the row alone
        one = model.generate(input_ids=torch.tensor([p]), pixel_values=px[b : b + 1], max_new_tokens=3,
                             do_sample=False)
        assert out[b, -3:].tolist() == one[0, -3:].tolist()
    tp.remove(model)


# ------------------------------------------------------------------------------------ threshold finding
def layer0_batch_threshold(model, px, r):
    """The official batch-level threshold of layer 0 by plain loops: every image's A-token best similarities
    (keys of layer 0 averaged over heads; [CLS] excluded), all images together in descending order, the value at
    position r·B (the best pair left unmerged), clamped at 0."""
    layer = model.encoder.layers[0]
    heads = layer.self_attn.num_heads
    x = model.pre_layrnorm(model.embeddings(px))
    keys = layer.self_attn.k_proj(layer.layer_norm1(x))
    metric = keys.view(*keys.shape[:2], heads, -1).mean(2)
    n = x.shape[1]
    values = []
    for b in range(x.shape[0]):
        for a in range(0, n, 2):
            if a == 0:
                values.append(float("-inf"))
                continue
            values.append(max(float(metric[b, a] @ metric[b, j] / (metric[b, a].norm() * metric[b, j].norm()))
                              for j in range(1, n, 2)))
    values.sort(reverse=True)
    rb = min(r, (n - 1) // 2) * x.shape[0]
    return max(values[min(rb, len(values) - 1)], 0.0)


def test_find_thresholds_equals_official_batch_statistic():
    model = hf_tower(seed=2)
    batches = [images(3, seed=5), images(2, seed=6)]
    ref = model(batches[0]).last_hidden_state
    found = tp.find_thresholds(model, batches, r=[3, 0, 2])
    expected = sum(layer0_batch_threshold(model, px, 3) for px in batches) / 2
    assert found[0] == pytest.approx(expected, abs=1e-12)
    assert found[1] is None and isinstance(found[2], float) and found[2] >= 0.0
    assert not hasattr(model, "_visattn_tokenprune")  # the tower is left as it was
    torch.testing.assert_close(model(batches[0]).last_hidden_state, ref, rtol=0, atol=0)
    tp.apply(model, tp.DyMU(found))  # the result is DyMU's argument
    model(batches[0])
    rows = tp.last_report(model).extra["row_tokens_per_layer"]
    assert all(row[1] == row[0] for row in rows) and min(row[0] for row in rows) < 17  # layer 1 merges nothing


def test_batch_matching_merges_r_times_batch_pairs_of_the_whole_batch():
    from visattn.tokenprune.tome import batch_matching

    g = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 17, 4, generator=g, dtype=torch.float64)
    valid = torch.ones(3, 17, dtype=torch.bool)
    m, thr = batch_matching(metric, valid, 4)
    assert int(m.merged.sum()) == 12 and (m.counts == 17 - m.merged.sum(1)).all()
    unit = torch.nn.functional.normalize(metric, dim=-1)
    best = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).max(-1).values
    best[:, 0] = float("-inf")
    assert (best[m.merged] >= thr).all() and (best[~m.merged] <= thr).all()
    assert batch_matching(metric, valid, 0) == (None, None)
