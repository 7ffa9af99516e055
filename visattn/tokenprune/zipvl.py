"""ZipVL (He et al., 2024/2025, "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
Sparsification", arXiv 2410.08584; no official code is public): a keep ratio that is not a hyper-parameter but
follows the attention-score distribution, wired here as FastV (drop before decoder layer ``layer``, scores from
layer ``layer − 1``).

In layer ``K − 1`` every valid query row of the prefill attends to the keys (causal, padding masked, heads
averaged). For each image token ``j``:

* its **accumulated** attention ``a_j = Σ_i A[i, j]`` (the paper's accumulated score: the column sum over all
  queries), and
* its **normalised** attention ``a_j / c_j``, with ``c_j`` the number of queries that can see it (the valid rows
  ``i ≥ j``): the paper's normalisation, which removes the causal mask's bias towards early tokens.

**Keep count** (the paper's layer-wise adaptive ratio): sort the image's ``a_j`` in descending order and keep
``p = min{p : Σ_{j ≤ p} a_sorted(j) ≥ τ · Σ_j a_j}`` tokens, the fewest whose accumulated attention reaches the
fraction ``τ`` of the image's total. **Which tokens**: the ``p`` with the largest normalised attention (ties to
the earlier token). The rest are dropped before layer ``K``; positions stay the original ones (``positions=
"reindex"`` renumbers).

Differences from the paper (docs/TOKENPRUNE.md, "ZipVL"): the paper decides ``p`` over the whole sequence at
every layer and evicts any token (text included) from that layer's KV cache, approximating the attention with
probe queries; here the candidates are one image's tokens, the distribution is that image's own, the decision is
made once (at ``layer``) and the scores are exact (every query row, float32). The paper's KV-cache compression of
the unimportant tokens is the drop itself with ``kv="drop"`` (v2's eviction); ``kv="quantize"`` keeps them and
stores the KV cache in mixed precision instead (v1: the important tokens at ``bits[0]``, the others at ``bits[1]``;
:mod:`~visattn.tokenprune.kvquant`, :mod:`~visattn.tokenprune.hf_kvcache`; docs/TOKENPRUNE.md, "ZipVL KV-cache
quantisation").
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import torch

from visattn.tokenprune.budget import check_layer
from visattn.tokenprune.capabilities import Capabilities
from visattn.tokenprune.kvquant import check_bits, check_group_size
from visattn.tokenprune.methods import LLMPruner, LLMStage, _check_positions
from visattn.tokenprune.registry import register_method
from visattn.tokenprune.scoring import decoder_attention_mass

#: ``kv`` modes: drop the unimportant visual tokens (v2) or keep them with a low-bit KV cache (v1)
KV_MODES = ("drop", "quantize")


def _check_tau(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"tau={value!r}: expected a float in (0, 1] (the attention mass to keep)")
    return float(value)


@register_method("zipvl", "zip-vl")
class ZipVL(LLMPruner):
    """ZipVL: before decoder layer ``layer`` keep, per image, the fewest tokens whose accumulated attention in
    layer ``layer − 1`` reaches the fraction ``tau`` of the image's, chosen by normalised attention (module
    docstring). The kept count follows the attention distribution: there is no ``keep`` budget."""

    name = "zipvl"
    capabilities = Capabilities(stage="llm", positions=("original", "reindex"), hidden_select=True)

    def __init__(self, tau: float = 0.975, layer: int = 2, positions: str = "original", kv: str = "drop",
                 bits: tuple[int, int] | None = None, group_size: int | None = None):
        """``kv="drop"``: the unimportant visual tokens leave the sequence before ``layer`` (v2). ``kv="quantize"``:
        every token stays; after the prefill the KV cache of the important tokens (the selected visual tokens and
        all text) is stored at ``bits[0]`` bits and that of the other visual tokens at ``bits[1]`` (v1; default
        ``(4, 2)``, 16 = unquantised), asymmetric min-max, keys per channel and values per token (channel-
        separable), ``group_size`` elements per group (None: the whole channel / token) — see
        :mod:`~visattn.tokenprune.kvquant`."""
        self.tau = _check_tau(tau)
        self.layer = check_layer(layer, "layer", 1)
        self.positions = _check_positions(positions, self.capabilities.positions)
        if kv not in KV_MODES:
            raise ValueError(f"kv={kv!r}: expected one of {KV_MODES}")
        self.kv = kv
        if kv == "drop" and (bits is not None or group_size is not None):
            arg = "bits" if bits is not None else "group_size"
            raise ValueError(f"{arg}={bits if bits is not None else group_size!r}: only used with kv='quantize'")
        self.bits = check_bits((4, 2) if bits is None else bits) if kv == "quantize" else None
        self.group_size = check_group_size(group_size)
        if kv == "quantize":
            if positions != "original":
                raise ValueError(f"positions={positions!r}: kv='quantize' drops no token, so positions stay the "
                                 "original ones")
            self.capabilities = dataclasses.replace(type(self).capabilities, kv_quantize=True)

    @property
    def kv_bits(self) -> tuple[int, int] | None:
        """(important, other) bit-widths of the KV cache with ``kv="quantize"`` (None otherwise)."""
        return self.bits

    @property
    def kv_group_size(self) -> int | None:
        """Elements per quantisation group (None: one group per channel of the keys / per token of the values)."""
        return self.group_size

    def config(self) -> dict:
        """Constructor arguments, for reports."""
        out = super().config()
        out.pop("capabilities", None)
        return out

    @classmethod
    def from_keep(cls, keep: Any, **kwargs: Any) -> ZipVL:
        """Refused: ZipVL's keep count follows ``tau`` and the attention scores (ValueError naming ``keep``)."""
        raise ValueError(f"keep={keep!r}: ZipVL has no fixed budget; its keep count follows the attention mass "
                         "threshold tau (e.g. create('zipvl', tau=0.975))")

    def stages(self) -> list[LLMStage]:
        # the budget is unused: select_image decides the count (capabilities.hidden_select)
        return [LLMStage(self.layer, 1.0, self.layer - 1)]

    def layer_scores(self, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, 2) float32: every token's accumulated attention in decoder ``layer`` (column sums over the
        valid query rows, heads averaged) and its normalised attention (divided by how many rows see it)."""
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mass, seen = decoder_attention_mass(layer, hidden, cos, sin, valid)
        return torch.stack([mass, mass / seen.clamp(min=1.0)], -1)

    def keep_count(self, mass: torch.Tensor) -> int:
        """The paper's adaptive count: the fewest of these tokens whose accumulated attention ``mass`` (n,) reaches
        ``tau`` of its sum (float64; host int)."""
        cum = torch.sort(mass.double(), descending=True).values.cumsum(0)
        below = int((cum < self.tau * cum[-1]).sum())
        return min(below + 1, mass.shape[0])

    def select_image(self, stage_index: int, image_scores: torch.Tensor, image_hidden: torch.Tensor,
                     text_scores: torch.Tensor, text_hidden: torch.Tensor, image_pos: list[int],
                     text_pos: list[int]) -> torch.Tensor:
        """Kept indices (ascending) among one image's ``n`` tokens from their ``layer_scores`` rows ``image_scores``
        (n, 2): :meth:`keep_count` of the accumulated attention, the largest normalised attention (the hidden
        states and the instruction are not used)."""
        p = self.keep_count(image_scores[:, 0])
        order = torch.sort(image_scores[:, 1].double(), descending=True, stable=True).indices
        return torch.sort(order[:p]).values
