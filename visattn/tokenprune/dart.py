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
share) all that exist are used. Scores are float32 (the official code runs in the model's dtype); equal
similarities go to the earlier token (a stable sort; the official ``topk`` leaves ties unspecified).

The adapter calls :meth:`DART.select_images`, all images of the batch at once: pivots by one stable sort, one host
readback of the pivots' positions (the visiting order is the Python ``set`` itself, built on the host), then the
greedy takes as one masked sort per visited pivot, batched over the images. :meth:`DART.select_image` is the same
rule for one image, written directly (the reference the batched form is checked against).
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
            least = torch.sort(h_img[cand] @ pivot, stable=True).indices[:take].tolist()  # ties: earlier token
            chosen = {left[x] for x in least}
            kept |= chosen
            left = [x for x in left if x not in chosen]
        return torch.tensor(sorted(kept), dtype=torch.long, device=image_scores.device)

    def select_images(self, stage_index: int, image_scores: torch.Tensor, image_hidden: torch.Tensor,
                      image_ok: torch.Tensor, image_counts: list[int], text_scores: torch.Tensor,
                      text_hidden: torch.Tensor, text_ok: torch.Tensor, image_pos: torch.Tensor,
                      text_pos: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """:meth:`select_image` for ``G`` images at once, with one host readback (the pivots' positions).

        ``image_scores`` (G, N), ``image_hidden`` (G, N, C): each image's tokens in order, padded to the longest
        (``image_ok`` (G, N) marks the real ones, the first ``image_counts[g]`` of row ``g``); ``text_scores``
        (G, T), ``text_hidden`` (G, T, C), ``text_ok`` (G, T): the instruction tokens of each image's sample (any
        columns, in sequence order; ``text_ok`` marks them); ``image_pos`` (G, N), ``text_pos`` (G, T): positions
        in the unpadded sequence. Returns the kept indices (G, K) (each row ascending; past its count a row
        repeats its last kept index) and the kept count of every image (host ints)."""
        g_n, n_max = image_scores.shape
        t_max = text_scores.shape[1]
        dev = image_scores.device
        pi, pt = min(self.pivot_image, n_max), min(self.pivot_text, t_max)
        img_piv = torch.sort(image_scores.float().masked_fill(~image_ok, float("-inf")), dim=1, descending=True,
                             stable=True).indices[:, :pi]
        txt_piv = torch.sort(text_scores.float().masked_fill(~text_ok, float("-inf")), dim=1, descending=True,
                             stable=True).indices[:, :pt]
        host = torch.cat([img_piv, image_pos.gather(1, img_piv), txt_piv, text_pos.gather(1, txt_piv),
                          text_ok.sum(1, keepdim=True)], 1).tolist()  # the one readback
        steps, counts = [], []
        for g, (row, n) in enumerate(zip(host, image_counts, strict=True)):
            pivots, share = self._pivots(row, pi, pt, n), self.per_pivot(n)
            left, own = n - min(pi, n), []
            # the official visiting order: a set built from the list of the pivots' positions (a list, as the
            # official code: a set built from a dict is sized differently and may iterate in another order)
            for p in list(set(list(pivots))):
                take = min(share, left)
                if take == 0:
                    break
                kind, i = pivots[p]
                own.append((g * n_max + i if kind == "image" else g_n * n_max + g * t_max + i, take))
                left -= take
            steps.append(own)
            counts.append(n - left)
        kept = torch.zeros(g_n, n_max, dtype=torch.bool, device=dev)
        ar = torch.arange(n_max, device=dev)
        kept.scatter_(1, img_piv, ar[:pi] < image_ok.sum(1, keepdim=True))  # each image's min(pi, n) pivots
        n_steps = max(len(own) for own in steps)
        if n_steps:
            # per image and step: the pivot (a flat row of image_hidden, or past g_n * n_max of text_hidden) and
            # how many tokens it takes (0 past the image's own steps)
            pad = [own + [(0, 0)] * (n_steps - len(own)) for own in steps]
            plan = torch.tensor([[[x[0] for x in own], [x[1] for x in own]] for own in pad],
                                dtype=torch.long).to(dev, non_blocking=True)  # (G, 2, steps)
            src, take = plan[:, 0], plan[:, 1]
            is_text = src >= g_n * n_max
            rows_i = image_hidden.reshape(g_n * n_max, -1)[src.clamp(max=g_n * n_max - 1)]
            rows_t = text_hidden.reshape(g_n * t_max, -1)[(src - g_n * n_max).clamp(min=0)]
            pivot_h = F.normalize(torch.where(is_text[..., None], rows_t, rows_i).float(), dim=-1)
            sims = torch.bmm(F.normalize(image_hidden.float(), dim=-1), pivot_h.transpose(1, 2))  # (G, N, steps)
            for s in range(n_steps):
                free = sims[:, :, s].masked_fill(kept | ~image_ok, float("inf"))
                least = torch.sort(free, dim=1, stable=True).indices  # least similar first, ties: earlier token
                kept |= torch.zeros_like(kept).scatter_(1, least, ar[None] < take[:, s, None])
        k = max(counts)
        order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :k]  # kept first, ascending
        last = (kept.sum(1, keepdim=True) - 1).clamp(min=0)
        return order.gather(1, torch.minimum(ar[None, :k], last)), counts

    def _pivots(self, row: list[int], pi: int, pt: int, n: int) -> dict[int, tuple[str, int]]:
        """One image's pivots from its readback row (image pivot indices and positions, text pivot indices and
        positions, the text count): position in the unpadded sequence -> (``"image"`` / ``"text"``, index),
        image pivots first then text pivots, each in descending norm (the insertion order of the official set)."""
        n_txt = min(pt, row[-1])
        out = {row[pi + a]: ("image", row[a]) for a in range(min(pi, n))}
        out.update({row[2 * pi + pt + a]: ("text", row[2 * pi + a]) for a in range(n_txt)})
        return out
