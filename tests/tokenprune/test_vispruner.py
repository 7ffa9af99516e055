"""VisPruner on tiny random LLaVA-1.5 models: kept patches = a plain-loop transcription of the official rule
(important by the eager model's [CLS] attention of vision layer -2, heads averaged; diverse by iterative
even/odd matching and removal on the cosine similarity of hidden_states[-2] patches) on a 64-patch grid, where
the official index arithmetic holds, and on the 16-patch grid (odd residual sets: the documented continuation);
generate() with KV cache = a layer-by-layer reference; batch rows = single runs; bad arguments."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_methods import _generate, rows_equal_single_runs  # noqa: E402
from tp_oracles import llm_reference_logits, projected_patches, vision_outputs, vispruner_removal_loop  # noqa: E402
from tp_tiny import as_eager, batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402


def vispruner_loop(attn_row: torch.Tensor, feats: torch.Tensor, keep: int, ratio: float) -> list[int]:
    """One image: ``attn_row`` (P,) [CLS] attention, ``feats`` (P, C) projector-input features."""
    t_imp = int(keep * ratio)
    t_div = keep - t_imp
    scores = attn_row.double().tolist()
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    important, residual = order[:t_imp], order[t_imp:]
    if t_div > 0:
        residual = vispruner_removal_loop(feats, residual, t_div)
    return sorted(important + (residual if t_div > 0 else []))


CASES = {  # image size (patches), keep, important ratio
    "64-patches": (112, 64, 16, 0.5),
    "64-patches-r0.25": (112, 64, 20, 0.25),
    "16-patches-odd": (56, 16, 5, 0.5),
}


_MODELS: dict = {}


def _models(size: int):
    """The tiny LLaVA with ``size``-pixel images (16 or 64 patches) and its eager copy, built once."""
    if size not in _MODELS:
        model = tiny_llava("sdpa", image_size=size)
        _MODELS[size] = (model, as_eager(model))
    return _MODELS[size]


def _inputs(size: int, n_img: int, rows=((3, 4, 11), (6, 3, 12))):
    ids, mask = batch([prompt(p, n_img, s, seed) for p, s, seed in rows])
    return ids, mask, pixels(len(rows), size=size, seed=7)


@pytest.mark.parametrize("case", list(CASES))
def test_kept_and_generate_match_loop_oracle(case):
    size, n_img, keep, ratio = CASES[case]
    model, eager = _models(size)
    ids, mask, px = _inputs(size, n_img)
    out, report = _generate(model, tp.VisPruner(keep=keep, important_ratio=ratio), ids, mask, px)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    with torch.no_grad():
        vis = vision_outputs(eager, px)
        proj = projected_patches(eager, px)
        for i in range(ids.shape[0]):
            expected = vispruner_loop(vis.attentions[-2][i, :, 0, 1:].mean(0), vis.hidden_states[-2][i, 1:], keep,
                                      ratio)
            assert report.kept_indices[i][0].tolist() == expected
            row = ids[i][mask[i].bool()]
            s = int((row == 3).nonzero()[0])
            text = eager.model.language_model.embed_tokens(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], proj[i][expected], text[s + n_img:]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
            torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [56, 112])
def test_batch_rows_equal_single_runs(size):
    model, _ = _models(size)
    n_img = (size // 14) ** 2
    ids, mask, px = _inputs(size, n_img)
    rows_equal_single_runs(model, lambda: tp.VisPruner(keep=n_img // 4), ids, mask, px)


@pytest.mark.parametrize("kwargs,arg", [({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"),
                                        ({"important_ratio": 1.5}, "important_ratio"),
                                        ({"important_ratio": True}, "important_ratio"), ({"layer": 1.0}, "layer")])
def test_bad_arguments_raise_naming_them(kwargs, arg):
    with pytest.raises(ValueError, match=rf"{arg}="):
        tp.create("vispruner", **{"keep": 4, **kwargs})
