"""Embedding stage of the HF adapters: methods that select visual tokens from the projected visual tokens before
the language model (DivPrune, Uniform, Random, CDPruner, any ``capabilities.stage == "embedding"`` method).

The language-model pre-hook runs ``pruner.select`` on every image's tokens of ``inputs_embeds`` (images of the
same length batched) and removes the others from the input, mask and positions. With
``capabilities.text_condition`` ``select`` also gets each image's instruction: the embeddings of its sample's text
tokens after the sample's first image (the candidates SparseVLM's raters come from). Combined with a family class
by the family modules.
"""

from __future__ import annotations

import torch

from visattn.tokenprune.bookkeeping import per_sample, rater_candidates
from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.layout import select_per_image
from visattn.tokenprune.state import PrefillState


def instruction_embeddings(call: PrefillState, embeds: torch.Tensor, valid: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (batch order): its sample's text-token embeddings after the sample's first image, padded,
    (images, T, D), and which are real, (images, T) bool. One host sync (row lengths, padding side)."""
    stats = torch.cat([valid.sum(1), (~valid[:, -1]).any().long()[None]]).tolist()
    cands, _, _ = rater_candidates(call.spans, stats[:-1], bool(stats[-1]), embeds.shape[1])
    rows = [b for b, row in enumerate(call.spans) for _ in row]
    width = max(max((len(cands[b]) for b in rows), default=0), 1)
    idx = torch.tensor([cands[b] + [0] * (width - len(cands[b])) for b in rows], dtype=torch.long)
    ok = torch.tensor([[True] * len(cands[b]) + [False] * (width - len(cands[b])) for b in rows], dtype=torch.bool)
    idx, ok = idx.view(len(rows), width).to(embeds.device), ok.view(len(rows), width).to(embeds.device)
    row_t = torch.tensor(rows, dtype=torch.long, device=embeds.device)
    return embeds[row_t[:, None], idx], ok


class EmbeddingStage(HFVisionLanguageAdapter):
    """Stage piece for ``capabilities.stage == "embedding"`` (see the module docstring)."""

    def _prefill(self, call, args, kwargs, image_id, valid):
        embeds = kwargs["inputs_embeds"]
        flat = embeds.flatten(0, 1)
        with self._timed():
            if self.capabilities.text_condition:
                text, ok = instruction_embeddings(call, embeds, valid)

                def select(g, x):  # x: (images, c) all images at once, or (1, c) image g alone
                    part = slice(None) if x.shape[0] > 1 else slice(g, g + 1)
                    return self.pruner.select(flat[x], text[part], ok[part])
            else:
                def select(g, x):
                    return self.pruner.select(flat[x])
            keep, sel, _ = select_per_image(image_id, valid, call.image_lengths, call.image_lengths, select)
        call.kept = per_sample(call.spans, sel)
        return self._drop_lm_input(call, args, kwargs, keep, valid)


class VideoMergeStage(HFVisionLanguageAdapter):
    """Stage piece for ``capabilities.video_merge`` methods (TemporalMerge): ``merge_video`` once per video on its
    frames' tokens of ``inputs_embeds`` (the base's ``_core_pre`` fills ``call.videos`` from the family's
    ``_video_frames``; frames of one video are consecutive spans of equal length); kept tokens stay, merged runs
    carry their mean embedding, the rest are removed before the language model; images pass unchanged."""

    def _prefill(self, call, args, kwargs, image_id, valid):
        embeds = kwargs["inputs_embeds"]
        keep = valid.clone()
        kept = [[torch.arange(e - s, device=embeds.device) for s, e in row] for row in call.spans]
        if call.videos:
            embeds = embeds.clone()
            with self._timed():
                for b, frames in call.videos:
                    s, e = call.spans[b][frames[0]][0], call.spans[b][frames[-1]][1]
                    x = embeds[b, s:e].view(len(frames), (e - s) // len(frames), -1)
                    k, merged = self.pruner.merge_video(x)
                    embeds[b, s:e] = merged.flatten(0, 1)
                    keep[b, s:e] = k.flatten()
                    for f, j in enumerate(frames):
                        kept[b][j] = k[f].nonzero().flatten()
            kwargs["inputs_embeds"] = embeds
        call.kept = kept
        return self._drop_lm_input(call, args, kwargs, keep, valid)
