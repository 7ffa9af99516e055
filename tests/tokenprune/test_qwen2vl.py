"""Qwen2-VL / Qwen2.5-VL adapter (M-RoPE): FastV, DivPrune, CDPruner and ZipVL kept indices vs eager brute force,
KV-cache generation vs a layer-by-layer reference of the unpruned LLM with the same 3-D position ids (built by a plain
loop), batch rows (different image sizes, left padding) = single runs, full budget = unpruned model."""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

from test_cdpruner import greedy_map_loop, kernel_loop  # noqa: E402
from tp_oracles import (  # noqa: E402
    divprune_loop,
    mrope_positions,
    mrope_reference_logits,
    topk_sorted,
    zipvl_rule,
)
from tp_tiny import QWEN_IMAGE, as_eager, batch, qwen_pixels, qwen_prompt, tiny_qwen2vl  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

GRIDS = [(1, 4, 6), (1, 6, 8)]  # image_grid_thw: 6 and 12 merged tokens
N_TOK = [6, 12]
ROWS = [(3, 4, 1), (5, 2, 2)]
METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=3),
    "fastv-reindex": lambda: tp.FastV(layer=2, keep=0.5, positions="reindex"),
    "divprune": lambda: tp.DivPrune(keep=3),
    "random": lambda: tp.RandomPrune(keep=3, seed=1),
    "cdpruner": lambda: tp.CDPruner(keep=3),
    "dart": lambda: tp.DART(layer=2, keep=2, pivot_image=1, pivot_text=1),  # 1 pivot + 2 pivots x 1 = 3 kept
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
    "zipvl": lambda: tp.ZipVL(tau=0.6, layer=2),
}


EMBEDDING_STAGE = ("divprune", "random", "cdpruner")


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def setup(request):
    model = tiny_qwen2vl("sdpa", v25=request.param == "qwen2.5-vl")
    prompts = [qwen_prompt(p, n, s, seed) for (p, s, seed), n in zip(ROWS, N_TOK, strict=False)]
    return model, as_eager(model), prompts, qwen_pixels(GRIDS, seed=3)


def _kwargs(model, prompts, px, grids):
    ids, mask = batch(prompts)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_grid_thw=torch.tensor(grids))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    return kw


def _gen(model, pruner, kw, steps=3):
    if pruner is not None:
        tp.apply(model, pruner)
    try:
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        return out, tp.last_report(model)
    finally:
        if pruner is not None:
            tp.remove(model)


def _pixels_of(px, i):
    sizes = [t * h * w for t, h, w in GRIDS]
    return px[sum(sizes[:i]) : sum(sizes[: i + 1])]


def _features(eager, px):
    with torch.no_grad():
        f = eager.model.get_image_features(px, torch.tensor(GRIDS))
    return list(getattr(f, "pooler_output", f))


def test_positions_oracle_matches_model(setup):
    model, _, prompts, px = setup
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    try:
        kw = _kwargs(model, prompts[1:], _pixels_of(px, 1), GRIDS[1:])
        with torch.no_grad():
            model(**kw)
    finally:
        h.remove()
    pos = seen[0][-3:, 0]
    assert torch.equal(pos, mrope_positions(prompts[1], QWEN_IMAGE, GRIDS[1:]))
    assert len(set(pos[1].tolist())) > 1 and not torch.equal(pos[1], pos[2])  # really 3-D


