"""Embedding stage of the HF adapters: methods that select visual tokens from the projected visual tokens before
the language model (DivPrune, Uniform, any ``capabilities.stage == "embedding"`` method).

The language-model pre-hook runs ``pruner.select`` on every image's tokens of ``inputs_embeds`` (images of the
same length batched) and removes the others from the input, mask and positions. Combined with a family class by
the family modules.
"""

from __future__ import annotations

from visattn.tokenprune.bookkeeping import per_sample
from visattn.tokenprune.hf_base import HFVisionLanguageAdapter
from visattn.tokenprune.layout import select_per_image


class EmbeddingStage(HFVisionLanguageAdapter):
    """Stage piece for ``capabilities.stage == "embedding"`` (see the module docstring)."""

    def _prefill(self, call, args, kwargs, image_id, valid):
        embeds = kwargs["inputs_embeds"]
        with self._timed():
            keep, sel, _ = select_per_image(image_id, valid, call.image_lengths, call.image_lengths,
                                            lambda g, x: self.pruner.select(embeds.flatten(0, 1)[x]))
        call.kept = per_sample(call.spans, sel)
        return self._drop_lm_input(call, args, kwargs, keep, valid)
