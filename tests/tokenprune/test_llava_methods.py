"""LLaVA-1.5 adapter: kept indices vs eager brute force, KV-cache generation vs a layer-by-layer reference,
batch consistency, identity at full budget."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_oracles import (  # noqa: E402
    divprune_loop,
    llm_reference_logits,
    projected_patches,
    topk_sorted,
    vision_outputs,
    visionzip_tokens,
)
from tp_tiny import batch, pixels, prompt  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

N_IMG = 16  # (56 / 14) ** 2
ROWS = [(3, 4, 11), (6, 3, 12)]  # prefix, suffix, seed: different lengths -> left padding

METHODS = {
    "fastv": lambda: tp.FastV(layer=2, keep=5),
    "fastervlm": lambda: tp.FasterVLM(keep=5),
    "vtc-cls": lambda: tp.VTCCLS(keep=5, start_layer=0),
    "visionzip": lambda: tp.VisionZip(dominant=5, contextual=3),
    "divprune": lambda: tp.DivPrune(keep=5),
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]),
}


def _inputs(rows=ROWS, side="left"):
    ids, mask = batch([prompt(p, N_IMG, s, seed) for p, s, seed in rows], side)
    return ids, mask, pixels(len(rows), seed=7)


def _span(ids_row: torch.Tensor) -> int:
    return int((ids_row == 3).nonzero()[0])


def _generate(model, pruner, ids, mask, px, steps=3):
    tp.apply(model, pruner)
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=steps, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        return out, tp.last_report(model)
    finally:
        tp.remove(model)


def _oracle_kept(name, eager, ids, mask, px):
    """Expected kept indices per row (single image each) from eager attention / explicit loops."""
    expected = []
    with torch.no_grad():
        if name in ("fastervlm", "vtc-cls"):
            att = vision_outputs(eager, px).attentions
            for i in range(px.shape[0]):
                if name == "fastervlm":
                    sc = att[-2][i, :, 0, 1:].mean(0)
                else:
                    sc = sum(att[layer][i, :, 0, 1:].mean(0) for layer in range(0, len(att) - 1))
                expected.append(topk_sorted(sc, 5))
        elif name == "visionzip":
            expected = visionzip_tokens(eager, px, 5, 3)[1]
        elif name == "divprune":
            feats = projected_patches(eager, px)
            expected = [divprune_loop(feats[i], 5) for i in range(px.shape[0])]
        elif name == "fastv":
            for i in range(ids.shape[0]):
                row = ids[i][mask[i].bool()][None]
                out = eager(input_ids=row, pixel_values=px[i : i + 1], output_attentions=True)
                s = _span(row[0])
                expected.append(topk_sorted(out.attentions[1][0, :, -1, s : s + N_IMG].mean(0), 5))
    return expected


@pytest.mark.parametrize("name", ["fastv", "fastervlm", "vtc-cls", "visionzip", "divprune"])
def test_kept_indices_match_eager_bruteforce(models, name):
    model, eager = models
    ids, mask, px = _inputs()
    _, report = _generate(model, METHODS[name](), ids, mask, px, steps=1)
    got = [sorted(row[0].tolist()) for row in report.kept_indices]
    assert got == _oracle_kept(name, eager, ids, mask, px)


def test_pdrop_stages_match_eager_bruteforce(models):
    model, eager = models
    ids, mask, px = _inputs()
    layers, ratios = [1, 2, 3], [0.5, 0.25, 0.125]
    _, report = _generate(model, tp.PyramidDrop(layers, ratios), ids, mask, px, steps=1)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        s = _span(row[0])
        kept = list(range(N_IMG))
        for st in range(3):
            if st:
                tp.apply(eager, tp.PyramidDrop(layers[:st], ratios[:st]))
            try:
                with torch.no_grad():
                    att = eager(input_ids=row, pixel_values=px[i : i + 1], output_attentions=True).attentions
            finally:
                if st:
                    tp.remove(eager)
            scores = att[layers[st]][0, :, -1, s : s + len(kept)].mean(0)
            kept = [kept[j] for j in topk_sorted(scores, int(N_IMG * ratios[st]))]
            assert report.extra["stage_kept"][st][i][0].tolist() == kept


def _reference_sequence(name, eager, ids_row, px_row, report_row, stage_kept_row, gen):
    """Embeddings + stages for llm_reference_logits of one unpadded row followed by generated tokens."""
    emb = eager.model.language_model.embed_tokens
    s = _span(ids_row)
    with torch.no_grad():
        if name == "visionzip":
            tokens = visionzip_tokens(eager, px_row, 5, 3)[0][0]
            visual = eager.model.multi_modal_projector(tokens[None])[0]
        else:
            visual = projected_patches(eager, px_row)[0]
            if name in ("fastervlm", "vtc-cls", "divprune"):
                visual = visual[report_row[0]]
        text = emb(torch.cat([ids_row, gen]))
        seq = torch.cat([text[:s], visual, text[s + N_IMG :]])[None]
    stages = []
    if name in ("fastv", "pdrop"):
        current = list(range(seq.shape[1]))
        layer_list = [2] if name == "fastv" else [1, 2, 3]
        for layer, kept in zip(layer_list, stage_kept_row, strict=False):
            keep_orig = {s + int(k) for k in kept[0]}
            keep_idx = [j for j, o in enumerate(current) if not s <= o < s + N_IMG or o in keep_orig]
            current = [current[j] for j in keep_idx]
            stages.append((layer, keep_idx))
    return seq, stages


@pytest.mark.parametrize("name", list(METHODS))
def test_generate_with_cache_matches_layerwise_reference(models, name):
    model, eager = models
    ids, mask, px = _inputs()
    steps = 3
    out, report = _generate(model, METHODS[name](), ids, mask, px, steps=steps)
    gen = out.sequences[:, ids.shape[1] :]
    logits = torch.stack(out.logits, 1)  # (B, steps, V)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()]
        stage_kept = [sk[i] for sk in report.extra.get("stage_kept", [])]
        if name == "fastv":
            stage_kept = [report.kept_indices[i]]
        seq, stages = _reference_sequence(name, eager, row, px[i : i + 1], report.kept_indices[i], stage_kept,
                                          gen[i][:-1])
        with torch.no_grad():
            ref = llm_reference_logits(eager, seq, stages, reindex=name != "fastv")
        torch.testing.assert_close(logits[i], ref[0, -steps:], atol=2e-4, rtol=1e-4)


def rows_equal_single_runs(model, make, ids, mask, px):
    """Generate the left-padded batch with ``make()`` and every row alone: kept indices and logits must agree.
    Returns the batch's report."""
    out, report = _generate(model, make(), ids, mask, px)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        one, rep1 = _generate(model, make(), row, torch.ones_like(row), px[i : i + 1])
        assert [k.tolist() for k in rep1.kept_indices[0]] == [k.tolist() for k in report.kept_indices[i]]
        for a, b in zip(out.logits, one.logits, strict=False):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4)
    return report


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_rows_equal_single_runs(models, name):
    model, _ = models
    rows_equal_single_runs(model, METHODS[name], *_inputs())