@pytest.mark.parametrize("name", ["fastv", "divprune", "cdpruner", "zipvl"])
def test_kept_indices_match_eager_bruteforce(setup, name):
    model, eager, prompts, px = setup
    _, rep = _gen(model, METHODS[name](), _kwargs(model, prompts, px, GRIDS), steps=1)
    feats = _features(eager, px)
    for i, row in enumerate(prompts):
        s = row.index(QWEN_IMAGE)
        if name == "fastv":
            kw = _kwargs(eager, [row], _pixels_of(px, i), GRIDS[i : i + 1])
            with torch.no_grad():
                att = eager(**kw, output_attentions=True).attentions
            expected = topk_sorted(att[1][0, :, -1, s : s + N_TOK[i]].mean(0), 3)
        elif name == "zipvl":
            kw = _kwargs(eager, [row], _pixels_of(px, i), GRIDS[i : i + 1])
            with torch.no_grad():
                a = eager(**kw, output_attentions=True).attentions[1][0].double().mean(0)
            acc = [float(a[:, j].sum()) for j in range(s, s + N_TOK[i])]
            expected = zipvl_rule(acc, [acc[j - s] / (len(row) - j) for j in range(s, s + N_TOK[i])], 0.6)
        elif name == "cdpruner":
            with torch.no_grad():
                text = eager.model.language_model.embed_tokens(torch.tensor(row[s + N_TOK[i]:]))
            expected = greedy_map_loop(kernel_loop(feats[i], text), 3)
        else:
            expected = divprune_loop(feats[i], 3)
        assert rep.kept_indices[i][0].tolist() == expected


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_with_cache_matches_mrope_reference(setup, name):
    model, eager, prompts, px = setup
    steps = 3
    kw = _kwargs(model, prompts, px, GRIDS)
    out, rep = _gen(model, METHODS[name](), kw, steps)
    logits = torch.stack(out.logits, 1)
    gen = out.sequences[:, kw["input_ids"].shape[1] :]
    feats = _features(eager, px)
    emb = eager.model.language_model.embed_tokens
    for i, row in enumerate(prompts):
        s, n = row.index(QWEN_IMAGE), N_TOK[i]
        pos = mrope_positions(row, QWEN_IMAGE, GRIDS[i : i + 1])
        nxt = int(pos.max()) + 1
        pos = torch.cat([pos, (nxt + torch.arange(steps - 1))[None].expand(3, -1)], 1)
        with torch.no_grad():
            seq = emb(torch.cat([torch.tensor(row), gen[i][:-1]]))
            seq[s : s + n] = feats[i]
        stages, current = [], list(range(seq.shape[0]))
        layers = [1, 2, 3] if name == "pdrop" else [2]
        stage_kept = [sk[i][0] for sk in rep.extra["stage_kept"]] if name == "pdrop" else [rep.kept_indices[i][0]]
        for layer, kept in zip(layers, stage_kept, strict=False):
            kept = {s + int(k) for k in kept}
            keep = [j for j, o in enumerate(current) if not s <= o < s + n or o in kept]
            current = [current[j] for j in keep]
            stages.append((layer, keep))
        if name in EMBEDDING_STAGE:
            seq, pos, stages = seq[keep], pos[:, keep], []
        with torch.no_grad():
            ref = mrope_reference_logits(eager, seq[None], pos, stages, reindex=name in ("fastv-reindex", "pdrop"))
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["fastv", "divprune", "cdpruner", "dart", "zipvl"])
def test_batch_rows_equal_single_runs(setup, name):
    model, _, prompts, px = setup
    out, rep = _gen(model, METHODS[name](), _kwargs(model, prompts, px, GRIDS))
    assert rep.visual_tokens == N_TOK
    if name != "zipvl":  # ZipVL's count follows the attention mass
        assert rep.visual_tokens_kept == [3, 3]
    assert all(0 < k < n for k, n in zip(rep.visual_tokens_kept, N_TOK, strict=True))
    for i, row in enumerate(prompts):
        one, rep1 = _gen(model, METHODS[name](), _kwargs(model, [row], _pixels_of(px, i), GRIDS[i : i + 1]))
        assert rep1.kept_indices[0][0].tolist() == rep.kept_indices[i][0].tolist()
        for a, b in zip(out.logits, one.logits, strict=False):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)


def test_full_budget_is_identity_and_unsupported_refused(setup):
    model, _, prompts, px = setup
    kw = _kwargs(model, prompts, px, GRIDS)
    base, _ = _gen(model, None, kw)
    for pruner in (tp.FastV(layer=2, keep=12), tp.DivPrune(keep=1.0)):
        out, _ = _gen(model, pruner, kw)
        for a, b in zip(out.logits, base.logits, strict=False):
            torch.testing.assert_close(a, b)
    for pruner in (tp.FasterVLM(keep=3), tp.VisionZip(dominant=3, contextual=1), tp.SparseVLM(keep=3),
                   tp.ToMe(r=2)):
        with pytest.raises(NotImplementedError, match="Qwen2-VL"):
            tp.apply(model, pruner)
    with pytest.raises(ValueError, match="layer=4"):
        tp.apply(model, tp.FastV(layer=4, keep=3))


@pytest.mark.parametrize("name", ["fastv", "divprune"])
def test_right_padding_forward(setup, name):
    model, _, prompts, px = setup
    kw = _kwargs(model, prompts, px, GRIDS)
    ids, mask = batch(prompts, side="right")
    kw.update(input_ids=ids, attention_mask=mask)
    if "mm_token_type_ids" in kw:
        kw["mm_token_type_ids"] = (ids == QWEN_IMAGE).int()
    tp.apply(model, METHODS[name]())
    try:
        with torch.no_grad():
            full = model(**kw).logits
            for i, row in enumerate(prompts):
                one = model(**_kwargs(model, [row], _pixels_of(px, i), GRIDS[i : i + 1])).logits
                torch.testing.assert_close(full[i, : one.shape[1]], one[0], atol=2e-4, rtol=1e-4)
    finally:
        tp.remove(model)


def test_zipvl_kv_quantize(setup):
    """ZipVL kv='quantize' on M-RoPE: 16 bits = the stock model; at (4, 2) nothing is dropped, the low-bit cache
    changes the decode, and batch rows equal single runs."""
    model, _, prompts, px = setup
    kw = _kwargs(model, prompts, px, GRIDS)
    base, _ = _gen(model, None, kw)
    same, _ = _gen(model, tp.ZipVL(tau=0.6, kv="quantize", bits=(16, 16)), kw)
    for a, b in zip(same.logits, base.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    out, rep = _gen(model, tp.ZipVL(tau=0.6, kv="quantize"), kw)
    assert rep.visual_tokens_kept == N_TOK
    assert all(0 < len(k[0]) < n for k, n in zip(rep.extra["kv_important"], N_TOK, strict=True))
    assert all(s < f for s, f in zip(rep.extra["kv_bytes"], rep.extra["kv_bytes_fp16"], strict=True))
    assert (out.logits[1] - base.logits[1]).abs().max() > 1e-4
    for i, row in enumerate(prompts):
        one, rep1 = _gen(model, tp.ZipVL(tau=0.6, kv="quantize"), _kwargs(model, [row], _pixels_of(px, i),
                                                                          GRIDS[i : i + 1]))
        assert rep1.extra["kv_bytes"][0] == rep.extra["kv_bytes"][i]
        for a, b in zip(out.logits, one.logits, strict=True):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)
