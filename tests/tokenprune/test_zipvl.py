"""ZipVL on a tiny random LLaVA-1.5 (and Qwen2-VL): kept indices = a float64 transcription of the paper's rule
computed from the eager model's own attention probabilities of layer K-1 (keep count: the fewest image tokens
whose accumulated attention — column sums over every query row, heads averaged — reaches tau of the image's;
which tokens: the largest accumulated attention divided by the number of rows that see the token); the rule alone
on hand-made and random scores; the attention mass on a padded, chunked batch = the eager attention's column sums
row by row; generate() with KV cache = a layer-by-layer reference of the sequence pruned before layer K; batch
rows = single runs; bad arguments."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_methods import (  # noqa: E402
    N_IMG,
    _generate,
    _inputs,
    _reference_sequence,
    _span,
    rows_equal_single_runs,
)
from tp_oracles import llm_reference_logits, zipvl_rule  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune.scoring import decoder_attention_mass  # noqa: E402

K = 2


def zipvl_oracle(eager, row: torch.Tensor, px: torch.Tensor, tau: float) -> list[int]:
    with torch.no_grad():
        att = eager(input_ids=row[None], pixel_values=px, output_attentions=True).attentions[K - 1][0]
    a = att.double().mean(0)  # (L, L): heads averaged, every query row
    length = a.shape[0]
    s = _span(row)
    image = range(s, s + N_IMG)
    acc = [float(a[:, j].sum()) for j in image]
    norm = [acc[j - s] / (length - j) for j in image]  # rows i >= j see key j
    return zipvl_rule(acc, norm, tau)


def test_rule_on_hand_made_scores():
    # accumulated 5,1,1,1,2 (total 10): tau 0.7 needs 5+2 -> p = 2; normalised by 10,9,8,7,6 rows -> tokens 0, 4
    acc = torch.tensor([5.0, 1.0, 1.0, 1.0, 2.0])
    scores = torch.stack([acc, acc / torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0])], -1)
    z = tp.ZipVL(tau=0.7)
    kept = z.select_image(0, scores, torch.zeros(5, 4), torch.zeros(0), torch.zeros(0, 4), list(range(5)), [])
    assert kept.tolist() == [0, 4]
    assert tp.ZipVL(tau=0.5).select_image(0, scores, None, None, None, [], []).tolist() == [0]
    assert tp.ZipVL(tau=1.0).select_image(0, scores, None, None, None, [], []).tolist() == [0, 1, 2, 3, 4]
    # the count follows the accumulated scores, the choice the normalised ones: here they disagree
    scores[:, 1] = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3])
    assert tp.ZipVL(tau=0.7).select_image(0, scores, None, None, None, [], []).tolist() == [1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_rule_matches_transcription_on_random_scores(seed):
    g = torch.Generator().manual_seed(seed)
    n = 40
    acc = torch.rand(n, generator=g, dtype=torch.float64) ** 4  # skewed, like attention
    norm = acc / torch.arange(n + 20, 20, -1, dtype=torch.float64)
    for tau in (0.1, 0.5, 0.9, 0.99, 1.0):
        got = tp.ZipVL(tau=tau).select_image(0, torch.stack([acc, norm], -1), None, None, None, [], [])
        assert got.tolist() == zipvl_rule(acc.tolist(), norm.tolist(), tau), tau


def test_attention_mass_of_a_padded_chunked_batch_equals_eager_columns(models):
    """Two rows of different lengths, left-padded with junk, query rows in chunks of one: per row the mass is
    the eager attention's column sums (heads averaged) and the row count is length - j."""
    _, eager = models
    ids, mask, px = _inputs()
    lm = eager.model.language_model
    layer = lm.layers[K - 1]
    rows, hs, atts = [], [], []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()]
            out = eager(input_ids=row[None], pixel_values=px[i : i + 1], output_attentions=True,
                        output_hidden_states=True)
            rows.append(row.shape[0])
            hs.append(out.hidden_states[K - 1][0])
            atts.append(out.attentions[K - 1][0].double().mean(0))
        length = max(rows) + 1
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(len(rows), length, hs[0].shape[-1], generator=g)
        pos = torch.zeros(len(rows), length, dtype=torch.long)
        valid = torch.zeros(len(rows), length, dtype=torch.bool)
        for b, (n, h) in enumerate(zip(rows, hs, strict=True)):
            hidden[b, length - n :] = h
            pos[b, length - n :] = torch.arange(n)
            valid[b, length - n :] = True
        cos, sin = lm.rotary_emb(hidden, pos)
        heads = layer.self_attn.config.num_attention_heads
        mass, seen = decoder_attention_mass(layer, hidden, cos, sin, valid, max_elements=len(rows) * heads * length)
    for b, (n, a) in enumerate(zip(rows, atts, strict=True)):
        torch.testing.assert_close(mass[b, length - n :].double(), a.sum(0), atol=1e-5, rtol=1e-5)
        assert seen[b].tolist() == [0.0] * (length - n) + [float(n - j) for j in range(n)]
        assert (mass[b, : length - n] == 0).all()


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9])
def test_kept_and_generate_match_oracle(models, tau):
    model, eager = models
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.ZipVL(tau=tau, layer=K), ids, mask, px)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()]
        expected = zipvl_oracle(eager, row, px[i : i + 1], tau)
        assert report.kept_indices[i][0].tolist() == expected
        assert 1 < len(expected) < N_IMG  # a real, dynamic cut
        seq, stages = _reference_sequence("fastv", eager, row, px[i : i + 1], report.kept_indices[i],
                                          [report.kept_indices[i]], gen[i][:-1])
        with torch.no_grad():
            ref = llm_reference_logits(eager, seq, stages, reindex=False)
        torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


def test_keep_count_grows_with_tau(models):
    model, _ = models
    ids, mask, px = _inputs()
    counts = [_generate(model, tp.ZipVL(tau=t, layer=K), ids, mask, px, steps=1)[1].visual_tokens_kept
              for t in (0.2, 0.5, 0.8, 1.0)]
    for a, b in zip(counts, counts[1:], strict=False):
        assert all(x <= y for x, y in zip(a, b, strict=True))
    assert counts[-1] == [N_IMG, N_IMG] and counts[0] != counts[-2]


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_batch_rows_equal_single_runs(models, positions):
    model, _ = models
    report = rows_equal_single_runs(model, lambda: tp.ZipVL(tau=0.6, layer=K, positions=positions), *_inputs())
    assert all(1 < k < N_IMG for k in report.visual_tokens_kept)


@pytest.mark.parametrize("kwargs,arg", [({"tau": 0}, "tau"), ({"tau": 1.5}, "tau"), ({"tau": True}, "tau"),
                                        ({"tau": "0.9"}, "tau"), ({"tau": -0.1}, "tau"), ({"layer": 0}, "layer"),
                                        ({"layer": 1.0}, "layer"), ({"positions": "shift"}, "positions")])
def test_bad_arguments_raise_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=rf"{arg}="):
        tp.create("zipvl", **kwargs)


def test_keep_budget_refused():
    with pytest.raises(ValueError, match=r"keep=64: ZipVL has no fixed budget"):
        tp.create("zipvl", keep=64)
    assert isinstance(tp.create("zip-vl", tau=0.9), tp.ZipVL)


def test_layer_out_of_range_refused_at_apply(models):
    model, _ = models
    with pytest.raises(ValueError, match=r"layer=4"):
        tp.apply(model, tp.ZipVL(layer=4))
    assert not hasattr(model, "_visattn_tokenprune")
