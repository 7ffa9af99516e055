"""SparseVLM on LLaVA-1.5: stage selections vs eager brute force, KV-cache generation vs a hand-written
layer-by-layer reference (raters, scores, DPC-KNN recycling by loops), batch rows = single runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_oracles import projected_patches  # noqa: E402
from tp_tiny import as_eager, batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

N_IMG = 16
LAYERS, COUNTS = [0, 1, 2], [8, 5, 3]
ROWS = [(3, 9, 11), (6, 12, 12)]


def make(n: int = 3) -> tp.SparseVLM:
    return tp.SparseVLM(layers=LAYERS[:n], counts=COUNTS[:n])


@pytest.fixture(scope="module")
def setup():
    model = tiny_llava("sdpa")
    ids, mask = batch([prompt(p, N_IMG, s, seed) for p, s, seed in ROWS])
    return model, as_eager(model), ids, mask, pixels(2, seed=7)


def _generate(model, pruner, ids, mask, px, steps=3):
    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=steps,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out, tp.last_report(model)
    finally:
        tp.remove(model)


def _row(ids, mask, i):
    row = ids[i][mask[i].bool()]
    return row, int((row == 3).nonzero()[0])


def _raters(embeds: torch.Tensor, s: int, n_prompt: int) -> list[int]:
    """Text positions after the image whose mean (over visual tokens) softmax relevance exceeds the mean."""
    text = list(range(s + N_IMG, n_prompt))
    rel = []
    for t in text:
        per_v = [torch.exp(embeds[v] @ embeds[t]) / sum(torch.exp(embeds[v] @ embeds[u]) for u in text)
                 for v in range(s, s + N_IMG)]
        rel.append(float(sum(per_v) / N_IMG))
    mean = sum(rel) / len(rel)
    return [t for t, r in zip(text, rel, strict=False) if r > mean]


def _dpc_knn_loops(x: torch.Tensor, c: int) -> torch.Tensor:
    m, dim = x.shape
    d = [[float((x[i] - x[j]).norm()) / dim**0.5 for j in range(m)] for i in range(m)]
    dens = [torch.tensor(sorted(row)[:c]).pow(2).mean().neg().exp().item() for row in d]
    dmax = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(m) if dens[j] > dens[i]] or [dmax]) for i in range(m)]
    score = [parent[i] * dens[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
    groups = [[] for _ in centres]
    for i in range(m):
        g = centres.index(i) if i in centres else min(range(c), key=lambda k: (d[centres[k]][i], k))
        groups[g].append(x[i])
    return torch.stack([torch.stack(g).sum(0) / (len(g) + 1e-6) for g in groups])


def _reference(eager, row, s, px_row, gen):
    """Logits and per-stage selections of one unpadded row, all by hand with eager attention weights."""
    lm = eager.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens(torch.cat([row, gen]))
        emb[s : s + N_IMG] = projected_patches(eager, px_row)[0]
        raters = _raters(emb, s, len(row))
        h, n_vis, selections = emb[None], N_IMG, []
        for idx, layer in enumerate(lm.layers):
            n = h.shape[1]
            mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
            pe = lm.rotary_emb(h, torch.arange(n)[None])
            if idx in LAYERS:
                _, w = layer.self_attn(layer.input_layernorm(h), position_embeddings=pe, attention_mask=mask)
                shift = N_IMG - n_vis
                scores = w[0].mean(0)[[r - shift for r in raters], s : s + n_vis].mean(0)
            out = layer(h, attention_mask=mask, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
            if idx in LAYERS:
                k = min(COUNTS[LAYERS.index(idx)], n_vis - 1)
                keep = sorted(scores.topk(k).indices.tolist())
                gone = [j for j in range(n_vis) if j not in keep]
                top = sorted(gone, key=lambda j: -float(scores[j]))[: int(len(gone) * 0.3) + 1]
                merged = _dpc_knn_loops(h[0, [s + j for j in top]], int(len(top) / 10) + 1)
                vis = torch.cat([h[0, [s + j for j in keep]], merged])
                h = torch.cat([h[0, :s], vis, h[0, s + n_vis :]])[None]
                selections.append(keep)
                n_vis = vis.shape[0]
        return eager.lm_head(lm.norm(h))[0], selections


def test_stage_selection_matches_eager_output_attentions(setup):
    model, eager, ids, mask, px = setup
    _, rep = _generate(model, make(), ids, mask, px, steps=1)
    for i in range(2):
        row, s = _row(ids, mask, i)
        with torch.no_grad():
            emb = eager.model.language_model.embed_tokens(row)
            emb[s : s + N_IMG] = projected_patches(eager, px[i : i + 1])[0]
        raters = _raters(emb, s, len(row))
        assert raters, "the prompt must have raters"
        n_vis = N_IMG
        for st, layer in enumerate(LAYERS):
            if st:
                tp.apply(eager, make(st))
            try:
                with torch.no_grad():
                    att = eager(input_ids=row[None], pixel_values=px[i : i + 1], output_attentions=True).attentions
            finally:
                if st:
                    tp.remove(eager)
            shift = N_IMG - n_vis
            scores = att[layer][0].mean(0)[[r - shift for r in raters], s : s + n_vis].mean(0)
            k = min(COUNTS[st], n_vis - 1)
            assert rep.extra["stage_selected"][st][i][0].tolist() == sorted(scores.topk(k).indices.tolist())
            m = n_vis - k
            n_vis = k + int((int(m * 0.3) + 1) / 10) + 1
        assert rep.visual_tokens_kept[i] == n_vis


def test_generate_with_cache_matches_reference(setup):
    model, eager, ids, mask, px = setup
    steps = 3
    out, rep = _generate(model, make(), ids, mask, px, steps=steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, ids.shape[1] :]
    for i in range(2):
        row, s = _row(ids, mask, i)
        ref, selections = _reference(eager, row, s, px[i : i + 1], gen[i][:-1])
        assert [st[i][0].tolist() for st in rep.extra["stage_selected"]] == selections
        torch.testing.assert_close(logits[i], ref[-steps:], atol=2e-4, rtol=1e-4)


def test_batch_rows_equal_single_runs(setup):
    model, _, ids, mask, px = setup
    out, rep = _generate(model, make(), ids, mask, px)
    for i in range(2):
        row = ids[i][mask[i].bool()][None]
        one, rep1 = _generate(model, make(), row, torch.ones_like(row), px[i : i + 1])
        assert [k.tolist() for k in rep1.kept_indices[0]] == [k.tolist() for k in rep.kept_indices[i]]
        for a, b in zip(out.logits, one.logits, strict=False):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)


def test_schedule_and_bad_arguments(setup):
    assert [(st.score_layer, st.budget) for st in tp.SparseVLM(keep=64).stages()] == [(2, 66), (6, 30), (15, 17)]
    assert [st.budget for st in tp.create("sparsevlm", keep=192).stages()] == [300, 200, 110]
    assert [st.budget for st in tp.SparseVLM(keep=128).stages()] == [303, 110, 36]
    with pytest.raises(ValueError, match="counts"):
        tp.SparseVLM(layers=[1, 2], counts=[4])
    with pytest.raises(ValueError, match="layers"):
        tp.SparseVLM(layers=[2, 1], counts=[4, 2])
    with pytest.raises(ValueError, match="layers"):
        tp.apply(setup[0], tp.SparseVLM(layers=[1, 3], counts=[4, 2]))
