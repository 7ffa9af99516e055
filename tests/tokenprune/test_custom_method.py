"""A new method is one class + its registration, with no edit inside visattn.tokenprune: methods defined here,
outside the package, declare their capabilities, are registered by name and run on a tiny random LLaVA-1.5
through the stock adapters. Oracles: the kept indices computed directly from the eager model's own projected
features / attention probabilities, and generate() logits against a layer-by-layer reference run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tp_oracles import llm_reference_logits, projected_patches, topk_sorted  # noqa: E402
from tp_tiny import IMAGE_TOKEN, as_eager, batch, pixels, prompt, tiny_llava  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune.budget import resolve_budget  # noqa: E402
from visattn.tokenprune.capabilities import Capabilities  # noqa: E402
from visattn.tokenprune.methods import LLMPruner, LLMStage  # noqa: E402
from visattn.tokenprune.registry import register_method  # noqa: E402

N_IMG = 16  # (56 / 14) ** 2 placeholder tokens per image
ROWS = [(3, 4, 11), (6, 3, 12)]  # prefix, suffix, seed: different lengths -> left padding
KEEP = 5


class NormTopK(tp.TokenPruner):
    """Embedding stage: keep the ``keep`` projected visual tokens of largest L2 norm, in order."""

    name = "norm-topk"
    capabilities = Capabilities(stage="embedding")

    def __init__(self, keep: int = 4):
        self.keep = keep

    def select(self, embeddings: torch.Tensor) -> torch.Tensor:
        k = resolve_budget(self.keep, embeddings.shape[-2])
        return embeddings.norm(dim=-1).topk(k, dim=-1).indices.sort(dim=-1).values


class OwnLayerDrop(LLMPruner):
    """LLM stage: before decoder layer ``layer`` keep the ``keep`` visual tokens the last token attends to most in
    that same layer (scored on the layer's input with its own q/k); original positions."""

    name = "own-layer-drop"
    capabilities = Capabilities(stage="llm", positions=("original",))
    positions = "original"

    def __init__(self, keep: int = 4, layer: int = 2):
        self.keep, self.layer = keep, layer

    def stages(self) -> list[LLMStage]:
        return [LLMStage(self.layer, self.keep, self.layer)]


class PromisesRaters(LLMPruner):
    """Declares text raters but implements no ``rater_scores``: refused at apply."""

    name = "promises-raters"
    capabilities = Capabilities(stage="llm", text_raters=True)

    def stages(self) -> list[LLMStage]:
        return [LLMStage(1, 4, 0)]


@pytest.fixture(scope="module")
def registered():
    names = {"norm-topk": NormTopK, "own-layer-drop": OwnLayerDrop}
    for name, cls in names.items():
        register_method(name)(cls)
    yield names
    for name in names:
        tp.REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def models():
    model = tiny_llava("sdpa")
    return model, as_eager(model)


def _inputs():
    ids, mask = batch([prompt(p, N_IMG, s, seed) for p, s, seed in ROWS])
    return ids, mask, pixels(len(ROWS), seed=7)


def _span(ids_row: torch.Tensor) -> int:
    return int((ids_row == IMAGE_TOKEN).nonzero()[0])


def _generate(model, name, ids, mask, px, steps=3):
    tp.apply(model, name, keep=KEEP)  # by registry name: create() builds the class with keep=
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=steps,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
        return out, tp.last_report(model)
    finally:
        tp.remove(model)


def test_registered_from_outside(registered):
    for name, cls in registered.items():
        assert name in tp.available()
        pruner = tp.create(name, keep=3)
        assert type(pruner) is cls and pruner.keep == 3 and pruner.missing_hooks() == []


def test_embedding_method_kept_tokens_and_generate(registered, models):
    model, eager = models
    ids, mask, px = _inputs()
    out, report = _generate(model, "norm-topk", ids, mask, px)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    with torch.no_grad():
        feats = projected_patches(eager, px)  # (N, P, D): projector(hidden_states[-2][:, 1:])
        for i in range(ids.shape[0]):
            expected = topk_sorted(feats[i].double().norm(dim=-1), KEEP)
            assert report.kept_indices[i][0].tolist() == expected
            assert report.visual_tokens_kept[i] == KEEP
            row = ids[i][mask[i].bool()]
            s = _span(row)
            text = eager.model.language_model.embed_tokens(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], feats[i][expected], text[s + N_IMG:]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
            torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


def test_llm_method_kept_tokens_and_generate(registered, models):
    model, eager = models
    ids, mask, px = _inputs()
    layer = 2
    out, report = _generate(model, "own-layer-drop", ids, mask, px)
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    emb = eager.model.language_model.embed_tokens
    with torch.no_grad():
        feats = projected_patches(eager, px)
        for i in range(ids.shape[0]):
            row = ids[i][mask[i].bool()]
            s = _span(row)
            att = eager(input_ids=row[None], pixel_values=px[i:i + 1], output_attentions=True).attentions
            expected = topk_sorted(att[layer][0, :, -1, s:s + N_IMG].double().mean(0), KEEP)
            assert report.kept_indices[i][0].tolist() == expected
            text = emb(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], feats[i], text[s + N_IMG:]])[None]
            keep_idx = [j for j in range(seq.shape[1]) if not s <= j < s + N_IMG or j - s in expected]
            ref = llm_reference_logits(eager, seq, [(layer, keep_idx)], reindex=False)
            torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


def test_promised_hook_missing_is_refused(models):
    model, _ = models
    with pytest.raises(TypeError, match=r"pruner=PromisesRaters: .*rater_scores"):
        tp.apply(model, PromisesRaters())
    assert tp.last_report(model) is None  # nothing attached


def test_unsupported_position_policy_is_refused_by_capabilities():
    with pytest.raises(ValueError, match=r"positions=\('sideways',\)"):
        Capabilities(stage="llm", positions=("sideways",))
    with pytest.raises(ValueError, match=r"stage='embedding': text_raters"):
        Capabilities(stage="embedding", text_raters=True)
    with pytest.raises(TypeError, match=r"Bad.capabilities"):
        type("Bad", (tp.TokenPruner,), {"capabilities": {"stage": "llm"}})
