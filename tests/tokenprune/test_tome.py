"""ToMe in HF CLIP / open_clip towers (and LLaVA's tower) against brute-force loop and eager oracles."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_open_clip import images
from test_open_clip import oc_tower as open_clip_tower

from visattn import tokenprune as tp
from visattn.tokenprune.tome import bipartite_matching, merge_tokens, merge_weighted


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to each test (a module-level switch would leak into every later test file)."""
    with torch.no_grad():
        yield


# ------------------------------------------------------------------------------------------- loop oracles
def merge_loop(x, metric, size, sources, r, threshold=None):
    """One ToMe step on one sample with plain loops: returns (x, size, sources) lists. With ``threshold`` (DyMU's
    official instance-level rule) ``r`` is the number of A tokens whose best similarity exceeds it."""
    n = len(x)
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))

    def cos(i, j):
        return float(metric[i] @ metric[j]) / (float(metric[i].norm()) * float(metric[j].norm()))

    best = []
    for a in a_ids:
        if a == 0:
            best.append((-math.inf, None))
            continue
        sims = [cos(a, b) for b in b_ids]
        j = max(range(len(b_ids)), key=lambda t: sims[t])
        best.append((sims[j], j))
    if threshold is not None:
        r = sum(1 for s, _ in best if s > threshold)
    r = min(r, (n - 1) // 2)
    if r <= 0:
        return x, size, sources
    order = sorted(range(len(a_ids)), key=lambda i: -best[i][0])
    moved, rest = order[:r], sorted(order[r:])
    tot = [x[b] * size[b] for b in b_ids]
    sz = [size[b] for b in b_ids]
    src = [set(sources[b]) for b in b_ids]
    for i in moved:
        j, a = best[i][1], a_ids[i]
        tot[j] = tot[j] + x[a] * size[a]
        sz[j] = sz[j] + size[a]
        src[j] |= sources[a]
    new_x = [x[a_ids[i]] for i in rest] + [t / s for t, s in zip(tot, sz, strict=False)]
    new_size = [size[a_ids[i]] for i in rest] + sz
    new_src = [set(sources[a_ids[i]]) for i in rest] + src
    return new_x, new_size, new_src


def test_matching_and_weighted_merge_equal_loop_oracle():
    g = torch.Generator().manual_seed(0)
    for n, r in [(17, 4), (16, 5), (9, 10), (3, 1), (2, 1)]:
        x = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
        metric = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
        size = torch.randint(1, 4, (2, n, 1), generator=g).double()
        m = bipartite_matching(metric, r)
        for b in range(2):
            ox, osz, osrc = merge_loop(list(x[b]), metric[b], [float(s) for s in size[b, :, 0]],
                                       [{i} for i in range(n)], r)
            if m is None:
                assert len(ox) == n and min(r, (n - 1) // 2) <= 0
                continue
            got, got_size = merge_weighted(x, size, m)
            torch.testing.assert_close(got[b], torch.stack(ox))
            assert got_size[b, :, 0].tolist() == osz
            src = merge_tokens(torch.eye(n, dtype=torch.float64).expand(2, n, n), m, "amax")
            assert [set(row.nonzero()[:, 0].tolist()) for row in src[b]] == osrc
            assert got.shape[1] == n - min(r, (n - 1) // 2)
            assert torch.equal(got[b, 0], x[b, 0])  # [CLS] stays first, unmerged


# ----------------------------------------------------------------------------------------------- models
def hf_tower(seed=0, layers=3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           image_size=32, patch_size=8)
    m = CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").double().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m


def oc_tower(seed=0, layers=3):
    return open_clip_tower(seed, layers, output_tokens=True)


def eager_layer(x, size, sources, r, ln1, qkv, out_proj, ln2, mlp, heads, prop, threshold=None):
    """One ToMe layer on one sample (N, C): explicit per-head softmax with log-size bias, then the loop merge."""
    n, c = x.shape
    hd = c // heads
    q, k, v = qkv(ln1(x))
    attn = torch.zeros(n, c, dtype=x.dtype)
    bias = torch.tensor([math.log(s) for s in size], dtype=x.dtype) if prop else torch.zeros(n, dtype=x.dtype)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[:, sl] @ k[:, sl].T * hd**-0.5 + bias[None, :]
        attn[:, sl] = torch.softmax(logits, dim=-1) @ v[:, sl]
    x = x + out_proj(attn)
    metric = k.view(n, heads, hd).mean(1)
    xs, size, sources = merge_loop(list(x), metric, size, sources, r, threshold)
    x = torch.stack(xs)
    return x + mlp(ln2(x)), size, sources


def hf_oracle(model, px, schedule, prop=True, thresholds=None):
    """Per-layer outputs of a ToMe'd HF CLIP tower for one image (1, 3, H, W) (``thresholds``: DyMU's per-layer
    thresholds instead of ``schedule``'s r, None = no merge)."""
    x = model.pre_layrnorm(model.embeddings(px))[0]
    size, sources, outs = [1.0] * x.shape[0], [{i} for i in range(x.shape[0])], []
    thresholds = thresholds or [None] * len(schedule)
    for layer, r, t in zip(model.encoder.layers, schedule, thresholds, strict=False):
        at = layer.self_attn
        x, size, sources = eager_layer(
            x, size, sources, r, layer.layer_norm1,
            lambda h, at=at: (at.q_proj(h), at.k_proj(h), at.v_proj(h)), at.out_proj, layer.layer_norm2, layer.mlp,
            at.num_heads, prop, t)
        outs.append(x)
    return outs, size, sources


def oc_oracle(visual, px, schedule, prop=True, thresholds=None):
    x = visual._embeds(px)[0]
    size, sources, outs = [1.0] * x.shape[0], [{i} for i in range(x.shape[0])], []
    for i, (blk, r) in enumerate(zip(visual.transformer.resblocks, schedule, strict=False)):
        mha = blk.attn
        qkv = lambda h: torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)  # noqa
        t = None if thresholds is None else thresholds[i]
        x, size, sources = eager_layer(x, size, sources, r, blk.ln_1, qkv, mha.out_proj, blk.ln_2, blk.mlp,
                                       mha.num_heads, prop, t)
        outs.append(x)
    return outs, size, sources


@pytest.mark.parametrize("prop", [True, False])
@pytest.mark.parametrize("r", [2, [3, 0, 4]])
def test_hf_clip_layers_equal_eager_oracle(r, prop):
    model = hf_tower()
    px = images(2)
    tp.apply(model, tp.ToMe(r=r, prop_attn=prop, trace_source=True))
    out = model(px, output_hidden_states=True)
    rep = tp.last_report(model)
    schedule = tp.ToMe(r=r).schedule(3)
    for b in range(2):
        ref, size, sources = hf_oracle(model, px[b : b + 1], schedule, prop)
        for i, h in enumerate(ref):
            torch.testing.assert_close(out.hidden_states[i + 1][b], h)
        assert rep.extra["size"][b, :, 0].tolist() == size
        assert [set(s.nonzero()[:, 0].tolist()) for s in rep.extra["source"][b]] == sources
    assert rep.visual_tokens_kept == [out.last_hidden_state.shape[1] - 1] * 2
    assert rep.extra["tokens_per_layer"] == [h.shape[1] for h in out.hidden_states[1:]]


@pytest.mark.parametrize("prop", [True, False])
def test_open_clip_layers_equal_eager_oracle(prop):
    visual = oc_tower()
    px = images(2, seed=3)
    seen = []
    hooks = [blk.register_forward_hook(lambda m, a, o: seen.append(o)) for blk in visual.transformer.resblocks]
    tp.apply(visual, tp.ToMe(r=3, prop_attn=prop))
    pooled, tokens = visual(px)
    for h in hooks:
        h.remove()
    for b in range(2):
        ref, _, _ = oc_oracle(visual, px[b : b + 1], [3, 3, 3], prop)
        for got, want in zip(seen, ref, strict=False):
            torch.testing.assert_close(got[b], want)
        final = visual.ln_post(ref[-1])
        torch.testing.assert_close(tokens[b], final[1:])
        torch.testing.assert_close(pooled[b], final[0] @ visual.proj)
    assert tokens.shape[1] == 16 - 9


def test_r_zero_is_identical_and_remove_restores():
    model, visual, px = hf_tower(), oc_tower(), images(2)
    ref_hf, ref_oc = model(px).last_hidden_state, visual(px)
    tp.apply(model, "tome", r=0)
    tp.apply(visual, "tome", r=0)
    assert torch.equal(model(px).last_hidden_state, ref_hf)
    assert all(torch.equal(a, b) for a, b in zip(visual(px), ref_oc, strict=False))
    tp.apply(model, "tome", r=4, replace=True)
    tp.apply(visual, "tome", r=4, replace=True)
    assert model(px).last_hidden_state.shape[1] < ref_hf.shape[1]
    tp.remove(model)
    tp.remove(visual)
    assert torch.equal(model(px).last_hidden_state, ref_hf)
    assert all(torch.equal(a, b) for a, b in zip(visual(px), ref_oc, strict=False))


def test_batch_rows_equal_single_runs():
    model, visual, px = hf_tower(seed=2), oc_tower(seed=2), images(3, seed=5)
    tp.apply(model, tp.ToMe(r=[2, 5, 3]))
    tp.apply(visual, tp.ToMe(r=[2, 5, 3]))
    full_hf, full_oc = model(px).last_hidden_state, visual(px)[1]
    for b in range(3):
        torch.testing.assert_close(full_hf[b : b + 1], model(px[b : b + 1]).last_hidden_state)
        torch.testing.assert_close(full_oc[b : b + 1], visual(px[b : b + 1])[1])


def test_schedule_and_clamp():
    assert tp.ToMe(r=4).schedule(3) == [4, 4, 4]
    assert tp.ToMe(r=[1, 2]).schedule(4) == [1, 2, 0, 0]
    sched = tp.ToMe(r=8, inflect=0.5).schedule(5)
    assert sched == [int(4 + 2 * i) for i in range(5)] and sched[0] < sched[-1]
    model, px = hf_tower(), images(1)
    tp.apply(model, tp.ToMe(r=100))  # clamped to half of the 16 mergeable tokens per layer
    assert tp.last_report(model) is None
    model(px)
    assert tp.last_report(model).extra["tokens_per_layer"] == [9, 5, 3]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4", [], [2, -1], None])
def test_bad_r_raises(bad):
    with pytest.raises(ValueError, match=r"r="):
        tp.create("tome", r=bad)


def test_bad_arguments_and_models_raise():
    with pytest.raises(ValueError, match="inflect="):
        tp.ToMe(r=[1, 2], inflect=0.5)
    with pytest.raises(ValueError, match="prop_attn="):
        tp.ToMe(prop_attn="yes")
    with pytest.raises(ValueError, match=r"r=\[1, 1, 1, 1\]"):
        tp.apply(hf_tower(), tp.ToMe(r=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match="model=Linear"):
        tp.apply(torch.nn.Linear(2, 2), tp.ToMe())
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    custom = _build_vision_tower(16, CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=32,
                                                   qk_norm=True))
    with pytest.raises(ValueError, match="model=VisionTransformer"):
        tp.apply(custom, tp.ToMe())
    assert isinstance(tp.create("tome", r=2), tp.ToMe) and "tome" in tp.available()


# ---------------------------------------------------------------------------------------------- LLaVA
def test_llava_tower_merge_feeds_reduced_tokens_to_llm():
    from tp_tiny import batch, pixels, prompt, tiny_llava

    model = tiny_llava(image_size=56)
    prompts = [prompt(3, 16, 4, 0), prompt(6, 16, 2, 1)]
    ids, mask = batch(prompts)
    px = pixels(2)
    tower = copy.deepcopy(model.model.vision_tower)
    tp.apply(tower, tp.ToMe(r=2))
    feats = tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    proj = model.model.multi_modal_projector(feats)
    tp.apply(model, tp.ToMe(r=2))
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    rep = tp.last_report(model)
    assert rep.visual_tokens == [16, 16] and rep.visual_tokens_kept == [proj.shape[1]] * 2 == [12, 12]
    emb = model.model.get_input_embeddings()
    for b, p in enumerate(prompts):
        t = torch.tensor(p)
        s = p.index(3)
        seq = torch.cat([emb(t[:s]), proj[b], emb(t[s + 16 :])])[None]
        ref = model.model.language_model(inputs_embeds=seq).last_hidden_state
        ref = model.lm_head(ref)[0]
        torch.testing.assert_close(logits[b, -ref.shape[0] :], ref, atol=1e-5, rtol=1e-4)
    assert logits.shape[1] == max(len(p) for p in prompts) - 4
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
    tp.remove(model)
    assert out.shape == (2, ids.shape[1] + 3)