@pytest.mark.parametrize("name", ["fastv", "visionzip", "pdrop"])
def test_right_padding_forward(models, name):
    model, _ = models
    ids, mask, px = _inputs(side="right")
    tp.apply(model, METHODS[name]())
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
            rep = tp.last_report(model)
            for i in range(ids.shape[0]):
                row = ids[i][mask[i].bool()][None]
                one = model(input_ids=row, pixel_values=px[i : i + 1]).logits
                n = one.shape[1]
                assert rep.visual_tokens_kept[i] == tp.last_report(model).visual_tokens_kept[0]
                torch.testing.assert_close(full[i, :n], one[0], atol=2e-4, rtol=1e-4)
    finally:
        tp.remove(model)


FULL_BUDGET = {
    "fastv": lambda: tp.FastV(layer=2, keep=N_IMG),
    "fastervlm": lambda: tp.FasterVLM(keep=1.0),
    "vtc-cls": lambda: tp.VTCCLS(keep=100, start_layer=0),
    "visionzip": lambda: tp.VisionZip(dominant=15, contextual=1),
    "divprune": lambda: tp.DivPrune(keep=N_IMG),
    "pdrop": lambda: tp.PyramidDrop(layers=[1, 2], ratios=[1.0, 1.0]),
    "dart": lambda: tp.DART(layer=2, keep=1.0, pivot_image=1, pivot_text=1),
    "vispruner": lambda: tp.VisPruner(keep=N_IMG),
    "cdpruner": lambda: tp.CDPruner(keep=1.0),
    "random": lambda: tp.RandomPrune(keep=N_IMG),
    "pooling": lambda: tp.Pooling(keep=1.0),
    "zipvl": lambda: tp.ZipVL(tau=1.0, layer=2),
}


@pytest.fixture(scope="module")
def unpruned(models):
    """The stock model's generate() logits and forward logits on the test batch (computed once)."""
    model, _ = models
    ids, mask, px = _inputs()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        base = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    return ref.logits, base


@pytest.mark.parametrize("name", list(FULL_BUDGET))
def test_full_budget_is_identity(models, unpruned, name):
    model, _ = models
    ids, mask, px = _inputs()
    ref_logits, base = unpruned
    out, report = _generate(model, FULL_BUDGET[name](), ids, mask, px)
    assert report.visual_tokens_kept == [N_IMG, N_IMG]
    for a, b in zip(out.logits, ref_logits, strict=False):
        torch.testing.assert_close(a, b)
    tp.apply(model, FULL_BUDGET[name]())
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, pixel_values=px).logits, base)
    finally:
        tp.remove(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, pixel_values=px).logits, base)
