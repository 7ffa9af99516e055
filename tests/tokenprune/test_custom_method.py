"""A new method is one class + its registration, with no edit inside visattn.tokenprune: methods defined here,
outside the package (one per stage: vision, embedding, LLM), declare their capabilities, are registered by name
and run on a tiny random LLaVA-1.5 through the stock adapters. Oracles: the kept indices computed directly from
the eager model's own attention probabilities / projected features, and generate() logits against a
layer-by-layer reference run of the equivalently pruned sequence."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_llava_methods import N_IMG, _generate, _inputs, _span  # noqa: E402
from tp_oracles import llm_reference_logits, projected_patches, topk_sorted, vision_outputs  # noqa: E402

from visattn import tokenprune as tp  # noqa: E402
from visattn.tokenprune import Capabilities, LLMPruner, LLMStage, VisionPruner, register_method  # noqa: E402
from visattn.tokenprune.budget import resolve_budget  # noqa: E402

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


class LeastAttended(VisionPruner):
    """Vision stage: keep the ``keep`` patches the [CLS] token attends to least in vision layer -2 (heads
    averaged), in patch order."""

    name = "least-attended"
    capabilities = Capabilities(stage="vision", cls_attention=True)

    def __init__(self, keep: int = 4):
        self.keep = keep

    def capture_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 2]

    def output_count(self, num_patches: int) -> int:
        return min(self.keep, num_patches)

    def patch_scores(self, captures: dict) -> torch.Tensor:
        (probs, _), = captures.values()
        return -probs.mean(1)[:, 1:]

    def reduce(self, patches, cls_hidden, captures):
        k = self.output_count(patches.shape[1])
        idx = self.patch_scores(captures).topk(k, dim=-1).indices.sort(dim=-1).values
        return patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1])), idx, {}


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
    names = {"norm-topk": NormTopK, "least-attended": LeastAttended, "own-layer-drop": OwnLayerDrop}
    for name, cls in names.items():
        register_method(name)(cls)
    yield names
    for name in names:
        tp.REGISTRY.pop(name, None)


def test_registered_from_outside(registered):
    for name, cls in registered.items():
        assert name in tp.available()
        pruner = tp.create(name, keep=3)
        assert type(pruner) is cls and pruner.keep == 3 and pruner.missing_hooks() == []


def _check_before_llm(model, eager, name: str, expected_of) -> None:
    """A vision / embedding-stage method: kept indices = ``expected_of(i, feats)`` for row ``i``, and generate()
    logits = the reference run on the prompt with only those projected patches (positions re-indexed)."""
    ids, mask, px = _inputs()
    out, report = _generate(model, tp.create(name, keep=KEEP), ids, mask, px)  # built by registry name
    gen = out.sequences[:, ids.shape[1]:]
    logits = torch.stack(out.logits, 1)
    with torch.no_grad():
        feats = projected_patches(eager, px)  # (N, P, D): projector(hidden_states[-2][:, 1:])
        for i in range(ids.shape[0]):
            expected = expected_of(i, px, feats)
            assert report.kept_indices[i][0].tolist() == expected
            assert report.visual_tokens_kept[i] == KEEP
            row = ids[i][mask[i].bool()]
            s = _span(row)
            text = eager.model.language_model.embed_tokens(torch.cat([row, gen[i][:-1]]))
            seq = torch.cat([text[:s], feats[i][expected], text[s + N_IMG:]])[None]
            ref = llm_reference_logits(eager, seq, [], reindex=True)
            torch.testing.assert_close(logits[i], ref[0, -3:], atol=2e-4, rtol=1e-4)


def test_embedding_method_kept_tokens_and_generate(registered, models):
    model, eager = models
    _check_before_llm(model, eager, "norm-topk", lambda i, px, feats: topk_sorted(feats[i].double().norm(dim=-1), KEEP))


def test_vision_method_kept_tokens_and_generate(registered, models):
    model, eager = models

    def least_attended(i, px, feats):
        attn = vision_outputs(eager, px).attentions[-2]  # (N, H, S, S), eager probabilities
        return topk_sorted(-attn[i, :, 0, 1:].double().mean(0), KEEP)

    _check_before_llm(model, eager, "least-attended", least_attended)


def test_llm_method_kept_tokens_and_generate(registered, models):
    model, eager = models
    ids, mask, px = _inputs()
    layer = 2
    out, report = _generate(model, tp.create("own-layer-drop", keep=KEEP), ids, mask, px)
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
    with pytest.raises(ValueError, match=r"text_condition"):
        Capabilities(stage="llm", text_condition=True)
    with pytest.raises(ValueError, match=r"text_condition"):
        Capabilities(stage="embedding", text_condition=True, standalone_tower=True)
    with pytest.raises(ValueError, match=r"stage='embedding': .*hidden_select"):
        Capabilities(stage="embedding", hidden_select=True)
    with pytest.raises(ValueError, match=r"hidden_select: "):
        Capabilities(stage="llm", hidden_select=True, text_raters=True)
    assert Capabilities(stage="llm", hidden_select=True).hooks()[-2:] == ("layer_scores", "select_image")
    with pytest.raises(TypeError, match=r"Bad.capabilities"):
        type("Bad", (tp.TokenPruner,), {"capabilities": {"stage": "llm"}})
