"""The score-free baselines ``random`` and ``pooling`` on a tiny random LLaVA-1.5: kept indices against the
documented rule (a seeded ``randperm`` / the window corners), uniformity of the random draw over seeds, generate()
with KV cache on a left-padded batch against a layer-by-layer eager run of the pruned sequence (pooling: the
window means computed by a plain loop over the patch grid), batch rows = single runs, budget errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_custom_method import _check_before_llm  # noqa: E402
from test_llava_methods import N_IMG, _generate, _inputs, _span, rows_equal_single_runs  # noqa: E402
from tp_oracles import llm_reference_logits, vision_outputs  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402


def test_random_subset_is_a_seeded_uniform_draw():
    emb = torch.randn(3, 16, 8)
    sel = tp.RandomPrune(keep=5, seed=11).select(emb)
    expected = sorted(torch.randperm(16, generator=torch.Generator().manual_seed(11))[:5].tolist())
    assert sel.tolist() == [expected] * 3
    assert tp.RandomPrune(keep=5, seed=11).select(emb).tolist() == sel.tolist()  # deterministic
    assert tp.RandomPrune(keep=5, seed=12).select(emb).tolist() != sel.tolist()
    counts = torch.zeros(16)
    for seed in range(1600):
        counts[tp.RandomPrune(keep=4, seed=seed).select(emb[:1])[0]] += 1
    # each index is kept with probability 4/16: 400 of 1600 expected, binomial sd ~17
    assert counts.sum() == 6400 and (counts - 400).abs().max() < 80, counts


def test_bad_seed_and_pooled_budget_raise_naming_the_argument(models):
    model, _ = models
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match=r"seed="):
            tp.create("random", keep=4, seed=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"keep="):
            tp.create("pooling", keep=bad)
    with pytest.raises(ValueError, match=r"keep=5: .*valid: \[1, 4, 16\] \(nearest: 4\)"):
        tp.apply(model, tp.Pooling(keep=5))  # at apply: the 4x4 grid is known from the config
    assert not hasattr(model, "_visattn_tokenprune")
    with pytest.raises(ValueError, match=r"keep=0.3: 5 tokens .*valid: \[1, 4, 16\]"):
        tp.Pooling(keep=0.3).output_count(16)
    with pytest.raises(ValueError, match=r"square patch grid"):
        tp.Pooling(keep=4).output_count(15)
    assert [tp.Pooling(keep=k).output_count(576) for k in (144, 64, 36, 0.25, 576, 1000)] == [144, 64, 36, 144,
                                                                                             576, 576]


def test_random_generate_matches_reference(models):
    model, eager = models
    expected = sorted(torch.randperm(N_IMG, generator=torch.Generator().manual_seed(0))[:5].tolist())
    _check_before_llm(model, eager, "random", lambda i, px, feats: expected)


def _pooled_loop(hidden: torch.Tensor, window: int) -> torch.Tensor:
    """(P, C) patch features of a square grid → (P / window², C) window means, raster order, by loops."""
    side = int(round(hidden.shape[0] ** 0.5))
    out = []
    for r in range(0, side, window):
        for c in range(0, side, window):
            cells = [hidden[(r + i) * side + c + j] for i in range(window) for j in range(window)]
            out.append(torch.stack(cells).double().mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("keep", [4, 1])
def test_pooling_generate_matches_reference(models, keep):
    model, eager = models
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.create("pooling", keep=keep), ids, mask, px)
    window = 4 // int(keep**0.5)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    with torch.no_grad():
        hidden = vision_outputs(eager, px).hidden_states[-2][:, 1:]  # the projector input
        for i in range(ids.shape[0]):
            corners = [r * 4 + c for r in range(0, 4, window) for c in range(0, 4, window)]
            assert report.kept_indices[i][0].tolist() == corners and report.visual_tokens_kept[i] == keep
            visual = eager.model.multi_modal_projector(_pooled_loop(hidden[i], window).float())
            row = ids[i][mask[i].bool()]
            s = _span(row)
            text = eager.model.language_model.embed_tokens(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], visual, text[s + N_IMG:]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
            torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: tp.RandomPrune(keep=5, seed=4), lambda: tp.Pooling(keep=4)],
                         ids=["random", "pooling"])
def test_batch_rows_equal_single_runs(models, make):
    rows_equal_single_runs(models[0], make, *_inputs())
