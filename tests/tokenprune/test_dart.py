"""DART on a tiny random LLaVA-1.5: kept indices = a plain transcription of the official rule computed from the
eager model's own hidden states (pivots by the L1 norm of layer K-1's rotary keys, rebuilt with transformers'
``apply_rotary_pos_emb``; duplicates by float64 cosine similarity on the final-normed input of layer K; pivots
visited in the order of a Python set of their positions, as the official loop); generate() with KV cache = a
layer-by-layer reference of the sequence pruned before layer K (original positions); batch rows = single runs;
bad arguments."""

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
from tp_oracles import llm_reference_logits  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402

K = 2


def dart_oracle(eager, row: torch.Tensor, px: torch.Tensor, budget, p_img: int, p_txt: int) -> list[int]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = eager.model.language_model
    with torch.no_grad():
        hs = eager(input_ids=row[None], pixel_values=px, output_hidden_states=True).hidden_states
        layer = lm.layers[K - 1]
        x = layer.input_layernorm(hs[K - 1])
        attn = layer.self_attn
        k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, torch.arange(x.shape[1])[None])
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        norms = k[0].double().abs().sum((0, 2)).tolist()  # (L,)
        hid = lm.norm(hs[K])[0].double()
    s = _span(row)
    image, text = list(range(s, s + N_IMG)), list(range(s + N_IMG, row.shape[0]))
    img_piv = sorted(image, key=lambda i: (-norms[i], i))[:p_img]
    txt_piv = sorted(text, key=lambda i: (-norms[i], i))[:p_txt]
    share = int((budget if isinstance(budget, int) else budget * N_IMG) // (p_img + p_txt))
    kept, left = set(img_piv), [i for i in image if i not in img_piv]
    for p in list(set(img_piv + txt_piv)):
        sims = {i: float(torch.nn.functional.cosine_similarity(hid[p], hid[i], dim=0)) for i in left}
        chosen = sorted(left, key=lambda i: (sims[i], i))[: min(share, len(left))]
        kept |= set(chosen)
        left = [i for i in left if i not in chosen]
    return sorted(i - s for i in kept)


@pytest.mark.parametrize("budget,p_img,p_txt", [(8, 2, 2), (0.5, 3, 1), (6, 1, 3)])
def test_kept_and_generate_match_oracle(models, budget, p_img, p_txt):
    model, eager = models
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.DART(layer=K, keep=budget, pivot_image=p_img, pivot_text=p_txt), ids, mask,
                            px)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()]
        expected = dart_oracle(eager, row, px[i : i + 1], budget, p_img, p_txt)
        assert report.kept_indices[i][0].tolist() == expected
        seq, stages = _reference_sequence("fastv", eager, row, px[i : i + 1], report.kept_indices[i],
                                          [report.kept_indices[i]], gen[i][:-1])
        with torch.no_grad():
            ref = llm_reference_logits(eager, seq, stages, reindex=False)
        torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_batch_rows_equal_single_runs(models, positions):
    model, _ = models
    ids, mask, px = _inputs()
    make = lambda: tp.DART(layer=K, keep=8, pivot_image=2, pivot_text=2, positions=positions)  # noqa: E731
    report = rows_equal_single_runs(model, make, ids, mask, px)
    assert report.visual_tokens_kept == [10, 10]  # 2 image pivots + 4 pivots x 2


