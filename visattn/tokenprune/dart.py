"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More"; official code ZichenWen1/DART, LLaVA ``modeling_llama_self.py``): duplication-aware pruning inside the LLM,
wired as FastV (drop before decoder layer ``layer``, scores from layer ``layer − 1``).

Per image, right before layer ``K = layer``:

* **pivots**: the ``pivot_image`` image tokens and the ``pivot_text`` instruction tokens (the sample's text after
  its first image; the official code: every token after the image) with the largest L1 norm of their key states in
  layer ``K − 1`` (rotary-embedded keys, all heads concatenated);
* **duplicates**: every pivot, in the order the official code visits them (a Python ``set`` of the pivots'
  positions in the unpadded sequence, built from the image pivots then the text pivots in descending norm),
  takes the ``⌊budget / (pivot_image + pivot_text)⌋`` not-yet-kept, non-pivot image tokens *least* cosine-similar
  to it (on layer ``K``'s input through the language model's final norm); ``budget`` = ``keep`` (int, the
  official ``max_num_trunction``) or ``keep · N`` (float, the official ``1 − reduction_ratio``);
* the image keeps its pivots and every token a pivot took: ``pivot_image + pivots · ⌊budget / (pivot_image +
  pivot_text)⌋`` tokens (132 of 576 for the official ``max_num_trunction=128`` with 4 + 4 pivots); the rest are
  dropped before layer ``K``; positions stay the original ones (the official code passes the kept indices as
  position ids), ``positions="reindex"`` renumbers.

Where the official code would fail (fewer instruction tokens than ``pivot_text``, fewer candidates than a pivot's
share) all that exist are used. Scores are float32 (the official code runs in the model's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visattn.tokenprune.budget import Budget, check_budget, check_layer
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import LLMPruner, LLMStage, _check_positions
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.scoring import decoder_keys


@register_method("dart")
class DART(LLMPruner):
    """DART: before decoder layer ``layer`` keep each image's key-norm pivots and the tokens least similar to the
    pivots (module docstring); ``keep`` is the official budget (int ``max_num_trunction``, or a ratio of the
    image's tokens), ``pivot_image`` / ``pivot_text`` the pivot counts (official 4 / 4)."""

    name = "dart"
    capabilities = Capabilities(stage="llm", positions=("original", "reindex"), hidden_select=True)

    def __init__(self, layer: int = 2, keep: Budget = 128, pivot_image: int = 4, pivot_text: int = 4,
                 positions: str = "original"):
        self.layer = check_layer(layer, "layer", 1)
        self.keep = check_budget(keep, "keep")
        self.pivot_image = check_layer(pivot_image, "pivot_image", 1)
        self.pivot_text = check_layer(pivot_text, "pivot_text", 0)
        self.positions = _check_positions(positions, self.capabilities.positions)

    def stages(self) -> list[LLMStage]:
        return [LLMStage(self.layer, self.keep, self.layer - 1)]

    def per_pivot(self, num_tokens: int) -> int:
        """Tokens each pivot takes for an image of ``num_tokens`` tokens (the official ``TOKEN_TOPK``)."""
        budget = self.keep if isinstance(self.keep, int) else self.keep * num_tokens
        return int(budget // (self.pivot_image + self.pivot_text))

    def layer_scores(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
        """L1 norm (B, L) of every token's rotary-embedded key states in decoder ``layer`` (float32; per token,
        so the padding mask ``valid`` is not needed)."""
        return decoder_keys(layer, hidden, cos, sin).float().abs().sum((-2, -1))

    def select_image(self, stage_index: int, image_scores: torch.Tensor, image_hidden: torch.Tensor,
                     text_scores: torch.Tensor, text_hidden: torch.Tensor, image_pos: list[int],
                     text_pos: list[int]) -> torch.Tensor:
        """Kept indices (ascending) among one image's ``n`` tokens, from their key norms ``image_scores`` (n,) and
        final-normed hidden states (n, C), the instruction tokens' (t,) / (t, C), and the positions of both in
        the unpadded sequence (which fix the official visiting order of the pivots)."""
        n = image_scores.shape[0]
        img_piv = torch.sort(image_scores, descending=True, stable=True).indices[: self.pivot_image].tolist()
        txt_piv = torch.sort(text_scores, descending=True, stable=True).indices[: self.pivot_text].tolist()
        vec = {image_pos[i]: ("image", i) for i in img_piv}
        vec.update({text_pos[t]: ("text", t) for t in txt_piv})
        order = list(set([image_pos[i] for i in img_piv] + [text_pos[t] for t in txt_piv]))
        h_img = F.normalize(image_hidden.float(), dim=-1)
        h_txt = F.normalize(text_hidden.float(), dim=-1)
        share = self.per_pivot(n)
        kept = set(img_piv)
        left = [i for i in range(n) if i not in kept]
        for p in order:
            take = min(share, len(left))
            if take == 0:
                break
            kind, i = vec[p]
            pivot = h_img[i] if kind == "image" else h_txt[i]
            cand = torch.tensor(left, device=h_img.device)
            least = (-(h_img[cand] @ pivot)).topk(take).indices.tolist()
            chosen = {left[x] for x in least}
            kept |= chosen
            left = [x for x in left if x not in chosen]
        return torch.tensor(sorted(kept), dtype=torch.long, device=image_scores.device)
