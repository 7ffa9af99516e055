"""CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs"; official code Theia-4869/CDPruner, LLaVA): keep the visual tokens a conditional DPP
selects.

* **similarity** ``S = x̂ x̂ᵀ``: cosine similarity of the image's projected visual tokens (the projector output,
  as the official ``encode_images`` after ``mm_projector``), in float32;
* **relevance** of token ``i``: ``r_i = -mean_m cos(v_i, t_m)`` over the instruction's tokens ``t_m`` (the
  official code negates the mean similarity), then min–max normalised over the image's tokens,
  ``(r - min r + 1e-6) / (max r - min r)``; with ``theta`` (the official code's commented option)
  ``r = exp(theta / (2 (1 - theta)) · r)``;
* **kernel** ``L = diag(r) S diag(r)``; the kept set is the greedy DPP MAP of ``L``
  (:func:`~visattn.tokenprune.selection.dpp_greedy_map`), ``keep`` tokens per image, in spatial order.

Where the vectors come from differs from the official LLaVA code, which HF checkpoints cannot reproduce: it embeds
the instruction with CLIP's text tower and the patches with CLIP's ``post_layernorm`` + ``visual_projection`` (the
joint CLIP space; an HF LLaVA model carries neither the text tower nor the visual projection). Here both live in
the language model's input space: ``v_i`` are the projected visual tokens, ``t_m`` the input embeddings of the
sample's text tokens after its first image (``capabilities.text_condition``). The normalisation is per image (the
official code takes one min / max over all crops of its single sample). An image whose sample has no text after
it gets ``r = 1`` (an unconditional DPP on ``S``).
"""

from __future__ import annotations

import numbers

import torch

from visattn.tokenprune.budget import Budget, resolve_budget
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.methods import EmbeddingPruner
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.selection import dpp_greedy_map


def conditional_kernel(visual: torch.Tensor, text: torch.Tensor | None, text_ok: torch.Tensor | None,
                       theta: float | None = None) -> torch.Tensor:
    """CDPruner's kernel ``diag(r) S diag(r)`` (G, N, N) for ``visual`` (G, N, D) tokens of G images and their
    instructions ``text`` (G, T, D) with ``text_ok`` (G, T) (module docstring); float32 (float64 for float64
    input)."""
    dtype = torch.float64 if visual.dtype == torch.float64 else torch.float32
    v = visual.to(dtype)
    v = v / v.norm(dim=-1, keepdim=True)
    sim = v @ v.transpose(1, 2)
    g, n, _ = v.shape
    if text is None or text.shape[1] == 0:
        rel = v.new_ones(g, n)
    else:
        t = text.to(dtype)
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        w = text_ok.to(dtype)[:, None, :]  # (G, 1, T)
        count = w.sum(-1)  # (G, 1)
        rel = -((v @ t.transpose(1, 2)) * w).sum(-1) / count.clamp(min=1)
        lo, hi = rel.amin(-1, keepdim=True), rel.amax(-1, keepdim=True)
        rel = (rel - lo + 1e-6) / (hi - lo)
        rel = torch.where(count > 0, rel, torch.ones_like(rel))
    if theta is not None:
        rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    return rel[:, :, None] * sim * rel[:, None, :]


@register_method("cdpruner", "cd-pruner")
class CDPruner(EmbeddingPruner):
    """CDPruner: per image, the greedy MAP of a DPP whose kernel is the projected visual tokens' cosine
    similarity weighted by their relevance to the instruction (module docstring); ``keep`` tokens per image
    (an int, or a ratio of the image's tokens), ``theta`` in [0, 1) the optional relevance sharpening (None: off,
    the official default)."""

    name = "cdpruner"
    capabilities = Capabilities(stage="embedding", text_condition=True)

    def __init__(self, keep: Budget = 0.25, theta: float | None = None):
        super().__init__(keep)
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, numbers.Real)
                                  or not 0.0 <= float(theta) < 1.0):
            raise ValueError(f"theta={theta!r}: expected None or a float in [0, 1)")
        self.theta = None if theta is None else float(theta)

    def select(self, embeddings: torch.Tensor, text: torch.Tensor | None = None,
               text_ok: torch.Tensor | None = None) -> torch.Tensor:
        """``embeddings`` (G, N, D) of G images and their instructions (G, T, D) / (G, T) → kept indices (G, k)."""
        kernel = conditional_kernel(embeddings, text, text_ok, self.theta)
        return dpp_greedy_map(kernel, resolve_budget(self.keep, embeddings.shape[-2]))