@pytest.mark.parametrize("kwargs,arg", [({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"), ({"layer": 0}, "layer"),
                                        ({"pivot_image": 0}, "pivot_image"), ({"pivot_text": -1}, "pivot_text"),
                                        ({"positions": "shift"}, "positions")])
def test_bad_arguments_raise_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=rf"{arg}="):
        tp.create("dart", **{"keep": 4, **kwargs})


def test_layer_out_of_range_refused_at_apply(models):
    model, _ = models
    with pytest.raises(ValueError, match=r"layer=4"):
        tp.apply(model, tp.DART(layer=4, keep=4))
    assert not hasattr(model, "_visattn_tokenprune")


def test_language_model_without_final_norm_refused(models, monkeypatch):
    model, _ = models
    monkeypatch.setattr(model.model.language_model, "norm", None)
    with pytest.raises(ValueError, match=r"model=LlavaForConditionalGeneration: dart .*no `norm` module"):
        tp.apply(model, tp.DART(layer=2, keep=4))
    assert not hasattr(model, "_visattn_tokenprune")


# ------------------------------------------------------------ the batched selection on synthetic layouts


def dart_rule(norms: list[float], hid: torch.Tensor, image: list[int], text: list[int], start: int, budget,
              p_img: int, p_txt: int) -> list[int]:
    """The official rule on one image, float64, as plain loops: ``norms`` per column, ``hid`` (L, C) per column,
    the image's and the instruction's columns, the row's first real column (positions = column - start).
    Ties: the larger norm / smaller similarity first, then the earlier token."""
    img_piv = sorted(image, key=lambda i: (-norms[i], i))[:p_img]
    txt_piv = sorted(text, key=lambda i: (-norms[i], i))[:p_txt]
    share = int((budget if isinstance(budget, int) else budget * len(image)) // (p_img + p_txt))
    kept, left = set(img_piv), [i for i in image if i not in img_piv]
    by_pos = {c - start: c for c in img_piv + txt_piv}
    for p in list(set([c - start for c in img_piv] + [c - start for c in txt_piv])):
        c = by_pos[p]
        sims = {i: float(torch.nn.functional.cosine_similarity(hid[c], hid[i], dim=0)) for i in left}
        chosen = sorted(left, key=lambda i: (sims[i], i))[: min(share, len(left))]
        kept |= set(chosen)
        left = [i for i in left if i not in chosen]
    return sorted(image.index(i) for i in kept)


def _synthetic(seed: int, rows: list[tuple[int, list[int], int]], width: int = 12):
    """Left-padded layout of rows (prefix text, image sizes, suffix text) with random key norms and hidden states;
    norms rounded (ties among pivots) and some hidden states repeated (tied similarities)."""
    g = torch.Generator().manual_seed(seed)
    lens = [pre + sum(imgs) + suf for pre, imgs, suf in rows]
    length = max(lens)
    image = torch.full((len(rows), length), -1)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    counts, j = [], 0
    for b, (pre, imgs, _) in enumerate(rows):
        s = length - lens[b]
        valid[b, s:] = True
        s += pre
        for n in imgs:
            image[b, s : s + n] = j
            counts.append(n)
            s, j = s + n, j + 1
    scores = (torch.rand(len(rows), length, generator=g) * 4).round()
    hidden = torch.randn(len(rows), length, width, generator=g)
    hidden[:, 1::5] = hidden[:, ::5][:, : hidden[:, 1::5].shape[1]]
    return scores, hidden, image, valid, counts


ROWS_SYN = [(3, [9, 7], 5), (2, [9], 1), (0, [6, 9, 4], 0), (4, [8], 9)]


@pytest.mark.parametrize("budget,p_img,p_txt", [(8, 2, 2), (12, 3, 3), (0.9, 2, 4), (2, 3, 3), (40, 1, 1)])
def test_batched_selection_matches_rule(budget, p_img, p_txt):
    from visattn.tokenprune.hf_llm import select_hidden_batched, select_hidden_per_image

    pruner = tp.DART(layer=K, keep=budget, pivot_image=p_img, pivot_text=p_txt)
    for seed in range(3):
        scores, hidden, image, valid, counts = _synthetic(seed, ROWS_SYN)
        keep, sel, last = select_hidden_batched(pruner, 0, scores, hidden, image, valid, counts)
        keep1, sel1, last1 = select_hidden_per_image(pruner, 0, scores, hidden, image, valid,
                                                     [[(0, 0)] * len(r[1]) for r in ROWS_SYN])
        length, j = valid.shape[1], 0
        expected_keep = (image < 0) & valid
        for b in range(len(ROWS_SYN)):
            cols = [c for c in range(length) if valid[b, c]]
            start = cols[0]
            first = min(c for c in cols if image[b, c] >= 0)
            text = [c for c in cols if image[b, c] < 0 and c > first]
            for _ in ROWS_SYN[b][1]:
                own = [c for c in cols if image[b, c] == j]
                expected = dart_rule(scores[b].tolist(), hidden[b].double(), own, text, start, budget, p_img, p_txt)
                assert sel[j].tolist() == expected, (seed, j)
                assert sel1[j].tolist() == expected, (seed, j)
                assert int(last[j]) == int(last1[j]) == b * length + own[expected[-1]]
                for i in expected:
                    expected_keep[b, own[i]] = True
                j += 1
        assert torch.equal(keep, expected_keep) and torch.equal(keep1, expected_keep)


def test_time_dart_script_tiny(tmp_path):
    """benchmarks/time_dart.py at toy sizes on the CPU: both forms keep the same tokens in every configuration
    (B8, B1, a left-padded B8 with shorter texts) and the result is strict JSON."""
    from bench_scripts import load_benchmark, read_strict_json

    out = tmp_path / "time-dart.json"
    assert load_benchmark("time_dart").main(["--tiny", "--out", str(out)]) == 0
    result = read_strict_json(out)
    rows = result["rows"]
    assert [(r["shape"], r["keep"]) for r in rows] == [(s, k) for s in ("b8", "b1", "b8-padded") for k in (4, 8)]
    assert all(r["equal"] and r["batched_ms"] > 0 for r in rows)
    # keep 8 with 4 + 4 pivots: a share of 8 // 8 = 1 token per pivot, 4 image pivots + 8 x 1 = 12 of 16 tokens
    assert rows[1]["kept_per_image"] == [12] * 8
